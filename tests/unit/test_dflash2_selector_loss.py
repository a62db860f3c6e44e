"""The DFlash2 selector loss and its gradients against a plain loop; both gold policies; the metrics
(selector tau == the selector's own greedy walk)."""

import pytest
import torch

from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train.losses import position_weights
from dflash_lab.train.selector_loss import (
    per_sequence_loss,
    selector_loss,
    selector_stats,
    slot_weights,
    summarise_stats,
    teacher_forced_predecessors,
)

VOCAB, TOPK, RANK = 40, 5, 6


def setup(seed=0):
    target = wrap_target(tiny_model("qwen3", seed=1, vocab_size=VOCAB), mask_token_id=3)
    cfg = build_dflash2_config(target, num_layers=1, selector_rank=RANK, selector_top_k=TOPK)
    draft = DFlash2DraftModel(cfg).init_weights(seed=2).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.candidate_selector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    lm_head = target.lm_head.double()
    return target, draft, lm_head


def loop_selector_loss(draft, hidden, lm_head, gold, pred, weights, policy):
    """One slot at a time, every score a sum of Python-visible terms."""
    sel = draft.candidate_selector
    total, norm = 0.0, 0.0
    for m in range(hidden.shape[0]):
        u_full = lm_head(hidden[m])
        order = sorted(range(VOCAB), key=lambda v: -float(u_full[v].detach()))[:TOPK]
        y = int(gold[m])
        if y not in order:
            if policy == "exclude":
                continue
            order[-1] = y
        gate = sel.hidden_projection.weight @ hidden[m]
        a = int(pred[m])
        scores = torch.stack([u_full[b] + (sel.predecessor_codebook[a] * gate * sel.successor_codebook[b]).sum()
                              for b in order])
        ce = torch.logsumexp(scores, 0) - scores[order.index(y)]
        total = total + weights[m] * ce
        norm = norm + weights[m]
    return total / norm


