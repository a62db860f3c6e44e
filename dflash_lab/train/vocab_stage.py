"""The vocabulary stage of the loss, without recomputation (issue 13 item 1).

For the draft's hidden states h [M, H] of the scored slots, their labels y, and the frozen head
(W [V, H], bias b), per slot (z = W h + b, log q = log_softmax z, p = the target's distribution):

    ce      = -log q(y)                 d ce / d z      = q - onehot(y)
    kl      = sum_v p (log p - log q)   d kl / d z      = q * sum(p) - p
    overlap = sum_v min(p, q)           d overlap / d z = g - q * sum(g),  g = q * m,
              m_v = 1 where q_v < p_v, 1/2 where q_v == p_v, else 0   (torch.minimum's subgradient)
    correct = [argmax z == y]           (no gradient)

The KL value itself needs no [M, V] work either: sum_v p_v log q_v = sum_v p_v z_v - sum(p) lse(z),
and sum_v p_v z_v = (p @ W) . h + p . b, so per slot it is one [H] dot product with the position's
p @ W (only overlap, when the loss uses it, reads p and q entry by entry).

The gradient with respect to h is (d/dz) @ W, and each d/dz above is a combination of q, p,
onehot(y) and g with per-slot scalar coefficients. So the forward computes the [M, H] products
q @ W, p @ W (once per distinct target position), g @ W (only when overlap is used) and keeps
them; the backward combines them with the upstream gradients of ce, kl and overlap:

    d h = (gce + gkl * sum(p) - gov * sum(g)) * (q @ W) - gce * W[y] - gkl * (p @ W) + gov * (g @ W)

No [M, V] tensor survives the forward and nothing vocabulary-sized runs in backward: the backward
is O(M * H). The head is frozen (no gradient for W or b; required). The target's log-probs are
computed once per distinct position per call: slots are grouped by the position they read, and
chunks hold whole groups of positions, so a position shared by several slots (overlapping
blocks) is never split across chunks.

Values and gradients equal the autograd of the straightforward code (tests/unit/test_vocab_stage.py
keeps it as the reference).

With `top_k` > 0 the same logits also give each slot's top-k token ids (sorted, descending), the
draft's softmax mass on them and, with a target, the target's: what a DFlash2 draft's selector loss
needs, so it takes no second pass over the vocabulary (`TopCandidates`; no gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TopCandidates(NamedTuple):
    """Per slot: the top-k token ids of the draft's logits [M, k] (descending), the draft's softmax
    mass on them [M] and the target's [M] (None without a target)."""

    ids: torch.Tensor
    draft_mass: torch.Tensor
    target_mass: torch.Tensor | None


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


# Vocabulary slices of the frozen head cast to fp32 at a time by `_wide_matmul` (bf16 heads on GPU):
# a transient of 8,192 x H fp32 instead of a whole fp32 copy of the head.
_WIDE_SLICE = 8192


def _wide_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [m, V] @ weight [V, H] in fp32 (fp64 for fp64 inputs), whatever autocast says.

    The partial gradients p @ W, q @ W, g @ W meet in differences of nearly equal terms (the KL's
    gradient is (sum(p) q - p) @ W) and, dotted with h, in the KL value; rounded to bf16 they put the
    KL off by +-0.03 and below zero (issue 23 item 6). Costs fp32 GEMMs where the head would run in
    bf16: the price of a KL that is right (measured in BENCHMARKS.md section 5)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    x = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if weight.dtype == dtype:
            return torch.matmul(x, weight)
        out = None
        for v0 in range(0, weight.shape[0], _WIDE_SLICE):
            part = torch.matmul(x[:, v0:v0 + _WIDE_SLICE], weight[v0:v0 + _WIDE_SLICE].to(dtype))
            out = part if out is None else out.add_(part)
        return out


def _teacher(rows: torch.Tensor, weight, bias, dtype):
    """Per distinct target position, from its final hidden state [R, H]: log p [R, V], p @ W [R, H],
    sum(p), sum(p log p) and p . b (each [R])."""
    logp = torch.log_softmax(_at_least_fp32(F.linear(rows, weight, bias)).to(dtype), dim=-1)
    p = logp.exp()
    with torch.autocast(p.device.type, enabled=False):  # p . b in p's precision, not bf16
        p_b = torch.matmul(p, bias.to(dtype)) if bias is not None else p.new_zeros(p.shape[0])
    return logp, _wide_matmul(p, weight), p.sum(-1), (p * logp).sum(-1), p_b


def _rounding_shift(logits: torch.Tensor, q: torch.Tensor, q_w, hidden, bias) -> torch.Tensor:
    """sum_v q_v (z~_v - z_v) per slot: how far the logits z~ that autocast rounded (to bf16) move
    lse from that of the unrounded z = W h + b, to first order (d lse / d z = q). The KL from p @ W
    reads the unrounded z (sum p z = (p @ W) . h + p . b), so its lse must too; mixing the two
    costs the KL the logits' rounding (+-0.06 at |z| ~ 16), where one consistent z leaves
    O(var_q(z~ - z)). `q_w` = q @ W in fp32; nothing [m, V] is allocated here."""
    with torch.autocast(q.device.type, enabled=False):  # products in q's precision, not bf16
        q_z_rounded = torch.bmm(q[:, None, :], logits[:, :, None]).flatten()
        q_z = (q_w * hidden.to(q_w.dtype)).sum(-1)
        if bias is not None:
            q_z = q_z + torch.matmul(q, bias.to(q.dtype))
    return q_z_rounded - q_z


