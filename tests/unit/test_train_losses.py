"""Every training loss against a brute-force reference written with explicit Python loops
(float64, tiny vocabulary): values and gradients."""

import math

import pytest
import torch

from dflash_lab.train import losses as L

V, H, B, NB = 7, 5, 5, 4


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    head.requires_grad_(False)
    hidden = torch.randn(NB, B, H, generator=g, dtype=torch.float64)
    target_hidden = torch.randn(NB, B, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (NB, B), generator=g)
    valid = torch.tensor([
        [False, True, True, True, True],
        [False, True, True, False, False],   # block cut by the end of the sequence
        [False, True, False, True, True],    # an invalid slot in the middle cuts the chain
        [False, True, True, True, False],
    ])
    return head, hidden, target_hidden, labels, valid


# -- the reference: loops only ------------------------------------------------------------------
def _log_softmax_loop(x, W):
    logits = [sum(W[v, h] * x[h] for h in range(H)) for v in range(V)]
    m = max(float(z.detach()) for z in logits)
    lse = m + torch.log(sum(torch.exp(z - m) for z in logits))
    return [z - lse for z in logits]


def reference_loss(cfg, head, hidden, target_hidden, labels, valid):
    """The loss over ALL the given blocks as one batch: every sum runs over every slot (token level)."""
    W = head.weight
    nb = hidden.shape[0]
    per_slot = {}
    for b in range(nb):
        for k in range(1, B):
            if not valid[b, k]:
                continue
            logq = _log_softmax_loop(hidden[b, k], W)
            logp = [z.detach() for z in _log_softmax_loop(target_hidden[b, k], W)]
            y = int(labels[b, k])
            ce = -logq[y]
            kl = sum(torch.exp(logp[v]) * (logp[v] - logq[v]) for v in range(V))
            overlap = sum(torch.minimum(torch.exp(logp[v]), torch.exp(logq[v])) for v in range(V))
            per_slot[b, k] = (ce, kl, overlap)
    if cfg.name in ("ce", "kd"):
        num, den = 0.0, 0.0
        for (b, k), (ce, kl, _) in per_slot.items():
            w = 1.0 if cfg.gamma is None else math.exp(-(k - 1) / cfg.gamma)
            value = ce if cfg.name == "ce" else cfg.alpha * ce + (1 - cfg.alpha) * kl
            num = num + w * value
            den += w
        return num / den
    kl_weight = cfg.kl_term
    if cfg.name == "dpace":
        return reference_dpace(cfg, per_slot, valid) + kl_weight * reference_survival_kl(cfg, per_slot, valid)
    # eal / survival-eal
    eal_total, blocks = 0.0, 0
    kl_num, kl_den = 0.0, 0.0
    for b in range(nb):
        chain, total, has_valid = 1.0, 0.0, False
        survival = 1.0
        for k in range(1, B):
            if (b, k) in per_slot:
                ce, kl, overlap = per_slot[b, k]
                has_valid = True
                w = 1.0 if cfg.name == "eal" else float(survival)
                kl_num = kl_num + w * kl
                kl_den += w
                a = torch.exp(-ce) if cfg.eal_mode == "greedy" else overlap
            else:
                a = 0.0  # no label: the chain of acceptances stops here
            chain = chain * a
            survival = float(chain.detach()) if torch.is_tensor(chain) else chain  # s_{k+1}, detached
            total = total + chain
        if has_valid:
            eal_total = eal_total + total
            blocks += 1
    return -eal_total / blocks + kl_weight * kl_num / kl_den


def reference_survival_kl(cfg, per_slot, valid):
    """sum_k s_k kl_k / sum_k s_k, s_k = prod_{i<k} a_i (detached), over every valid slot."""
    num, den = 0.0, 0.0
    for b in range(valid.shape[0]):
        survival = 1.0
        for k in range(1, valid.shape[1]):
            if (b, k) not in per_slot:
                survival = 0.0
                continue
            ce, kl, overlap = per_slot[b, k]
            num = num + survival * kl
            den += survival
            a = torch.exp(-ce) if cfg.eal_mode == "greedy" else overlap
            survival = survival * float(a.detach())
    return num / den


def reference_dpace(cfg, per_slot, valid):
    """D-PACE as its paper writes it: w_k = sum_{j>=k} prod_{i<=j} q~_i (detached) on the CE."""
    num, den, anchors = 0.0, 0.0, 0
    bsz = valid.shape[1]
    for b in range(valid.shape[0]):
        slots = [k for k in range(1, bsz) if (b, k) in per_slot]
        if not slots:
            continue
        anchors += 1
        # acceptance stops at the first slot without a label
        run = []
        for k in range(1, bsz):
            if (b, k) not in per_slot:
                break
            run.append(k)
        q_tilde = {k: cfg.dpace_alpha + (1 - cfg.dpace_alpha) * math.exp(-float(per_slot[b, k][0].detach())) for k in run}
        for k in slots:
            w = sum(math.prod(q_tilde[i] for i in run if i <= j) for j in run if j >= k)
            num = num + w * per_slot[b, k][0]
            den += w
    return num / (anchors if cfg.normalize == "anchors" else den)