@pytest.mark.parametrize("policy", ["replace", "exclude"])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_selector_loss_and_gradients_match_the_loop(policy, chunk):
    target, draft, lm_head = setup()
    torch.manual_seed(3)
    m = 11
    hidden0 = torch.randn(m, 64, dtype=torch.float64)
    unary = lm_head(hidden0).detach()
    top = unary.topk(TOPK, -1).indices
    # gold: inside the top-k for some slots, outside for others
    gold = torch.where(torch.arange(m) % 3 == 0, unary.argmin(-1), top[torch.arange(m), torch.arange(m) % TOPK])
    pred = torch.randint(0, VOCAB, (m,))
    weights = torch.rand(m, dtype=torch.float64) + 0.1

    def grads(fn):
        draft.zero_grad()
        hidden = hidden0.clone().requires_grad_(True)
        loss = fn(hidden)
        loss.backward()
        sel = draft.candidate_selector
        return loss.detach(), [hidden.grad.clone(), sel.predecessor_codebook.grad.clone(),
                               sel.successor_codebook.grad.clone(), sel.hidden_projection.weight.grad.clone()]

    ref_loss, ref_g = grads(lambda h: loop_selector_loss(draft, h, lm_head, gold, pred, weights, policy))
    for given in (None, top):  # our own top-k, or the caller's
        loss, g = grads(lambda h: selector_loss(draft, h, lm_head, gold, pred, weights, policy, chunk_slots=chunk,
                                                candidate_ids=given).loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    out = selector_loss(draft, hidden0, lm_head, gold, pred, weights, policy)
    in_top = torch.tensor([int(gold[i]) in top[i].tolist() for i in range(m)])
    assert torch.equal(out.in_top_k, in_top) and 0 < int(in_top.sum()) < m
    assert torch.equal(out.included, in_top if policy == "exclude" else torch.ones(m, dtype=torch.bool))
    torch.testing.assert_close(out.included_weight, (weights * out.included).sum())


def test_teacher_forced_predecessors_and_slot_weights():
    block_ids = torch.tensor([[7, 3, 3, 3], [9, 3, 3, 3]])
    labels = torch.tensor([[0, 11, 12, 13], [0, 21, 22, 23]])
    pred = teacher_forced_predecessors(block_ids, labels)
    assert pred[:, 1:].tolist() == [[7, 11, 12], [9, 21, 22]]  # anchor, then the gold token at p + k - 1
    valid = torch.tensor([[False, True, True, False], [False, True, True, True]])
    w = position_weights(4, 4.0)
    assert torch.equal(slot_weights(valid, 4.0), torch.stack([w[1], w[2], w[1], w[2], w[3]]))


def test_selector_tau_is_the_tau_of_the_selectors_own_greedy_walk():
    target, draft, lm_head = setup(seed=5)
    torch.manual_seed(6)
    nb, bsz = 12, 8
    hidden = torch.randn(nb, bsz, 64, dtype=torch.float64)
    anchors = torch.randint(0, VOCAB, (nb,))
    walk, _, _ = draft.greedy_walk(hidden[:, 1:], anchors, lm_head)
    # gold = the walk with one corruption at a varying slot (some blocks fully accepted)
    labels = torch.zeros(nb, bsz, dtype=torch.long)
    labels[:, 1:] = walk
    for b in range(nb):
        k = b % 9
        if 1 <= k < bsz:
            labels[b, k] = (labels[b, k] + 1) % VOCAB
    valid = torch.ones(nb, bsz, dtype=torch.bool)
    valid[:, 0] = False
    valid[0, 5:] = False  # a block cut by the end of the response
    block_ids = torch.full((nb, bsz), 3)
    block_ids[:, 0] = anchors
    pred = teacher_forced_predecessors(block_ids, labels)[valid]
    out = selector_loss(draft, hidden[valid], lm_head, labels[valid], pred, slot_weights(valid, 4.0))
    stats = summarise_stats(selector_stats(out, valid))
    # brute force: walk each block, count the leading accepted slots
    expected = []
    for b in range(nb):
        accepted = 0
        for k in range(1, bsz):
            if not valid[b, k] or int(walk[b, k - 1]) != int(labels[b, k]):
                break
            accepted += 1
        expected.append(1 + accepted)
    assert stats["selector_tau"] == pytest.approx(sum(expected) / nb)
    unary_argmax = lm_head(hidden).argmax(-1)
    unary_expected = []
    for b in range(nb):
        accepted = 0
        for k in range(1, bsz):
            if not valid[b, k] or int(unary_argmax[b, k]) != int(labels[b, k]):
                break
            accepted += 1
        unary_expected.append(1 + accepted)
    assert stats["unary_tau"] == pytest.approx(sum(unary_expected) / nb)
    assert stats["selector_tau"] != stats["unary_tau"]  # the random selector really departs from the argmax
    assert 0 < stats["selector_recall"] <= 1 and 0 < stats["selector_unary_mass"] <= 1


def test_target_mass_metric():
    target, draft, lm_head = setup()
    hidden = torch.randn(4, 64, dtype=torch.float64)
    t_rows = torch.randn(3, 64, dtype=torch.float64)
    t_index = torch.tensor([2, 0, 0, 1])
    gold = torch.tensor([1, 2, 3, 4])
    out = selector_loss(draft, hidden, lm_head, gold, gold, torch.ones(4, dtype=torch.float64),
                        target_hidden=t_rows, target_index=t_index)
    top = lm_head(hidden).topk(TOPK, -1).indices
    p = torch.softmax(lm_head(t_rows[t_index]), -1)
    torch.testing.assert_close(out.target_mass, torch.stack([p[i, top[i]].sum() for i in range(4)]).detach())


@pytest.mark.parametrize("policy", ["replace", "exclude"])
def test_per_sequence_loss_is_each_sequences_own_selector_loss(policy):
    target, draft, lm_head = setup()
    torch.manual_seed(8)
    hidden = torch.randn(9, 64, dtype=torch.float64)
    gold = torch.randint(0, VOCAB, (9,))
    pred = torch.randint(0, VOCAB, (9,))
    weights = torch.rand(9, dtype=torch.float64) + 0.1
    seq = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 2])  # sequence 1 has no slot
    out = selector_loss(draft, hidden, lm_head, gold, pred, weights, policy)
    got = per_sequence_loss(out, weights, seq, 3)
    for s in (0, 2):
        rows = seq == s
        alone = selector_loss(draft, hidden[rows], lm_head, gold[rows], pred[rows], weights[rows], policy)
        if alone.included.any():
            torch.testing.assert_close(got[s], alone.loss)
    assert float(got[1].detach()) == 0.0