def _kl_and_overlap(logq: torch.Tensor, logp: torch.Tensor, weight):
    """Entry by entry, from the chunk's log q and its slots' log p [m, V] (both consumed): kl and
    overlap [m], q [m, V], g @ W [m, H] and sum(g) [m] (g: overlap's gradient weights)."""
    q = logq.exp()
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    del logp, logq
    overlap = torch.minimum(p, q).sum(-1)
    # torch.minimum's backward for its second argument: 1 where q < p, 1/2 on ties
    g = q * ((q < p).to(q.dtype) + 0.5 * (q == p).to(q.dtype))
    del p
    return kl, overlap, q, _wide_matmul(g, weight), g.sum(-1)


def _kl_from_p_w(logits, lse, hidden, weight, bias, rounded: bool, teacher, row_of_slot):
    """(kl [m], q @ W [m, H] in fp32) without any [m, V] work on p: KL(p || q) = sum p log p - sum p z
    + sum(p) lse, and sum_v p_v z_v = (p @ W) . h + p . b, per slot an [H] dot product. `logits` become
    q in place unless they were `rounded` (then their lse moves to the unrounded z: `_rounding_shift`)."""
    p_w, p_sum, p_logp, p_b = teacher
    q = (logits - lse[:, None]).exp_() if rounded else logits.sub_(lse[:, None]).exp_()
    q_w = _wide_matmul(q, weight)
    if rounded:
        lse = lse - _rounding_shift(logits, q, q_w, hidden, bias)
    del q
    r = row_of_slot
    p_z = (p_w[r].to(lse.dtype) * hidden.to(lse.dtype)).sum(-1) + p_b[r]
    return p_logp[r] - p_z + p_sum[r] * lse, q_w


class VocabChunk(torch.autograd.Function):
    """One chunk of slots: (ce, kl, overlap, correct), each [m], from hidden [m, H], then the top-k
    ids [m, k], the draft's and the target's mass on them [m] (k = `top_k`; [m, 0] and zeros at 0).

    `rows` [r, H]: the target's final hidden states of the chunk's distinct positions (None: no
    target, kl and overlap are zeros); slot i reads row `row_of_slot[i]`."""

    @staticmethod
    def forward(ctx, hidden, labels, weight, bias, rows, row_of_slot, need_overlap: bool, top_k: int = 0):
        raw = F.linear(hidden, weight, bias)
        rounded = raw.dtype not in (torch.float32, torch.float64)  # autocast ran the head in bf16/fp16
        logits = _at_least_fp32(raw)  # [m, V]
        del raw
        correct = (logits.argmax(-1) == labels).to(logits.dtype)
        lse = torch.logsumexp(logits, dim=-1)
        ce = lse - logits.gather(-1, labels[:, None]).squeeze(-1)  # -log q(y)
        zero = torch.zeros_like(ce)
        kl, overlap = zero, zero.clone()
        top_values, top_ids = torch.topk(logits, top_k, dim=-1)  # before `logits` is overwritten below
        draft_mass = (top_values - lse[:, None]).exp().sum(-1)
        target_mass = zero.clone()
        p_w = p_sum = g_w = g_sum = None
        if rows is not None:
            logp_rows, p_w, p_sum, p_logp, p_b = _teacher(rows, weight, bias, logits.dtype)
            if top_k:  # the [m, V] gather of the slots' log p: only the selector's target mass needs it
                target_mass = logp_rows[row_of_slot].gather(-1, top_ids).exp().sum(-1)
        if rows is not None and need_overlap:  # overlap needs p and q side by side: [m, V] work
            logq = torch.log_softmax(logits, dim=-1)  # as the target's: equal entries round alike (ties)
            del logits
            kl, overlap, q, g_w, g_sum = _kl_and_overlap(logq, logp_rows[row_of_slot], weight)
            q_w = _wide_matmul(q, weight)
            del q
        elif rows is not None:
            kl, q_w = _kl_from_p_w(logits, lse, hidden, weight, bias, rounded, (p_w, p_sum, p_logp, p_b), row_of_slot)
            del logits
        else:
            q = logits.sub_(lse[:, None]).exp_()  # in place: the logits become q
            q_w = torch.matmul(q, weight)  # [m, H]: the q-part of every gradient
            del q
        ctx.has_target, ctx.has_overlap = rows is not None, g_w is not None
        ctx.hidden_dtype = hidden.dtype
        saved = [labels, weight, q_w]
        if ctx.has_target:
            saved += [row_of_slot, p_w, p_sum]
        if ctx.has_overlap:
            saved += [g_w, g_sum]
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(correct, top_ids, draft_mass, target_mass)
        if not ctx.has_target:
            ctx.mark_non_differentiable(kl, overlap)
        elif not ctx.has_overlap:
            ctx.mark_non_differentiable(overlap)
        return ce, kl, overlap, correct, top_ids, draft_mass, target_mass

    @staticmethod
    def backward(ctx, g_ce, g_kl, g_ov, _g_correct, *_g_top):
        labels, weight, q_w, *rest = ctx.saved_tensors
        coef_q = g_ce.clone()
        grad = -g_ce[:, None] * weight[labels].to(q_w.dtype)
        if ctx.has_target:
            row_of_slot, p_w, p_sum, *rest = rest
            coef_q = coef_q + g_kl * p_sum[row_of_slot]
            grad = grad - g_kl[:, None] * p_w[row_of_slot].to(q_w.dtype)
        if ctx.has_overlap:
            g_w, g_sum = rest
            coef_q = coef_q - g_ov * g_sum
            grad = grad + g_ov[:, None] * g_w
        grad = grad + coef_q[:, None] * q_w
        return grad.to(ctx.hidden_dtype), None, None, None, None, None, None, None


