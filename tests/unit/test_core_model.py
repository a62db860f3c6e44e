"""Draft model, layer ids, features, config validation and the checkpoint format."""

import json

import pytest
import torch
from safetensors import safe_open

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.checkpoint import load_draft, read_draft_config, save_draft
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config, validate_against_target
from dflash_lab.models.target import default_target_layer_ids, load_target, wrap_target
from dflash_lab.testing import tiny_model, tiny_target_dir


def test_default_layer_ids_match_spec_and_reference():
    from dflash.model import build_target_layer_ids

    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-4B, SPEC section 1
    assert default_target_layer_ids(30, 1) == [15]
    for layers in range(4, 64):
        for n in range(1, 9):
            assert default_target_layer_ids(layers, n) == build_target_layer_ids(layers, n), (layers, n)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_features_are_layer_outputs_with_plus_one_offset(kind):
    model = tiny_model(kind, seed=3)
    target = wrap_target(model)
    ids = torch.randint(0, 300, (1, 11))
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(model.model.layers)]
    _, features = target.forward(ids, [0, 2, 4])
    for h in hooks:
        h.remove()
    h = model.config.hidden_size
    for slot, layer_id in enumerate([0, 2, 4]):
        # hidden_states[id + 1] is the OUTPUT of decoder layer `id`, not its input
        assert torch.equal(features[..., slot * h:(slot + 1) * h], captured[layer_id].reshape(1, 11, h))
    assert not torch.equal(features[..., :h], captured[1].reshape(1, 11, h))


def test_mask_token_default_is_first_row_past_tokenizer(tmp_path):
    target = load_target(tiny_target_dir(tmp_path / "t"))
    assert target.default_mask_token_id() == len(target.tokenizer)
    assert target.default_mask_token_id() < target.vocab_size
    full = wrap_target(tiny_model("llama", vocab_size=len(target.tokenizer)), tokenizer=target.tokenizer)
    with pytest.raises(DFlashLabError, match="mask token"):
        full.default_mask_token_id()


SPEC_NAMES_PER_LAYER = [
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
]


def test_checkpoint_format_is_spec_section_2(tmp_path):
    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    cfg = build_draft_config(target, num_layers=2, block_size=8)
    draft = DFlashDraftModel(cfg).init_weights(seed=1)
    out = save_draft(draft, tmp_path / "d")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["model_type"] == "qwen3"
    assert config["block_size"] == 8 and config["num_target_layers"] == 6
    assert config["dflash_config"] == {"mask_token_id": 7, "target_layer_ids": cfg.target_layer_ids}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size"):
        assert key in config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert tuple(f.get_tensor("fc.weight").shape) == (64, 2 * 64)
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    expected |= {f"layers.{i}.{n}" for i in range(2) for n in SPEC_NAMES_PER_LAYER}
    assert names == expected
    loaded = load_draft(out, target)
    for (n1, t1), (n2, t2) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)


def test_draft_init_is_seeded():
    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    cfg = build_draft_config(target, num_layers=1)
    a = DFlashDraftModel(cfg).init_weights(seed=5).state_dict()
    b = DFlashDraftModel(cfg).init_weights(seed=5).state_dict()
    c = DFlashDraftModel(cfg).init_weights(seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def _draft_for(target, **kw):
    return build_draft_config(target, num_layers=2, block_size=8, **kw)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 96, "hidden_size: draft 96 != target 64"),
        ("vocab_size", 999, "vocab_size: draft 999 != target embedding rows 320"),
        ("num_target_layers", 12, "num_target_layers: draft 12 != target 6"),
        ("target_layer_ids", [1, 6], "[6] outside the target's layers 0..5"),
        ("mask_token_id", 320, "mask_token_id 320 outside the target's embedding table (0..319)"),
    ],
)
def test_config_validation_names_both_values(field, value, message):
    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    cfg = _draft_for(target)
    setattr(cfg, field, value)
    with pytest.raises(DFlashLabError) as err:
        validate_against_target(cfg, target)
    assert message in str(err.value)


def test_block_size_below_two_rejected():
    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    with pytest.raises(DFlashLabError, match="block_size must be >= 2"):
        build_draft_config(target, num_layers=1, block_size=1)


def test_mismatched_draft_rejected_at_load(tmp_path):
    small = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    save_draft(DFlashDraftModel(_draft_for(small)).init_weights(0), tmp_path / "d")
    other = wrap_target(tiny_model("qwen3", hidden=32, heads=2, kv_heads=1), mask_token_id=7)
    with pytest.raises(DFlashLabError, match="hidden_size: draft 64 != target 32"):
        load_draft(tmp_path / "d", other)


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    out = save_draft(DFlashDraftModel(_draft_for(target)).init_weights(0), tmp_path / "d")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DFlashLabError, match="truncated or corrupt"):
        load_draft(out, target)
    weights.write_bytes(data[:5])
    with pytest.raises(DFlashLabError, match="truncated or corrupt"):
        load_draft(out, target)


def test_missing_and_misshapen_tensors_named(tmp_path):
    from safetensors.torch import load_file, save_file

    target = wrap_target(tiny_model("qwen3"), mask_token_id=7)
    out = save_draft(DFlashDraftModel(_draft_for(target)).init_weights(0), tmp_path / "d")
    tensors = load_file(out / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    tensors["fc.weight"] = torch.zeros(64, 64)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(DFlashLabError) as err:
        load_draft(out, target)
    assert "layers.1.mlp.up_proj.weight" in str(err.value)
    assert "fc.weight: file (64, 64) vs config (64, 128)" in str(err.value)


def test_bad_config_json_and_missing_files(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DFlashLabError, match="no config.json"):
        read_draft_config(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(DFlashLabError, match="not valid JSON"):
        read_draft_config(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DFlashLabError, match="not a DFlash draft"):
        read_draft_config(tmp_path / "d")
    with pytest.raises(DFlashLabError, match="no such directory"):
        load_draft(tmp_path / "nope")
