"""The vocabulary stage without recompute (`train/vocab_stage.py`) against the code it replaced
(kept below verbatim as the reference: plain autograd, checkpointed chunks): values and gradients
for every loss, one chunk and several; and what it must not do (keep [M, V] tensors, run anything
vocabulary-sized in backward, compute a target row twice, grow with the number of chunks)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from dflash_lab.train import losses as L


# -- the reference: losses.py's slot_statistics before issue 13 --------------------------------------
def _at_least_fp32(x):
    return x if x.dtype == torch.float64 else x.float()


def _old_stats_chunk(hidden, labels, target_hidden, head_weight, head_bias, with_target, target_index=None):
    logits = _at_least_fp32(F.linear(hidden, head_weight, head_bias))  # [M, V]
    logq = torch.log_softmax(logits, dim=-1)
    ce = -logq.gather(-1, labels[:, None]).squeeze(-1)
    correct = (logits.detach().argmax(-1) == labels).to(ce.dtype)
    if not with_target:
        zero = torch.zeros_like(ce)
        return ce, zero, zero, correct
    with torch.no_grad():
        if target_index is None:
            rows, inverse = target_hidden, None
        else:
            used, inverse = torch.unique(target_index, return_inverse=True)
            rows = target_hidden[used]
        logp = torch.log_softmax(_at_least_fp32(F.linear(rows, head_weight, head_bias)).to(logq.dtype), dim=-1)
        if inverse is not None:
            logp = logp[inverse]
        p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    overlap = torch.minimum(p, logq.exp()).sum(-1)
    return ce, kl, overlap, correct


def old_slot_statistics(hidden, labels, lm_head, target_hidden=None, chunk_slots=1024, target_index=None):
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    with_target = target_hidden is not None
    m = hidden.shape[0]
    if m <= chunk_slots:
        return _old_stats_chunk(hidden, labels, target_hidden, weight, bias, with_target, target_index)
    parts = []
    for start in range(0, m, chunk_slots):
        sl = slice(start, start + chunk_slots)
        if target_index is not None:
            th, ti = target_hidden, target_index[sl]
        else:
            th, ti = (target_hidden[sl] if with_target else None), None
        if torch.is_grad_enabled():
            parts.append(checkpoint(_old_stats_chunk, hidden[sl], labels[sl], th, weight, bias, with_target, ti,
                                    use_reentrant=False))
        else:
            parts.append(_old_stats_chunk(hidden[sl], labels[sl], th, weight, bias, with_target, ti))
    return tuple(torch.cat(p) for p in zip(*parts))


# -- fixtures ----------------------------------------------------------------------------------------
V, H, NB, B, R = 37, 12, 6, 5, 9


def _head(bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    return head.requires_grad_(False)


def _batch(dtype=torch.float64, seed=1):
    """Blocks [NB, B] with a suffix of invalid slots, and a table of R target rows that slots share
    (overlapping blocks read the same position)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NB, B, H, generator=g, dtype=dtype)
    rows = torch.randn(R, H, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (NB, B), generator=g)
    index = torch.randint(0, R, (NB, B), generator=g)
    valid = torch.ones(NB, B, dtype=torch.bool)
    valid[:, 0] = False
    valid[1, 3:] = False
    valid[4, 2:] = False
    return hidden, rows, labels, index, valid


CASES = [
    L.LossConfig(name="ce", gamma=2.0),
    L.LossConfig(name="kd", alpha=0.0, gamma=3.0),
    L.LossConfig(name="kd", alpha=0.3, gamma=7.0),
    L.LossConfig(name="eal", eal_mode="greedy"),
    L.LossConfig(name="eal", eal_mode="sampled", kl_weight=0.5),
    L.LossConfig(name="survival-eal", eal_mode="greedy"),
    L.LossConfig(name="survival-eal", eal_mode="sampled"),
]


def _loss(stats_fn, cfg, head, hidden, rows, labels, index, valid, chunk_slots, **kw):
    h = hidden.clone().requires_grad_(True)
    with_target = L.needs_target_logits(cfg.name)
    ce, kl, ov, cor = stats_fn(h[valid], labels[valid], head, rows if with_target else None, chunk_slots,
                               target_index=index[valid] if with_target else None, **kw)
    ce_b, kl_b, ov_b = (L.scatter_slots(x, valid) for x in (ce, kl, ov))
    loss = L.combine(cfg, ce_b, kl_b, ov_b, valid)
    loss.backward()
    return loss.detach(), h.grad, cor


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-{c.eal_mode}-a{c.alpha}")
@pytest.mark.parametrize("chunk_slots", [1000, 4, 1])  # one chunk; several; one slot per chunk (positions span)
def test_every_loss_equals_the_old_stage(cfg, chunk_slots):
    head = _head()
    hidden, rows, labels, index, valid = _batch()
    ref, ref_grad, ref_cor = _loss(old_slot_statistics, cfg, head, hidden, rows, labels, index, valid, chunk_slots)
    got, grad, cor = _loss(L.slot_statistics, cfg, head, hidden, rows, labels, index, valid, chunk_slots,
                           need_overlap=L.needs_overlap(cfg))
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10), (float(got), float(ref))
    assert torch.allclose(grad, ref_grad, atol=1e-12, rtol=1e-9)
    assert grad.abs().sum() > 0
    assert torch.equal(cor, ref_cor)