def _position_groups(target_index: torch.Tensor, chunk_slots: int):
    """Group slots by the target position they read: (used positions [R], slot order [M] with the
    slots of each position together, the position of each ordered slot as an index into `used`,
    chunk boundaries [(r0, r1, s0, s1)] over positions and ordered slots, each chunk holding whole
    positions and at most `chunk_slots` slots unless one position alone has more)."""
    used, inverse, counts = torch.unique(target_index, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    bounds = []
    r0 = s0 = 0
    size = 0
    for r, c in enumerate(counts.tolist()):  # the one host sync of the stage
        if size and size + c > chunk_slots:
            bounds.append((r0, r, s0, s0 + size))
            r0, s0, size = r, s0 + size, 0
        size += c
    bounds.append((r0, len(counts), s0, s0 + size))
    return used, order, inverse[order], bounds


def vocab_statistics(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     target_hidden: torch.Tensor | None = None, target_index: torch.Tensor | None = None,
                     *, chunk_slots: int = 1024, need_overlap: bool = True, top_k: int = 0):
    """Per-slot (ce, kl, overlap, correct), each [M], in the order of `hidden` [M, H]; with `top_k`
    > 0 a fifth item, the slots' `TopCandidates` (from the same logits).

    `target_hidden`: [M, H] (slot i reads row i), or any [R, H] table with `target_index` [M]; None
    skips kl/overlap (zeros). `need_overlap=False` returns zeros for overlap (no [M, V] work for it).
    Chunks of about `chunk_slots` slots bound the transient [slots, V] tensors; the backward
    recomputes nothing whatever the number of chunks."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the vocabulary stage needs a frozen lm_head (requires_grad=False): it computes no "
                         "gradient for the head's weight or bias")
    outputs = _vocab_chunks(hidden, labels, weight, bias, target_hidden, target_index, chunk_slots, need_overlap, top_k)
    if not top_k:
        return outputs[:4]
    return (*outputs[:4], TopCandidates(*outputs[4:6], outputs[6] if target_hidden is not None else None))


def _vocab_chunks(hidden, labels, weight, bias, target_hidden, target_index, chunk_slots, need_overlap, top_k):
    """`VocabChunk` over chunks of slots (whole target positions per chunk), outputs in slot order."""
    m = hidden.shape[0]
    if m == 0:
        empty = _at_least_fp32(hidden.sum(-1))
        return (empty, empty, empty, empty.detach(), labels.new_zeros(0, top_k), empty.detach(), empty.detach())
    if target_hidden is None:
        parts = [VocabChunk.apply(hidden[s:s + chunk_slots], labels[s:s + chunk_slots], weight, bias, None, None,
                                  False, top_k) for s in range(0, m, chunk_slots)]
        return tuple(torch.cat(p) for p in zip(*parts))
    if target_index is None:  # one row per slot: every slot its own position
        target_index = torch.arange(m, device=hidden.device)
    if m <= chunk_slots:  # one chunk: no reordering
        used, inverse = torch.unique(target_index, return_inverse=True)
        return VocabChunk.apply(hidden, labels, weight, bias, target_hidden[used], inverse, need_overlap, top_k)
    used, order, row_of_ordered, bounds = _position_groups(target_index, chunk_slots)
    h_ord, y_ord = hidden[order], labels[order]
    parts = []
    for r0, r1, s0, s1 in bounds:
        parts.append(VocabChunk.apply(h_ord[s0:s1], y_ord[s0:s1], weight, bias, target_hidden[used[r0:r1]],
                                      row_of_ordered[s0:s1] - r0, need_overlap, top_k))
    back = torch.empty_like(order)
    back[order] = torch.arange(m, device=order.device)
    return tuple(torch.cat(p)[back] for p in zip(*parts))


__all__ = ["TopCandidates", "VocabChunk", "vocab_statistics"]
