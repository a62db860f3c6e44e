"""The DFlash2 selector loss and metrics (SPEC section 10, training; reconstructed, see docs/dflash2.md).

For every valid slot k of a block with anchor p (flattened to M slots, like `losses.slot_statistics`):

    U        = the draft's unary logits (target lm_head of the final-normed state, x multiplier, softcap)
    C        = top-k(U) (k = 16)                                   no gradient through the choice
    a        = the TEACHER-FORCED predecessor: tok[p + k - 1] (the anchor for k = 1)
    S(a, b)  = U(b) + < A[a] * (W_h h), B[b] >      for b in C
    ce       = logsumexp_b S(a, b) - S(a, y)          y = tok[p + k], the gold token
    loss     = sum(w * ce * inc) / sum(w * inc)       w: the base loss's decay weights

When y is not in C (`gold_policy`):
    replace  y takes the place of the last (lowest-U) candidate, so every slot is trained
             (speculators);
    exclude  the slot leaves the loss (inc = 0) (SpecForge, NeMo Automodel).
Gradients reach the selector (codebooks, hidden projection) and, through U(b) and h, the backbone.

Metrics (no gradient), all over the valid slots:
    recall        y in C
    unary mass    the draft's softmax(U) mass on C
    target mass   the target's p_k mass on C (when the target's final hidden states are given)
    accuracy      argmax_b S(y_{k-1}, b) over the ORIGINAL C == y (teacher-forced)
    selector tau  1 + sum_k prod_{i<=k} accuracy_i per block. This IS the simulated tau of the
                  selector's own greedy walk: the walk's predecessor equals the gold token for as long
                  as every earlier slot was accepted, and after the first miss nothing counts.
    unary tau     the same chain for the unary argmax (what v1's metric measures; it ignores the selector)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dflash_lab.train.losses import position_weights, scatter_slots, simulated_tau

GOLD_POLICIES = ("replace", "exclude")


def teacher_forced_predecessors(block_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[..., B] -> [..., B]: the anchor for slot 1, the gold token of slot k - 1 for k >= 2 (slot 0:
    the anchor, never used). `block_ids` slot 0 is the anchor; `labels` slot k is tok[p + k]."""
    pred = torch.cat([block_ids[..., :1], labels[..., :-1]], dim=-1)
    pred[..., 1] = block_ids[..., 0]
    return pred