def ours(cfg, head, hidden, target_hidden, labels, valid, chunk_slots):
    h_sel = hidden[valid]
    ce, kl, ov, _ = L.slot_statistics(h_sel, labels[valid], head, target_hidden[valid], chunk_slots=chunk_slots)
    ce, kl, ov = (L.scatter_slots(x, valid) for x in (ce, kl, ov))
    return L.combine(cfg, ce, kl, ov, valid)


CASES = [
    L.LossConfig(name="ce", gamma=2.0),
    L.LossConfig(name="ce", gamma=None),
    L.LossConfig(name="kd", alpha=0.0, gamma=3.0),
    L.LossConfig(name="kd", alpha=0.3, gamma=7.0),
    L.LossConfig(name="eal", eal_mode="greedy"),
    L.LossConfig(name="eal", eal_mode="sampled", kl_weight=0.5),
    L.LossConfig(name="survival-eal", eal_mode="greedy"),
    L.LossConfig(name="survival-eal", eal_mode="sampled"),
    L.LossConfig(name="dpace", dpace_alpha=0.5, kl_weight=None),
    L.LossConfig(name="dpace", dpace_alpha=0.3, normalize="weights", kl_weight=0.0),
    L.LossConfig(name="dpace", dpace_alpha=0.5, kl_weight=0.7),
    L.LossConfig(name="dpace", dpace_alpha=0.2, eal_mode="sampled", normalize="weights", kl_weight=1.0),
]


def _case_id(c):
    return f"{c.name}-{c.eal_mode}-a{c.alpha}-g{c.gamma}-kw{c.kl_weight}-da{c.dpace_alpha}-{c.normalize}"


@pytest.mark.parametrize("cfg", CASES, ids=_case_id)
@pytest.mark.parametrize("chunk_slots", [1000, 3])  # one chunk, and several
def test_loss_matches_loop_reference(cfg, chunk_slots):
    head, hidden, target_hidden, labels, valid = _setup()
    h_ref = hidden.clone().requires_grad_(True)
    ref = reference_loss(cfg, head, h_ref, target_hidden, labels, valid)
    ref.backward()
    h_ours = hidden.clone().requires_grad_(True)
    got = ours(cfg, head, h_ours, target_hidden, labels, valid, chunk_slots)
    got.backward()
    assert torch.allclose(got, ref.detach(), atol=1e-10, rtol=1e-9), (float(got), float(ref))
    assert torch.allclose(h_ours.grad, h_ref.grad, atol=1e-10, rtol=1e-8)
    assert h_ours.grad.abs().sum() > 0
    # slot 0 and invalid slots get no gradient
    assert torch.all(h_ours.grad[~valid] == 0)


def test_position_weights_and_tau():
    w = L.position_weights(16, 7.0)
    assert w[1] == pytest.approx(1.0) and w[8] == pytest.approx(math.exp(-1.0))
    correct = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1.0]])
    valid = torch.tensor([[False, True, True, True, True], [False, True, True, True, False], [False] + [True] * 4])
    assert L.simulated_tau(correct, valid).tolist() == [3.0, 4.0, 1.0]


def test_survival_weights_are_detached_prefix_products():
    a = torch.tensor([[9.0, 0.5, 0.4, 0.2, 0.1]], requires_grad=True)
    valid = torch.tensor([[False, True, True, True, True]])
    s = L.survival_weights(a, valid)
    assert not s.requires_grad
    assert torch.allclose(s[0, 1:], torch.tensor([1.0, 0.5, 0.2, 0.04]))


def test_dpace_equivalence_greedy_eal_gradient():
    """d EAL / d log a_k = sum_{j>=k} prod_{i<=j} a_i (D-PACE's weight with alpha = 0)."""
    loga = torch.log(torch.tensor([[1.0, 0.9, 0.5, 0.7, 0.3]])).requires_grad_(True)
    valid = torch.tensor([[False, True, True, True, True]])
    L.expected_acceptance(loga.exp(), valid).sum().backward()
    a = loga.detach().exp()[0]
    for k in range(1, 5):
        expected = sum(float(torch.prod(a[1:j + 1])) for j in range(k, 5))
        assert loga.grad[0, k].item() == pytest.approx(expected)