@pytest.mark.parametrize("chunk_slots", [1000, 5])
@pytest.mark.parametrize("shared_rows", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_arbitrary_upstream_gradients_of_ce_kl_overlap(chunk_slots, shared_rows, bias):
    """The backward is exact for any combination of d ce, d kl, d overlap (not only the losses')."""
    head = _head(bias=bias)
    hidden, rows, labels, index, valid = _batch()
    h0, y = hidden[valid], labels[valid]
    if shared_rows:
        table, idx = rows, index[valid]
    else:
        table, idx = rows[index[valid]], None
    g = torch.Generator().manual_seed(7)
    up = [torch.randn(h0.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
    out = {}
    for name, fn in (("old", old_slot_statistics), ("new", L.slot_statistics)):
        h = h0.clone().requires_grad_(True)
        stats = fn(h, y, head, table, chunk_slots, target_index=idx)
        sum(u @ s for u, s in zip(up, stats[:3])).backward()
        out[name] = ([s.detach() for s in stats], h.grad)
    for a, b in zip(out["new"][0], out["old"][0]):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    assert torch.allclose(out["new"][1], out["old"][1], atol=1e-12, rtol=1e-9)


def test_overlap_subgradient_on_ties_matches_torch_minimum():
    """Where q_v == p_v exactly, torch.minimum gives each side half the gradient. Built so that
    some entries tie bit for bit and others do not: rows 2 and 3 of the head are zero (logit =
    bias for draft and target alike), rows 0 and 1 are +-1 and the target row is -h, so both
    partition functions sum the same four numbers."""
    head = torch.nn.Linear(1, 4).double().requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0], [0.0]], dtype=torch.float64))
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.3, -0.2], dtype=torch.float64))
    h0 = torch.tensor([[0.7], [-0.4], [1.3]], dtype=torch.float64)
    q = torch.softmax(head(h0), -1)
    p = torch.softmax(head(-h0), -1)
    assert torch.equal(q[:, 2:], p[:, 2:]) and not torch.any(q[:, :2] == p[:, :2])
    grads = []
    for fn in (old_slot_statistics, L.slot_statistics):
        h = h0.clone().requires_grad_(True)
        _, _, ov, _ = fn(h, torch.zeros(3, dtype=torch.long), head, -h0, 1000)
        (ov * torch.tensor([1.0, 2.0, -1.5], dtype=torch.float64)).sum().backward()
        grads.append(h.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-14)
    assert grads[0].abs().sum() > 0


def test_need_overlap_false_returns_zeros_and_same_ce_kl():
    head = _head()
    hidden, rows, labels, index, valid = _batch()
    full = L.slot_statistics(hidden[valid], labels[valid], head, rows, 4, target_index=index[valid])
    lean = L.slot_statistics(hidden[valid], labels[valid], head, rows, 4, target_index=index[valid], need_overlap=False)
    assert torch.equal(lean[0], full[0]) and torch.equal(lean[3], full[3])
    assert torch.allclose(lean[1], full[1], atol=1e-12)  # kl from p @ W (lean) or entry by entry (full)
    assert torch.all(lean[2] == 0) and torch.all(full[2] > 0)


def test_ce_only_and_empty_and_float32():
    head = _head(dtype=torch.float32)
    hidden, _, labels, _, valid = _batch(dtype=torch.float32)
    h = hidden[valid].clone().requires_grad_(True)
    ce, kl, ov, _ = L.slot_statistics(h, labels[valid], head, None, 3)
    h_ref = hidden[valid].clone().requires_grad_(True)
    ce_ref = old_slot_statistics(h_ref, labels[valid], head, None, 3)[0]
    ce.sum().backward()
    ce_ref.sum().backward()
    assert torch.allclose(ce, ce_ref, atol=1e-5) and torch.all(kl == 0) and torch.all(ov == 0)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)
    empty = L.slot_statistics(torch.zeros(0, H, requires_grad=True), torch.zeros(0, dtype=torch.long), head, None)
    assert all(x.shape == (0,) for x in empty)


