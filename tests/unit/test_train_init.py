"""Draft initialisation from the target's last layers (a CPU-efficiency lever)."""

import pytest
import torch

from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train.trainer import init_from_target_layers


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_init_from_target_layers(kind):
    target = wrap_target(tiny_model(kind), mask_token_id=5)
    cfg = build_draft_config(target, num_layers=2, block_size=4)
    draft = DFlashDraftModel(cfg).init_weights(0)
    copied = init_from_target_layers(draft, target)
    layers = target.model.model.layers
    for i, src in enumerate([layers[-2], layers[-1]]):
        dst = draft.layers[i]
        assert torch.equal(dst.self_attn.q_proj.weight, src.self_attn.q_proj.weight)
        assert torch.equal(dst.mlp.down_proj.weight, src.mlp.down_proj.weight)
        assert torch.equal(dst.input_layernorm.weight, src.input_layernorm.weight)
        if kind == "qwen3":
            assert torch.equal(dst.self_attn.k_norm.weight, src.self_attn.k_norm.weight)
        else:
            assert torch.all(dst.self_attn.k_norm.weight == 1)
    assert torch.equal(draft.norm.weight, target.model.model.norm.weight)
    h = cfg.hidden_size
    fc = draft.fc.weight
    assert torch.equal(fc[:, -h:], torch.eye(h)) and torch.all(fc[:, :-h] == 0)
    assert "layers.1.self_attn.o_proj.weight" in copied
    # default ids for 2 of 6 layers are [1, 3]: feature 3 is the input of layer 4, the first copied
    assert cfg.target_layer_ids[-1] == len(layers) - 3 and "hidden_norm.weight" in copied
    assert torch.equal(draft.hidden_norm.weight, layers[-2].input_layernorm.weight)
    other = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=4, target_layer_ids=[1, 2])).init_weights(0)
    assert "hidden_norm.weight" not in init_from_target_layers(other, target)
    assert torch.all(other.hidden_norm.weight == 1)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_init_from_target_layers_feature_feeding_the_copied_layer(kind):
    """With the feature that feeds the copied layer, the draft's context K/V are the target's own."""
    target = wrap_target(tiny_model(kind), mask_token_id=5)
    n_layers = target.num_layers
    with torch.no_grad():  # a norm weight that is not all ones, so a missed copy shows
        target.model.model.layers[-1].input_layernorm.weight.uniform_(0.5, 1.5)
    cfg = build_draft_config(target, num_layers=1, block_size=4, target_layer_ids=[n_layers - 2])
    draft = DFlashDraftModel(cfg).init_weights(0)
    assert "hidden_norm.weight" in init_from_target_layers(draft, target)
    last = target.model.model.layers[-1]
    ids = torch.tensor([[3, 9, 4, 11, 7, 8]])
    _, feats = target.forward(ids, [n_layers - 2])
    c = draft.hidden_norm(draft.fc(feats))
    expected = last.self_attn.k_proj(last.input_layernorm(feats))
    assert torch.allclose(draft.layers[0].self_attn.k_proj(c), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_feature_source_final_hidden_gives_target_logits(kind):
    """KD recomputes p_k from hidden_states[-1] (after the final norm): check that assumption."""
    from dflash_lab.train.data import Sample
    from dflash_lab.train.trainer import FeatureSource

    target = wrap_target(tiny_model(kind), mask_token_id=5)
    sample = Sample(id="a", category="", input_ids=list(range(3, 20)), loss_mask=[0] * 5 + [1] * 12)
    (feats, final), = FeatureSource(target, [1, 3], True, None, torch.device("cpu")).get([sample])
    logits, ref_feats = target.forward(torch.tensor([sample.input_ids]), [1, 3])
    assert torch.allclose(target.logits(final), logits[0], atol=1e-5)
    assert torch.equal(feats, ref_feats[0])


def test_max_slot_scores_only_the_first_slots():
    """`loss.max_slot=K`: slots past K reach neither the head nor the loss; K = B-1 is the full loss."""
    from dflash_lab.train import losses as L
    from dflash_lab.train.data import Sample
    from dflash_lab.train.trainer import FeatureSource, forward_batch

    target = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=6)).init_weights(0)
    samples = [Sample(id="a", category="", input_ids=list(range(3, 40)), loss_mask=[0] * 5 + [1] * 32)]
    feats = FeatureSource(target, draft.target_layer_ids, True, None, torch.device("cpu")).get(samples)
    kw = dict(num_anchors=6, loss_cfg=L.LossConfig(name="kd", gamma=4.0))
    full, st_full = forward_batch(draft, draft.config, target, feats, samples, [7], **kw)
    cut, st_cut = forward_batch(draft, draft.config, target, feats, samples, [7], max_slot=2, **kw)
    # max_slot = B-1 goes through the same masking branch as max_slot = 2 (every max_slot does)
    # and must change nothing
    same, st_same = forward_batch(draft, draft.config, target, feats, samples, [7], max_slot=5, **kw)
    assert torch.equal(st_cut["valid_per_slot"][1:3], st_full["valid_per_slot"][1:3])
    assert st_full["valid_per_slot"][3:].sum() > 0 and st_cut["valid_per_slot"][3:].sum() == 0
    assert not torch.isclose(full, cut) and torch.equal(full, same)
    assert torch.equal(st_same["valid_per_slot"], st_full["valid_per_slot"])
    from dflash_lab.train.trainer import build_micro_blocks

    blocks = build_micro_blocks(samples, [7], num_anchors=6, block_size=6, mask_token_id=draft.config.mask_token_id,
                                max_slot=2)
    assert blocks["valid"][..., 3:].sum() == 0 and blocks["valid"][..., 1:3].sum() > 0


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_kd_teacher_offset(kind):
    """Slot k of the block at anchor p reads the target's logits at position p+k-1 (the distribution
    of token p+k): the KL the trainer computes equals a per-slot loop over the target's own full
    forward at exactly that position, and not at p+k or p+k-2."""
    from dflash_lab.train import blocks as Bk
    from dflash_lab.train import losses as L
    from dflash_lab.train.data import Sample
    from dflash_lab.train.trainer import FeatureSource, build_micro_blocks, forward_batch

    target = wrap_target(tiny_model(kind), mask_token_id=5)
    with torch.no_grad():  # peaked teacher distributions: a neighbouring position's p_k is far off
        target.lm_head.weight.mul_(30.0)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=4)).init_weights(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(6, 300, (30,), generator=g).tolist()
    samples = [Sample(id="a", category="", input_ids=ids, loss_mask=[0] * 6 + [1] * 24)]
    feats = FeatureSource(target, draft.target_layer_ids, True, None, torch.device("cpu")).get(samples)
    cfg = L.LossConfig(name="kd", alpha=0.0, gamma=None)
    _, stats = forward_batch(draft, draft.config, target, feats, samples, [11], num_anchors=5, loss_cfg=cfg)

    blocks = build_micro_blocks(samples, [11], num_anchors=5, block_size=4, mask_token_id=draft.config.mask_token_id)
    n, a = blocks["anchors"].shape
    with torch.no_grad():
        noise = target.embed(blocks["block_ids"].view(n, a * 4)).float()
        ctx = feats[0][0][None]
        hidden = draft(noise, blocks["positions"].view(n, a * 4), ctx, torch.arange(ctx.shape[1])[None],
                       attention=Bk.make_attention("chunked", blocks["anchors"], 4)).view(a, 4, -1)
        target_logits, _ = target.forward(torch.tensor([ids]))
    sums = {}
    for shift in (-1, 0, 1):
        total = 0.0
        for i in range(a):
            p = int(blocks["anchors"][0, i])
            for k in range(1, 4):
                if not blocks["valid"][0, i, k]:
                    continue
                logq = torch.log_softmax(target.lm_head(hidden[i, k]).double(), -1)
                logp = torch.log_softmax(target_logits[0, p + k - 1 + shift].double(), -1)
                total += float((logp.exp() * (logp - logq)).sum())
        sums[shift] = total
    assert float(stats["kl_sum"]) == pytest.approx(sums[0], rel=1e-4)
    # a shift by one moves the sum by several times the tolerance above (the draft's own, equally
    # peaked log q dominates the KL, so the teacher's position moves it by tenths of a percent)
    assert abs(sums[1] - sums[0]) > 5e-4 * abs(sums[0]) and abs(sums[-1] - sums[0]) > 5e-4 * abs(sums[0]), sums


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_features_stop_after_the_last_feature_layer(kind):
    """Without the final hidden states (ce), the target stops after the last feature layer: the
    layers above never run and the features are those of the full forward."""
    from dflash_lab.train.data import Sample
    from dflash_lab.train.trainer import FeatureSource

    target = wrap_target(tiny_model(kind), mask_token_id=5)
    sample = Sample(id="a", category="", input_ids=list(range(3, 20)), loss_mask=[0] * 5 + [1] * 12)
    ran = []
    layers = target.model.model.layers
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    (feats, final), = FeatureSource(target, [1, 3], False, None, torch.device("cpu")).get([sample])
    for h in handles:
        h.remove()
    assert final is None and ran == [0, 1, 2, 3]
    _, ref = target.forward(torch.tensor([sample.input_ids]), [1, 3])
    assert torch.equal(feats, ref[0])