@pytest.mark.parametrize("chunk_slots", [1000, 4])
def test_shared_position_rows_equal_per_slot_rows(chunk_slots):
    """The trainer passes one target row per position plus an index; same values and gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False).double().requires_grad_(False)
    rows = torch.randn(6, 8, dtype=torch.float64)
    index = torch.tensor([0, 2, 2, 5, 1, 0, 5, 5, 3, 2])
    labels = torch.randint(0, 13, (10,))
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    per_slot = L.slot_statistics(hidden, labels, head, rows[index], chunk_slots=chunk_slots)
    shared = L.slot_statistics(hidden, labels, head, rows, chunk_slots=chunk_slots, target_index=index)
    for a, b in zip(per_slot, shared):
        assert torch.allclose(a, b)
    g1, = torch.autograd.grad(per_slot[1].sum() + per_slot[0].sum(), hidden)
    g2, = torch.autograd.grad(shared[1].sum() + shared[0].sum(), hidden)
    assert torch.allclose(g1, g2)


# -- token level over the whole optimizer step -----------------------------------------------------
def _two_sequences(seed=1):
    """A short sequence (1 block, 2 valid slots) and a long one (6 blocks), as blocks [nb, B]."""
    g = torch.Generator().manual_seed(seed)
    head, *_ = _setup(seed)
    nb = 7
    hidden = torch.randn(nb, B, H, generator=g, dtype=torch.float64)
    target_hidden = torch.randn(nb, B, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (nb, B), generator=g)
    valid = torch.ones(nb, B, dtype=torch.bool)
    valid[:, 0] = False
    valid[0, 3:] = False          # the short sequence: one block cut after two slots
    valid[6, 4:] = False          # the long sequence's last block reaches its end
    return head, hidden, target_hidden, labels, valid, [slice(0, 1), slice(1, 7)]


@pytest.mark.parametrize("cfg", CASES, ids=_case_id)
def test_token_level_over_short_and_long_sequence(cfg):
    """Every slot of the step weighs the same, whichever sequence it is in: the shares of the two
    sequences, each normalised by the step's denominators, add up to the loop reference over all
    blocks (values and gradients); the old mean of per-sequence losses does not."""
    head, hidden, target_hidden, labels, valid, parts = _two_sequences()
    h_ref = hidden.clone().requires_grad_(True)
    ref = reference_loss(cfg, head, h_ref, target_hidden, labels, valid)
    ref.backward()

    h = hidden.clone().requires_grad_(True)
    stats = []
    for sl in parts:
        ce, kl, ov, _ = L.slot_statistics(h[sl][valid[sl]], labels[sl][valid[sl]], head, target_hidden[sl][valid[sl]])
        stats.append(tuple(L.scatter_slots(x, valid[sl]) for x in (ce, kl, ov)) + (valid[sl],))
    dens = sum(L.static_denominators(cfg, v) + L.model_denominators(cfg, ce, ov, v) for ce, _, ov, v in stats)
    total = sum(L.combine(cfg, ce, kl, ov, v, dens) for ce, kl, ov, v in stats)
    total.backward()
    assert torch.allclose(total, ref.detach(), atol=1e-10, rtol=1e-9), (float(total), float(ref))
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-10, rtol=1e-8)
    per_sequence_mean = sum(L.combine(cfg, ce, kl, ov, v) for ce, kl, ov, v in stats) / len(stats)
    assert not torch.isclose(per_sequence_mean, total)


def test_dpace_at_alpha_zero_has_greedy_eal_gradient():
    head, hidden, target_hidden, labels, valid = _setup(3)
    grads = []
    for cfg in (L.LossConfig(name="dpace", dpace_alpha=0.0, kl_weight=0.0),
                L.LossConfig(name="eal", eal_mode="greedy", kl_weight=0.0)):
        h = hidden.clone().requires_grad_(True)
        ours(cfg, head, h, target_hidden, labels, valid, 1000).backward()
        grads.append(h.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=1e-10)
    # with alpha > 0 the weights differ: the identity is not a tautology of the test
    h = hidden.clone().requires_grad_(True)
    ours(L.LossConfig(name="dpace", dpace_alpha=0.5, kl_weight=0.0), head, h, target_hidden, labels, valid, 1000).backward()
    assert not torch.allclose(h.grad, grads[1], atol=1e-6)


def test_dpace_weights_match_the_definition():
    q = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.3]])
    valid = torch.tensor([[False, True, True, True, True]])
    w = L.dpace_weights(q, valid, 0.5)
    qt = [None] + [0.5 + 0.5 * float(x) for x in q[0, 1:]]
    for k in range(1, 5):
        assert float(w[0, k]) == pytest.approx(sum(math.prod(qt[1:j + 1]) for j in range(k, 5)))
    assert L.needs_model_denominators(L.LossConfig(name="dpace", kl_weight=0.0)) is False
    assert L.needs_model_denominators(L.LossConfig(name="dpace", kl_weight=0.0, normalize="weights"))
    assert L.needs_target_logits("dpace") is False and L.needs_target_logits("dpace", kl_weight=0.5)


def test_recipe_keys_reach_the_loss_config():
    from dflash_lab.train.recipe import load_recipe
    from dflash_lab.train.trainer import _loss_config

    cfg = _loss_config(load_recipe(None, ["loss.name=dpace", "loss.dpace_alpha=0.25", "loss.normalize=weights"]).loss)
    assert (cfg.name, cfg.dpace_alpha, cfg.normalize, cfg.kl_term) == ("dpace", 0.25, "weights", 0.0)
    assert _loss_config(load_recipe(None, ["loss.name=survival-eal"]).loss).kl_term == 1.0
    assert _loss_config(load_recipe(None, ["loss.name=dpace", "loss.kl_weight=0.5"]).loss).kl_term == 0.5