def test_the_head_must_be_frozen():
    head = _head().requires_grad_(True)
    hidden, rows, labels, index, valid = _batch()
    with pytest.raises(ValueError, match="frozen lm_head"):
        L.slot_statistics(hidden[valid], labels[valid], head, rows, target_index=index[valid])


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("need_overlap", [False, True])
def test_backward_does_no_vocabulary_work_and_target_rows_run_once(need_overlap):
    """Backward: no matmul at all (the old stage's backward ran a [M, V] x [V, H] matmul, and with
    several chunks the whole chunk again). Forward: the same FLOPs for 1 and many chunks, i.e.
    every distinct target position once; exactly the expected matmuls."""
    head = _head()
    hidden, rows, labels, index, valid = _batch()
    m, r = int(valid.sum()), int(torch.unique(index[valid]).numel())
    counts = []
    for chunk_slots in (1000, 4, 1):
        h = hidden[valid].clone().requires_grad_(True)
        box = {}

        def fwd():
            box["s"] = L.slot_statistics(h, labels[valid], head, rows, chunk_slots, target_index=index[valid],
                                         need_overlap=need_overlap)
        forward = _flops(fwd)
        ce, kl, ov, _ = box["s"]
        backward = _flops(lambda: (ce.sum() + kl.sum() + ov.sum()).backward())
        assert backward == 0
        counts.append(forward)
    per_mm = 2 * V * H
    assert counts == [per_mm * ((2 + int(need_overlap)) * m + 2 * r)] * 3  # logits, q@W, [g@W]; teacher logits, p@W


def _saved_bytes_and_peak(chunk_slots, m=256, v=3000, h=32, old=False):
    from torch.distributed._tools.mem_tracker import MemTracker

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
    rows = torch.randn(64, h, generator=g)
    index = torch.randint(0, 64, (m,), generator=g)
    labels = torch.randint(0, v, (m,), generator=g)
    hidden = torch.randn(m, h, generator=g, requires_grad=True)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    tracker = MemTracker()
    tracker.track_external(hidden, head)
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn = old_slot_statistics if old else L.slot_statistics
        ce, kl, ov, _ = fn(hidden, labels, head, rows, chunk_slots, target_index=index)
        (ce.sum() + kl.sum() + ov.sum()).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return sum(saved), peak, m * v * 4


def test_memory_kept_for_backward_is_slot_sized_and_peak_does_not_grow_with_chunks():
    saved_1, peak_1, mv = _saved_bytes_and_peak(256)
    saved_8, peak_8, _ = _saved_bytes_and_peak(32)
    # what survives the forward: [M, H]-sized partial gradients, far below one [M, V] tensor
    assert saved_1 < mv / 10 and saved_8 < mv / 10
    assert peak_8 <= peak_1
    assert peak_8 < peak_1 / 3  # the transient [chunk, V] tensors shrink with the chunk
    # and the old checkpointed stage kept its [M, V] logits with one chunk
    saved_old, _, _ = _saved_bytes_and_peak(256, old=True)
    assert saved_old >= mv