def test_the_trainers_forward_batch_runs_a_dflash2_draft_and_the_selector_loss_adds_on():
    """The trainer's real forward (base loss) takes a DFlash2 draft as it is; the selector loss on the
    same slots, laid out as the docs tell the trainer, trains the conv and the selector."""
    from dflash_lab.train import blocks as B
    from dflash_lab.train.data import Sample
    from dflash_lab.train.losses import LossConfig
    from dflash_lab.train.trainer import forward_batch

    target = wrap_target(tiny_model("qwen3", seed=1, vocab_size=VOCAB), mask_token_id=3)
    draft = DFlash2DraftModel(build_dflash2_config(target, num_layers=1, selector_rank=RANK,
                                                   selector_top_k=TOPK)).init_weights(seed=2)
    ids = torch.randint(4, VOCAB, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    sample = Sample("s", "math", ids, [0] * 6 + [1] * 24)
    _, feats = target.forward(torch.tensor([ids]), draft.target_layer_ids)
    features = [(feats[0], torch.zeros(30, 64))]
    cfg = LossConfig(name="ce", gamma=4.0, selector_alpha=0.0)  # the base loss alone (1.0 adds the selector)
    loss, stats = forward_batch(draft, draft.config, target, features, [sample], [7], num_anchors=6, loss_cfg=cfg)
    loss.backward()
    conv = draft.layers[0].attention_conv
    assert conv.kernel_projection.weight.grad.abs().sum() > 0 and conv.base_kernel.grad.abs().sum() > 0
    assert draft.candidate_selector.successor_codebook.grad is None  # the base loss never reads the selector
    # the selector loss on the same layout (what the docs tell the trainer to add)
    mask = torch.tensor(sample.loss_mask)
    anchors = B.sample_anchors(mask, 6, torch.Generator().manual_seed(7))
    block_ids, positions, labels, valid = B.build_blocks(torch.tensor(ids), mask, anchors, 8, 3)
    hidden = draft(target.embed(block_ids.view(1, -1)), positions.view(1, -1), feats, torch.arange(30)[None],
                   attention=B.make_attention("chunked", anchors[None], 8)).view(len(anchors), 8, -1)
    pred = teacher_forced_predecessors(block_ids, labels)[valid]
    out = selector_loss(draft, hidden[valid], target.lm_head, labels[valid], pred, slot_weights(valid, 4.0))
    out.loss.backward()
    assert draft.candidate_selector.successor_codebook.grad.abs().sum() > 0  # zero init still learns
    assert stats["valid_slots"] == float(valid.sum())


def test_heldout_metrics_give_the_walk_tau_and_the_unary_tau_beside_it():
    """The held-out score of a DFlash2 draft is the selector walk's tau; the unary-argmax tau beside it
    ignores the selector: equal at init (zero successor codebook), apart once the selector is live,
    and the unary one unchanged by the selector's weights."""
    from dflash_lab.train import distributed as D
    from dflash_lab.train.data import Sample
    from dflash_lab.train.step import heldout_metrics

    target = wrap_target(tiny_model("qwen3", seed=1, vocab_size=VOCAB), mask_token_id=3)
    draft = DFlash2DraftModel(build_dflash2_config(target, num_layers=1, selector_rank=RANK,
                                                   selector_top_k=TOPK)).init_weights(seed=2, std=0.3)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(3):
        ids = torch.randint(4, VOCAB, (30,), generator=gen).tolist()
        samples.append(Sample(f"s{i}", "math", ids, [0] * 6 + [1] * 24))

    class Split(list):
        def sample(self, j):
            return self[j]

    class Features:
        def get(self, batch):
            out = []
            for s in batch:
                _, feats = target.forward(torch.tensor([s.input_ids]), draft.target_layer_ids)
                out.append((feats[0], torch.zeros(len(s.input_ids), 64)))
            return out

    def measure():
        return heldout_metrics(draft, draft.config, target, Features(), Split(samples), {"num_anchors": 6},
                               D.DistInfo(), seed=3)

    fresh = measure()
    assert fresh.keys() == {"heldout_tau", "heldout_unary_tau"} and fresh["heldout_tau"] == fresh["heldout_unary_tau"]
    with torch.no_grad():
        for p in draft.candidate_selector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3)
    live = measure()
    assert live["heldout_unary_tau"] == fresh["heldout_unary_tau"]
    assert live["heldout_tau"] != fresh["heldout_tau"]
    assert heldout_metrics(draft, draft.config, target, Features(), Split(), {"num_anchors": 6}, D.DistInfo(), 3) == {}


