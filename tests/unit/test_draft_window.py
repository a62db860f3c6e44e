"""Sliding-window draft layers: the checkpoint keys the serving stacks read, z-lab's reference model as
the oracle for the window rule, and the decoding loop stays lossless with a windowed draft."""

import json

import pytest
import torch

from dflash_lab.decoding.drafters import DFlashDrafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.errors import DFlashLabError
from dflash_lab.models.checkpoint import load_draft, read_draft_config, save_draft
from dflash_lab.models.draft import DFlashDraftModel, DraftConfig, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model


def _cfg(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=50, num_target_layers=4, mask_token_id=49,
                target_layer_ids=[1, 2], block_size=4)
    return DraftConfig(**{**base, **kw})


def test_config_json_keys_and_round_trip(tmp_path):
    cfg = _cfg(sliding_window=64, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    out = cfg.to_json_dict()
    assert out["sliding_window"] == 64 and out["use_sliding_window"] is True
    assert out["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert out["is_causal"] is False and out["dflash_config"]["causal"] is False  # bidirectional blocks
    back = DraftConfig.from_json_dict(json.loads(json.dumps(out)))
    assert back == cfg and back.to_json_dict() == out
    assert [back.layer_window(i) for i in range(3)] == [64, None, 64]
    # every layer slides when only the window is given
    assert _cfg(sliding_window=8).layer_types == ["sliding_attention"] * 3
    # a full-attention draft writes exactly what it wrote before (no window keys)
    plain = _cfg().to_json_dict()
    assert "layer_types" not in plain and "sliding_window" not in plain and plain["use_sliding_window"] is False


def test_config_reads_the_serving_stacks_forms():
    full = _cfg().to_json_dict()
    # Qwen3-style: use_sliding_window false keeps a stated window out of effect (and round-trips it)
    cfg = DraftConfig.from_json_dict({**full, "sliding_window": 4096, "use_sliding_window": False})
    assert cfg.sliding_window is None and cfg.to_json_dict()["sliding_window"] == 4096
    # use_sliding_window + max_window_layers (Hugging Face's Qwen3 rule), bidirectional stated
    cfg = DraftConfig.from_json_dict({**full, "sliding_window": 16, "use_sliding_window": True,
                                      "max_window_layers": 1, "is_causal": False})
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    # sliding layers without is_causal: false are causal for z-lab, vLLM and SGLang: refused here
    with pytest.raises(DFlashLabError, match="causal"):
        DraftConfig.from_json_dict({**full, "sliding_window": 16, "layer_types": ["sliding_attention"] * 3})


def test_bad_window_configs_are_user_errors():
    with pytest.raises(DFlashLabError, match="block_size"):
        _cfg(sliding_window=2)
    with pytest.raises(DFlashLabError, match="entries"):
        _cfg(sliding_window=8, layer_types=["sliding_attention"])
    with pytest.raises(DFlashLabError, match="sliding_window is not set"):
        _cfg(layer_types=["sliding_attention"] * 3)
    with pytest.raises(DFlashLabError, match="use 'sliding_attention'"):
        _cfg(sliding_window=8, layer_types=["sliding", "full_attention", "full_attention"])


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention", "sliding_attention"]])
def test_zlab_reference_matches_our_window(layer_types, tmp_path):
    """z-lab's model (HF sliding rule, is_causal false) loads our checkpoint and gives our hidden states."""
    from dflash.model import DFlashDraftModel as ZLabDraft

    target = wrap_target(tiny_model("qwen3", seed=5), mask_token_id=3)
    cfg = build_draft_config(target, num_layers=3, block_size=16, sliding_window=20, layer_types=layer_types)
    ours = DFlashDraftModel(cfg).init_weights(seed=9, std=0.1)
    save_draft(ours, tmp_path / "d")
    zlab = ZLabDraft.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    torch.manual_seed(0)
    ctx, block = 23, 16
    features = torch.randn(1, ctx, 3 * 64)
    noise = target.embed(torch.randint(0, 300, (1, block)))
    full = DFlashDraftModel(build_draft_config(target, num_layers=3, block_size=16))
    full.load_state_dict(ours.state_dict())
    with torch.no_grad():
        theirs = zlab(position_ids=torch.arange(ctx + block)[None], noise_embedding=noise, target_hidden=features)
        mine = ours(noise, torch.arange(ctx, ctx + block)[None], features, torch.arange(ctx)[None])
        unwindowed = full(noise, torch.arange(ctx, ctx + block)[None], features, torch.arange(ctx)[None])
    assert (theirs - mine).abs().max() <= 1e-4
    assert (mine - unwindowed).abs().max() > 1e-3  # the window really cut context


def test_windowed_draft_decodes_losslessly_and_as_full_when_the_window_is_huge(tmp_path):
    model = tiny_model("qwen3", seed=11, vocab_size=24)
    target = wrap_target(model, mask_token_id=3)
    base = build_draft_config(target, num_layers=2, block_size=8)
    full = DFlashDraftModel(base).init_weights(seed=2, std=0.3)
    small = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=8, sliding_window=9,
                                                layer_types=["sliding_attention", "full_attention"]))
    huge = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=8, sliding_window=100_000))
    for d in (small, huge):
        d.load_state_dict(full.state_dict())
    save_draft(small, tmp_path / "small")
    small = load_draft(tmp_path / "small", target)
    assert read_draft_config(tmp_path / "small").layer_window(0) == 9
    gen = torch.Generator().manual_seed(1)
    differs = False
    for length in (3, 17, 33):
        prompt = torch.randint(0, 24, (length,), generator=gen).tolist()
        reference = greedy_generate(target, prompt, 40)
        r_full = speculative_generate(target, DFlashDrafter(full, target), prompt, 40)
        r_huge = speculative_generate(target, DFlashDrafter(huge, target), prompt, 40)
        r_small = speculative_generate(target, DFlashDrafter(small, target), prompt, 40)
        assert r_small.output_ids == r_full.output_ids == reference.output_ids  # lossless
        assert r_huge.cycle_acceptance == r_full.cycle_acceptance  # same proposals
        differs |= r_small.cycle_acceptance != r_full.cycle_acceptance
    assert differs  # the small window changed what the draft proposed


def test_train_with_a_window_writes_a_windowed_checkpoint(tmp_path):
    """`draft.sliding_window` through the real `train` command: a few steps, the checkpoint says so."""
    import random

    from dflash_lab.cli import main
    from dflash_lab.testing import tiny_target_dir, write_jsonl

    target = tiny_target_dir(tmp_path / "target")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog".split()
    rows = [{"id": f"s{i}", "category": "chat", "source": "test",
             "messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(4))},
                          {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(30))}],
             "response_tokens": 30, "finish_reason": "stop"} for i in range(6)]
    data = write_jsonl(tmp_path / "labels" / "shard-00000.jsonl", rows).parent
    (data / "meta.json").write_text('{"kind": "labels"}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"target: {{name: {target}}}\n"
                      "draft: {num_layers: 2, block_size: 6, sliding_window: 8, layer_types: [sliding_attention, full_attention]}\n"
                      "data: {max_length: 96, num_anchors: 8, heldout: 1}\n"
                      "loss: {name: ce, gamma: 4.0}\n"
                      "train: {lr: 1.0e-2, epochs: 1, micro_batch: 2, global_batch: 2, max_steps: 2, seed: 3}\n")
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    cfg = read_draft_config(tmp_path / "run" / "checkpoints" / "final")
    assert cfg.sliding_window == 8 and cfg.layer_types == ["sliding_attention", "full_attention"]