def test_float32_kl_from_p_times_w_within_float_tolerance():
    """fp32 at a realistic logit scale: the KL from p @ W (no per-slot vocabulary work) stays within
    float tolerance of the entry-by-entry KL."""
    g = torch.Generator().manual_seed(0)
    v, h, m, r = 4000, 64, 96, 40
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.3)
    h0, rows = torch.randn(m, h, generator=g) * 2, torch.randn(r, h, generator=g) * 2
    idx, y = torch.randint(0, r, (m,), generator=g), torch.randint(0, v, (m,), generator=g)
    out = []
    for fn, kw in ((old_slot_statistics, {}), (L.slot_statistics, {"need_overlap": False})):
        hh = h0.clone().requires_grad_(True)
        ce, kl, _, _ = fn(hh, y, head, rows, 32, target_index=idx, **kw)
        (ce.sum() + kl.sum()).backward()
        out.append((ce.detach(), kl.detach(), hh.grad))
    assert out[0][1].mean() > 1.0  # a KL that is not trivially small
    assert torch.allclose(out[1][0], out[0][0], atol=1e-4) and torch.allclose(out[1][1], out[0][1], atol=1e-4)
    assert torch.allclose(out[1][2], out[0][2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_slots,with_target", [(1000, True), (4, True), (3, False)])
def test_top_k_candidates_are_the_full_logits_top_k_and_their_masses(chunk_slots, with_target):
    """DFlash2's selector takes its candidates from these logits: ids equal torch.topk of the whole
    logits, masses the softmax sums over them, in slot order across chunks regrouped by position."""
    head = _head()
    hidden, rows, labels, index, valid = _batch()
    h, y, idx = hidden[valid], labels[valid], index[valid]
    target = rows if with_target else None
    plain = L.slot_statistics(h, y, head, target, chunk_slots, target_index=idx if with_target else None)
    ce, kl, ov, correct, top = L.slot_statistics(h, y, head, target, chunk_slots,
                                                 target_index=idx if with_target else None, top_k=5)
    assert all(torch.equal(a, b) for a, b in zip((ce, kl, ov, correct), plain))  # the losses are untouched
    logits = head(h)
    values, ids = logits.topk(5, dim=-1)
    assert torch.equal(top.ids, ids)
    assert torch.allclose(top.draft_mass, torch.softmax(logits, -1).gather(-1, ids).sum(-1), atol=1e-12)
    if with_target:
        p = torch.softmax(head(rows[idx]), -1)
        assert torch.allclose(top.target_mass, p.gather(-1, ids).sum(-1), atol=1e-12)
    else:
        assert top.target_mass is None


class _VocabGathers(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shapes of every row gather (`aten.index`) whose rows are vocabulary-sized."""

    def __init__(self, v):
        super().__init__()
        self.v, self.shapes = v, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index.Tensor and out.dim() == 2 and out.shape[-1] == self.v:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("top_k", [0, 5])
def test_no_slot_by_vocabulary_gather_of_the_target_without_top_k(top_k):
    """Issue 23 item 7: with top_k == 0 and no overlap (every v1 kd step) the stage built an [m, V]
    gather of the target's log-probs per chunk only to read a top-0 mass from it (~0.6 GB per
    1,024-slot chunk of a 151k vocabulary on the peak). Only the selector's top-k needs it."""
    head = _head()
    hidden, rows, labels, index, valid = _batch()
    h, y, idx = hidden[valid], labels[valid], index[valid]
    ref = L.slot_statistics(h, y, head, rows, 1000, target_index=idx, need_overlap=False)
    with _VocabGathers(V) as spy:
        out = L.slot_statistics(h, y, head, rows, 1000, target_index=idx, need_overlap=False, top_k=top_k)
    assert (spy.shapes == []) == (top_k == 0), spy.shapes
    assert all(torch.equal(a, b) for a, b in zip(out[:4], ref))  # results unchanged


def _bf16_case(with_bias):
    """A draft close to its target (small KL, as after some training) at a realistic logit scale."""
    g = torch.Generator().manual_seed(0)
    v, h, m, r = 4000, 64, 96, 40
    head = torch.nn.Linear(h, v, bias=with_bias).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.3)
        if with_bias:
            head.bias.copy_(torch.randn(v, generator=g))
    rows = torch.randn(r, h, generator=g) * 2
    idx, y = torch.randint(0, r, (m,), generator=g), torch.randint(0, v, (m,), generator=g)
    return head, rows, idx, y, rows[idx] + 0.1 * torch.randn(m, h, generator=g)


def _kl_and_grad(fn, case, bf16, **kw):
    head, rows, idx, y, h0 = case
    hh = h0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ce, kl, _, _ = fn(hh, y, head, rows, 32, target_index=idx, **kw)
    (ce.sum() + kl.sum()).backward()
    return kl.detach().float(), hh.grad


@pytest.mark.parametrize("need_overlap", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_autocast_kl_and_gradients_within_plain_autocast_error(need_overlap, with_bias):
    """Issue 23 item 6: under bf16 autocast the stage must be as close to fp32 as plain autograd
    under the same autocast. Measured here (2026-12-07, max |KL - KL_fp32| per slot, KL mean 0.022;
    no bias / bias): plain autocast 0.0086 / 0.0114. Without overlap (the KL from p @ W), before the
    fix 0.082 / 0.080 with KLs down to -0.039 / -0.075 (a bf16 p @ W dotted with h against the lse
    of the bf16-rounded logits); after it (p @ W, q @ W in fp32, the lse moved to the unrounded
    logits) 0.0058 / 0.0055, no KL below 0. With overlap (entry by entry) 0.0086 / 0.0114 before
    and after. Gradients, relative error: plain 0.0162 / 0.0148, before 0.0163 / 0.0150, after
    0.0161 / 0.0146 (the bf16 logits' rounding dominates)."""
    case = _bf16_case(with_bias)
    ref_kl, ref_grad = _kl_and_grad(old_slot_statistics, case, bf16=False)
    plain_kl, plain_grad = _kl_and_grad(old_slot_statistics, case, bf16=True)
    kl, grad = _kl_and_grad(L.slot_statistics, case, bf16=True, need_overlap=need_overlap)
    assert float(ref_kl.mean()) < 0.05  # a small KL: where its error matters
    plain_err = float((plain_kl - ref_kl).abs().max())
    assert float((kl - ref_kl).abs().max()) <= max(plain_err, 1e-3), float((kl - ref_kl).abs().max())
    assert float(kl.min()) > -1e-3
    rel = lambda g: float((g - ref_grad).norm() / ref_grad.norm())  # noqa: E731
    assert rel(grad) <= 1.05 * rel(plain_grad), (rel(grad), rel(plain_grad))