@pytest.mark.parametrize("gold", ["replace", "exclude"])
def test_the_trainer_takes_the_candidates_from_the_base_losss_logits(monkeypatch, gold):
    """forward_batch gives the selector the top-16 of the logits its base loss already computed: the
    same loss, gradients and metrics as the selector's own pass over the vocabulary, without it."""
    from torch.utils.flop_counter import FlopCounterMode

    from dflash_lab.train import step as S
    from dflash_lab.train.data import Sample
    from dflash_lab.train.losses import LossConfig

    target = wrap_target(tiny_model("qwen3", seed=1, vocab_size=VOCAB), mask_token_id=3)
    cfg = build_dflash2_config(target, num_layers=1, selector_rank=RANK, selector_top_k=TOPK)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (30,), generator=gen).tolist()
    sample = Sample("s", "math", ids, [0] * 6 + [1] * 24)
    _, feats = target.forward(torch.tensor([ids]), cfg.target_layer_ids)
    features = [(feats[0], torch.randn(30, 64, generator=gen))]  # the target's final states: KL and target mass
    loss_cfg = LossConfig(name="kd", alpha=0.5, gamma=4.0, selector_alpha=1.0, selector_gold=gold)
    runs = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(S, "_shared_top_k", lambda draft_module: 0)
        draft = DFlash2DraftModel(cfg).init_weights(seed=2, std=0.3)
        with torch.no_grad():
            for p in draft.candidate_selector.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        with FlopCounterMode(display=False) as flops:
            loss, stats = S.forward_batch(draft, cfg, target, features, [sample], [7], num_anchors=6, loss_cfg=loss_cfg)
        loss.backward()
        runs.append((loss, stats, {n: p.grad for n, p in draft.named_parameters() if p.grad is not None},
                     flops.get_total_flops()))
    (loss_a, stats_a, grads_a, flops_a), (loss_b, stats_b, grads_b, flops_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and "candidate_selector.successor_codebook" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    for key in ("sel_tau_sum", "sel_accuracy_sum", "sel_recall_sum", "sel_unary_mass_sum", "sel_target_mass_sum"):
        assert torch.allclose(stats_a[key], stats_b[key]), (key, float(stats_a[key]), float(stats_b[key]))
    slots = int(stats_a["valid_slots"])
    # saved: the selector's own [M, V] logits and the target's, and nothing spent instead (both take U
    # of the 16 candidates from their lm_head rows, once)
    assert flops_b - flops_a == 2 * 2 * slots * VOCAB * 64