def slot_weights(valid: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """The decay weights w_k of every valid slot, flattened like `hidden[valid]`: [M]."""
    w = position_weights(valid.shape[-1], gamma, device=valid.device)
    return w.expand(valid.shape)[valid]


def _unary(draft, hidden, head_weight, head_bias):
    logits = torch.nn.functional.linear(hidden, head_weight, head_bias)
    return draft.process_unary(logits)


def _candidate_unary(draft, hidden, head_weight, head_bias, ids):
    """U at the given ids only, [m, n] for ids [m, n]: rows of the lm_head, not the whole vocabulary."""
    rows = head_weight[ids]  # [m, n, H]
    u = torch.matmul(rows, hidden.to(rows.dtype)[:, :, None])[..., 0]
    if head_bias is not None:
        u = u + head_bias[ids]
    return draft.process_unary(u)


def _candidates(draft, hidden, head_weight, head_bias, given_ids, given_mass):
    """(ids [m, k] sorted by U descending, their U values or None, the draft's softmax mass on them)."""
    if given_ids is not None:  # the caller's top-k (e.g. from logits it already computed): no [m, V] tensor here
        mass = given_mass if given_mass is not None else head_weight.new_full(given_ids.shape[:1], float("nan"))
        return given_ids, None, mass
    full = _unary(draft, hidden.detach(), head_weight, head_bias)  # [m, V]
    top_values, ids = torch.topk(full, draft.top_k, dim=-1)
    return ids, top_values, torch.softmax(full, dim=-1).gather(-1, ids).sum(-1)


def _selector_chunk(draft, hidden, head_weight, head_bias, gold, predecessor, replace: bool,
                    target_hidden=None, given_ids=None, given_mass=None, given_target_mass=None):
    with torch.no_grad():  # the candidate set: no gradient
        ids, top_values, unary_mass = _candidates(draft, hidden, head_weight, head_bias, given_ids, given_mass)
        in_top = (ids == gold[:, None]).any(-1)
    # the candidates' unary logits with gradient, gathered once: the metrics read them detached
    u = _candidate_unary(draft, hidden, head_weight, head_bias, ids)
    with torch.no_grad():
        top_values = u.detach() if top_values is None else top_values
        # teacher-forced choice among the ORIGINAL candidates (what decoding sees)
        scores0 = draft.selector_scores(hidden.detach(), top_values, ids, predecessor[:, None])[:, 0]
        correct = ids.gather(-1, scores0.argmax(-1, keepdim=True))[:, 0] == gold
        unary_correct = ids[:, 0] == gold
        target_mass = given_target_mass
        if target_mass is None and target_hidden is not None:
            t_logits = torch.nn.functional.linear(target_hidden, head_weight, head_bias)
            p = torch.softmax(t_logits if t_logits.dtype == torch.float64 else t_logits.float(), dim=-1)
            target_mass = p.gather(-1, ids).sum(-1)
        train_ids = ids.clone()
        if replace:
            # a where, not a boolean-mask write: no data-dependent shape (`dflash-lab plan` runs this on fake tensors)
            train_ids[:, -1] = torch.where(in_top, train_ids[:, -1], gold)
        gold_col = (train_ids == gold[:, None]).float().argmax(-1)  # any column when absent (excluded)
    if replace:  # the gold token's U where it replaces the last candidate
        u_gold = _candidate_unary(draft, hidden, head_weight, head_bias, gold[:, None])[:, 0]
        u = torch.cat([u[:, :-1], torch.where(in_top, u[:, -1], u_gold)[:, None]], dim=-1)
    scores = draft.selector_scores(hidden, u, train_ids, predecessor[:, None])[:, 0]  # [m, k]
    scores = scores if scores.dtype == torch.float64 else scores.float()
    ce = torch.logsumexp(scores, -1) - scores.gather(-1, gold_col[:, None])[:, 0]
    return ce, in_top, correct, unary_correct, unary_mass, target_mass


@dataclass
class SelectorLoss:
    loss: torch.Tensor  # scalar: sum(w * ce * inc) / (denominator or sum(w * inc))
    ce: torch.Tensor  # [M] per slot (meaningless where not included)
    included: torch.Tensor  # [M] bool: the slots in the loss
    in_top_k: torch.Tensor  # [M] bool: gold among the unary top-k
    correct: torch.Tensor  # [M] bool: teacher-forced selector choice == gold
    unary_correct: torch.Tensor  # [M] bool: unary argmax == gold
    unary_mass: torch.Tensor  # [M] the draft's softmax(U) mass on the candidates
    target_mass: torch.Tensor | None  # [M] the target's mass on the candidates
    included_weight: torch.Tensor | None = None  # scalar sum(w * included), detached: exclude's exact denominator


def selector_loss(draft, hidden: torch.Tensor, lm_head: torch.nn.Module, gold: torch.Tensor,
                  predecessor: torch.Tensor, weights: torch.Tensor, gold_policy: str = "replace", *,
                  chunk_slots: int = 1024, denominator: torch.Tensor | float | None = None,
                  target_hidden: torch.Tensor | None = None, target_index: torch.Tensor | None = None,
                  candidate_ids: torch.Tensor | None = None, candidate_mass: torch.Tensor | None = None,
                  candidate_target_mass: torch.Tensor | None = None) -> SelectorLoss:
    """The 16-way selector CE of the valid slots. hidden [M, H] (final-normed draft states),
    gold / predecessor [M] token ids, weights [M] (decay weights, 0 for slots to ignore).

    `denominator`: divide by this instead of sum(w * included) (e.g. the token-level mean's global
    sum(w * valid), which does not depend on the model). `target_hidden` [R, H] + `target_index` [M]:
    the target's final hidden state predicting each slot, for the target-mass metric only.
    `candidate_ids` [M, k]: the unary top-k when the caller already has it (sorted by U descending),
    with `candidate_mass` / `candidate_target_mass` [M] its draft / target mass when known (else the
    unary-mass metric is NaN and the target mass is computed here). The trainer passes all three from
    the base loss's own logits (`vocab_stage.TopCandidates`): no second pass over the vocabulary.
    With more than `chunk_slots` slots, each chunk is recomputed in backward (the top-k needs a
    [chunk, V] logit tensor)."""
    if gold_policy not in GOLD_POLICIES:
        raise ValueError(f"gold_policy {gold_policy!r}: choose one of {GOLD_POLICIES}")
    replace = gold_policy == "replace"
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    m = hidden.shape[0]
    parts = []
    for start in range(0, max(m, 1), chunk_slots):
        sl = slice(start, start + chunk_slots)
        th = target_hidden[target_index[sl]] if target_hidden is not None else None
        given = [x[sl] if x is not None else None for x in (candidate_ids, candidate_mass, candidate_target_mass)]
        if given[2] is not None:
            th = None  # the target's mass is known: no [chunk, V] target logits
        args = (draft, hidden[sl], weight, bias, gold[sl], predecessor[sl], replace, th, *given)
        if m > chunk_slots and torch.is_grad_enabled():
            parts.append(checkpoint(_selector_chunk, *args, use_reentrant=False))
        else:
            parts.append(_selector_chunk(*args))
    ce, in_top, correct, unary_correct, unary_mass = (torch.cat([p[i] for p in parts]) for i in range(5))
    known_target = target_hidden is not None or candidate_target_mass is not None
    target_mass = torch.cat([p[5] for p in parts]) if known_target else None
    included = torch.ones_like(in_top) if replace else in_top
    w = weights.to(ce.dtype) * included.to(ce.dtype)
    denom = w.sum().clamp_min(1e-12) if denominator is None else denominator
    loss = (w * ce).sum() / denom
    return SelectorLoss(loss, ce, included, in_top, correct, unary_correct, unary_mass, target_mass,
                        w.sum().detach())


def per_sequence_loss(out: SelectorLoss, weights: torch.Tensor, sequence_index: torch.Tensor,
                      num_sequences: int) -> torch.Tensor:
    """Each sequence's own normalised selector loss, [num_sequences] (0 for a sequence with no
    included slot): sum_seq(w * ce * inc) / sum_seq(w * inc), like `losses.combine` for the base loss.
    `sequence_index` [M]: the sequence of every slot (`arange(N)[:, None, None].expand_as(valid)[valid]`)."""
    w = weights.to(out.ce.dtype) * out.included.to(out.ce.dtype)
    num = out.ce.new_zeros(num_sequences).index_add(0, sequence_index, w * out.ce)
    den = out.ce.new_zeros(num_sequences).index_add(0, sequence_index, w)
    return num / den.clamp_min(1e-12)


@torch.no_grad()
def selector_stats(out: SelectorLoss, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metric SUMS as 0-d float64 tensors on the slots' device (no host sync; add them over
    micro-batches and ranks, then `summarise_stats`). `valid` [..., B] is the layout the M slots
    came from (`hidden[valid]`)."""
    blocks_valid = valid.reshape(-1, valid.shape[-1])
    has = blocks_valid.any(-1)
    sel_tau = simulated_tau(scatter_slots(out.correct.float(), valid).reshape_as(blocks_valid), blocks_valid)[has]
    una_tau = simulated_tau(scatter_slots(out.unary_correct.float(), valid).reshape_as(blocks_valid), blocks_valid)[has]
    stats = {
        "sel_slots": out.ce.new_tensor(float(out.ce.numel())), "sel_blocks": has.sum(),
        "sel_recall_sum": out.in_top_k.sum(), "sel_unary_mass_sum": out.unary_mass.sum(),
        "sel_accuracy_sum": out.correct.sum(), "sel_included_sum": out.included.sum(),
        "sel_ce_sum": (out.ce.detach() * out.included).sum(),
        "sel_tau_sum": sel_tau.sum(), "unary_tau_sum": una_tau.sum(),
    }
    if out.target_mass is not None:
        stats["sel_target_mass_sum"] = out.target_mass.sum()
    return {k: v.detach().double() for k, v in stats.items()}


def summarise_stats(stats: dict[str, float]) -> dict[str, float]:
    """Sums from `selector_stats` (tensors or floats) -> the logged means (floats)."""
    stats = {k: float(v) for k, v in stats.items()}
    slots, blocks = max(stats["sel_slots"], 1.0), max(stats["sel_blocks"], 1.0)
    out = {
        "selector_recall": stats["sel_recall_sum"] / slots,
        "selector_unary_mass": stats["sel_unary_mass_sum"] / slots,
        "selector_accuracy": stats["sel_accuracy_sum"] / slots,
        "selector_ce": stats["sel_ce_sum"] / max(stats["sel_included_sum"], 1.0),
        "selector_tau": stats["sel_tau_sum"] / blocks,
        "unary_tau": stats["unary_tau_sum"] / blocks,
    }
    if "sel_target_mass_sum" in stats:
        out["selector_target_mass"] = stats["sel_target_mass_sum"] / slots
    return out


__all__ = ["GOLD_POLICIES", "SelectorLoss", "selector_loss", "per_sequence_loss", "selector_stats", "summarise_stats",
           "teacher_forced_predecessors", "slot_weights"]
