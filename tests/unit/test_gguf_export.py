"""`draft export --to gguf` (SPEC 2b): keys, tensors and refusals, read back with the gguf package.
A brute-force reference: every checkpoint tensor is found under its GGUF name with the same values.
llama.cpp itself loads these files in tests/integration/test_llamacpp.py."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.models.checkpoint import save_draft
from dflash_lab.models.draft import DFlashDraftModel, DraftConfig
from dflash_lab.models.gguf_export import (LAYER_TENSORS, ExportFault, export_draft_gguf, gguf_field,
                                           gguf_tensor_name)

HIDDEN, VOCAB, TARGET_LAYERS = 64, 40, 6


def _target_gguf(path, hidden=HIDDEN, vocab=VOCAB, layers=TARGET_LAYERS):
    """A target GGUF with the keys the exporter reads (no weights: the draft file never needs them)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.embedding_length", hidden)
    writer.add_uint32("llama.block_count", layers)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _draft(path, **overrides):
    kwargs = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, num_target_layers=TARGET_LAYERS,
                  mask_token_id=5, target_layer_ids=[1, 4], block_size=8, rms_norm_eps=1e-5,
                  rope_theta=123456.0, max_position_embeddings=512)
    extra = overrides.pop("extra", {})
    kwargs.update(overrides)
    cfg = DraftConfig(**kwargs, extra=extra)
    model = DFlashDraftModel(cfg).init_weights(seed=0)
    with torch.no_grad():  # norms are ones after init: make them distinguishable
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand_like(p))
    return save_draft(model, path), model


@pytest.fixture
def files(tmp_path):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, model = _draft(tmp_path / "draft")
    return target, draft_dir, model


def test_keys_and_tensors_round_trip(files, tmp_path):
    target, draft_dir, model = files
    out = export_draft_gguf(draft_dir, target, tmp_path / "d.gguf")
    r = GGUFReader(str(out))
    assert gguf_field(r, "general.architecture") == "dflash"
    expect = {"dflash.embedding_length": HIDDEN, "dflash.block_count": 2, "dflash.feed_forward_length": 96,
              "dflash.attention.head_count": 4, "dflash.attention.head_count_kv": 2,
              "dflash.attention.key_length": 16, "dflash.attention.value_length": 16,
              "dflash.rope.dimension_count": 16, "dflash.block_size": 8, "dflash.target_hidden_size": HIDDEN,
              "dflash.vocab_size": VOCAB, "dflash.context_length": 512, "tokenizer.ggml.mask_token_id": 5}
    for key, value in expect.items():
        assert gguf_field(r, key) == value, key
    assert gguf_field(r, "dflash.rope.freq_base") == pytest.approx(123456.0)
    assert gguf_field(r, "dflash.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert list(gguf_field(r, "dflash.target_layers")) == [2, 5]  # our ids + 1
    # every tokenizer key of the target, copied
    t = GGUFReader(str(target))
    for key in t.fields:
        if key.startswith("tokenizer."):
            assert gguf_field(r, key) == gguf_field(t, key), key
    # every checkpoint tensor under its GGUF name, same values, torch [out, in] as written
    tensors = {x.name: x for x in r.tensors}
    state = model.state_dict()
    assert set(tensors) == {gguf_tensor_name(n) for n in state}
    assert not {"token_embd.weight", "output.weight"} & set(tensors)
    for name, value in state.items():
        got = tensors[gguf_tensor_name(name)]
        data = np.asarray(got.data).reshape(tuple(reversed(got.shape.tolist())))
        np.testing.assert_array_equal(data, value.numpy(), err_msg=name)
    assert gguf_tensor_name("fc.weight") == "fc.weight"
    assert gguf_tensor_name("hidden_norm.weight") == "enc.output_norm.weight"
    assert gguf_tensor_name("norm.weight") == "output_norm.weight"
    assert len(LAYER_TENSORS) == 11


def test_f16_keeps_norms_f32(files, tmp_path):
    target, draft_dir, model = files
    r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / "d16.gguf", dtype="f16")))
    kinds = {x.name: x.tensor_type.name for x in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["fc.weight"] == "F16"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"


def test_faults_write_known_wrong_files(files, tmp_path):
    target, draft_dir, _ = files
    r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / "a.gguf",
                                         fault=ExportFault.LAYER_IDS_WITHOUT_PLUS_ONE)))
    assert list(gguf_field(r, "dflash.target_layers")) == [1, 4]
    r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / "b.gguf", fault=ExportFault.NO_ROPE_FREQ_BASE)))
    assert "dflash.rope.freq_base" not in r.fields


@pytest.mark.parametrize("overrides, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"vocab_size": VOCAB + 8}, "vocab_size"),
    ({"target_layer_ids": [1, TARGET_LAYERS]}, "reach past"),
])
def test_refuses_what_it_cannot_represent(tmp_path, overrides, message):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, _ = _draft(tmp_path / "draft", **overrides)
    with pytest.raises(DFlashLabError, match=message):
        export_draft_gguf(draft_dir, target, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_other_width_target(tmp_path):
    target = _target_gguf(tmp_path / "target.gguf", hidden=HIDDEN * 2)
    draft_dir, _ = _draft(tmp_path / "draft")
    with pytest.raises(DFlashLabError, match="hidden_size"):
        export_draft_gguf(draft_dir, target, tmp_path / "x.gguf")


def test_cli(files, tmp_path, capsys):
    target, draft_dir, _ = files
    out = tmp_path / "cli.gguf"
    assert main(["draft", "export", str(draft_dir), "--to", "gguf", "--target", str(target), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["draft", "export", str(draft_dir), "--to", "gguf", "--target", str(tmp_path / "none.gguf"),
                 "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["draft", "export", str(tmp_path / "nodraft"), "--to", "gguf", "--target", str(target),
                 "--out", str(out)]) == 2


def test_serve_cmd_llamacpp(files, tmp_path):
    from dflash_lab.labels.serve import serve_commands

    target, draft_dir, _ = files
    gguf = export_draft_gguf(draft_dir, target, tmp_path / "d.gguf")
    lines = serve_commands("llamacpp", str(target), draft=str(gguf), port=9000)
    assert lines[0].split() == ["llama-server", "-m", str(target), "-md", str(gguf), "--spec-type", "draft-dflash",
                                "--spec-draft-n-max", "7", "--host", "127.0.0.1", "--port", "9000"]  # block 8
    assert "python -m dflash_lab.eval.llamacpp" in lines[1] and "--spec-draft-n-max 7" in lines[1]
    with pytest.raises(DFlashLabError, match="draft export"):
        serve_commands("llamacpp", str(target), draft=str(draft_dir))
    with pytest.raises(DFlashLabError, match="not a DFlash draft"):
        serve_commands("llamacpp", str(target), draft=str(target))


def test_sliding_window_keys(tmp_path):
    """A draft with sliding-window layers writes the window and the per-layer pattern llama.cpp reads;
    a full-attention draft writes neither."""
    from gguf import GGUFReader

    target = _target_gguf(tmp_path / "target.gguf")
    windowed, _ = _draft(tmp_path / "w", sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    full, _ = _draft(tmp_path / "f")
    fields_w = GGUFReader(export_draft_gguf(windowed, target, tmp_path / "w.gguf")).fields
    fields_f = GGUFReader(export_draft_gguf(full, target, tmp_path / "f.gguf")).fields
    window = fields_w["dflash.attention.sliding_window"]
    assert int(window.parts[window.data[0]][0]) == 64
    pattern = fields_w["dflash.attention.sliding_window_pattern"]
    assert [bool(pattern.parts[i][0]) for i in pattern.data] == [True, False]
    assert "dflash.attention.sliding_window" not in fields_f and "dflash.attention.sliding_window_pattern" not in fields_f


# -- DFlash2 drafts (SPEC 10; llama.cpp loads and serves them in tests/integration/test_llamacpp_dflash2.py) --
def _dflash2_draft(path, **overrides):
    from dflash_lab.models.dflash2 import DFlash2Config, DFlash2DraftModel

    kwargs = dict(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, num_target_layers=TARGET_LAYERS,
                  mask_token_id=5, target_layer_ids=[1, 4], block_size=8, rms_norm_eps=1e-5, rope_theta=123456.0,
                  max_position_embeddings=512, conv_group_size=16, selector_rank=8, selector_top_k=4,
                  sliding_window=64)
    kwargs.update(overrides)
    model = DFlash2DraftModel(DFlash2Config(**kwargs)).init_weights(seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every tensor distinguishable: identity conv / zero codebook would hide a mix-up
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return save_draft(model, path), model


def _gguf_array(tensor) -> np.ndarray:
    """A GGUF tensor as the torch-layout array it was written from (GGUF lists dims reversed)."""
    return np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))


def test_dflash2_keys_and_tensors(tmp_path):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, model = _dflash2_draft(tmp_path / "d2")
    r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / "d2.gguf")))
    expect = {"dflash.block_size": 8, "dflash.conv_kernel_size": 2, "dflash.conv_group_size": 16,
              "dflash.selector_rank": 8, "dflash.selector_top_k": 4, "dflash.attention.causal": False,
              "dflash.attention.sliding_window": 64, "dflash.block_count": 2, "tokenizer.ggml.mask_token_id": 5}
    for key, value in expect.items():
        assert gguf_field(r, key) == value, key
    assert list(gguf_field(r, "dflash.target_layers")) == [2, 5]
    assert list(gguf_field(r, "dflash.attention.sliding_window_pattern")) == [True, True]
    assert "dflash.logit_scale" not in r.fields and "dflash.final_logit_softcapping" not in r.fields
    tensors = {x.name: x for x in r.tensors}
    state = model.state_dict()
    assert set(tensors) == {gguf_tensor_name(n) for n in state}
    for name, value in state.items():  # every tensor, torch layout written as it is
        np.testing.assert_array_equal(_gguf_array(tensors[gguf_tensor_name(name)]), value.numpy(), err_msg=name)
    # the names and the ggml dims of llama.cpp's loader (src/models/dflash.cpp create_tensor), fastest first
    n_embd, kernel, groups, rank = HIDDEN, 2, HIDDEN // 16, 8
    loader = {"selector_hidden.weight": [n_embd, rank], "selector_predecessor.weight": [rank, VOCAB],
              "selector_successor.weight": [rank, VOCAB]}
    for i in range(2):
        for kind in ("attn", "ffn"):
            loader[f"blk.{i}.{kind}_conv_base"] = [n_embd, kernel, 2]
            loader[f"blk.{i}.{kind}_conv_proj.weight"] = [n_embd, 2 * kernel * groups]
    assert {name: tensors[name].shape.tolist() for name in loader} == loader
    assert gguf_tensor_name("layers.1.mlp_conv.base_kernel") == "blk.1.ffn_conv_base"
    assert gguf_tensor_name("candidate_selector.successor_codebook") == "selector_successor.weight"


def test_dflash2_optional_keys_and_f16(tmp_path):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, _ = _dflash2_draft(tmp_path / "d2", output_multiplier=0.5, final_logit_softcapping=30.0,
                                  use_sliding_window=False)
    r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / "d2.gguf", dtype="f16")))
    assert gguf_field(r, "dflash.logit_scale") == pytest.approx(0.5)
    assert gguf_field(r, "dflash.final_logit_softcapping") == pytest.approx(30.0)
    assert "dflash.attention.sliding_window" not in r.fields
    kinds = {x.name: x.tensor_type.name for x in r.tensors}
    # the conv base kernels stay f32 (added in the graph to f32 taps); matrices and codebooks go f16
    assert kinds["blk.0.attn_conv_base"] == "F32" and kinds["blk.1.ffn_conv_base"] == "F32"
    assert kinds["blk.0.attn_conv_proj.weight"] == "F16" and kinds["selector_predecessor.weight"] == "F16"


def test_dflash2_faults_write_the_known_wrong_layouts(tmp_path):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, model = _dflash2_draft(tmp_path / "d2")
    state = model.state_dict()

    def read(fault):
        r = GGUFReader(str(export_draft_gguf(draft_dir, target, tmp_path / f"{fault.value}.gguf", fault=fault)))
        return {x.name: _gguf_array(x) for x in r.tensors}

    base = state["layers.0.attention_conv.base_kernel"].numpy()  # [side, tap, channel]
    got = read(ExportFault.CONV_BASE_SIDE_TAP_SWAPPED)["blk.0.attn_conv_base"]
    assert got.shape == base.shape and np.array_equal(got, base.transpose(1, 0, 2))
    proj = state["layers.0.mlp_conv.kernel_projection.weight"].numpy()  # rows (side, tap, group)
    got = read(ExportFault.CONV_PROJ_GROUP_MAJOR)["blk.0.ffn_conv_proj.weight"]
    groups = HIDDEN // 16
    for side in range(2):
        for tap in range(2):
            for group in range(groups):
                np.testing.assert_array_equal(got[group * 4 + tap * 2 + side], proj[side * 2 * groups + tap * groups + group])
    got = read(ExportFault.SELECTOR_CODEBOOKS_SWAPPED)
    assert np.array_equal(got["selector_predecessor.weight"], state["candidate_selector.successor_codebook"].numpy())
    assert np.array_equal(got["selector_successor.weight"], state["candidate_selector.predecessor_codebook"].numpy())


@pytest.mark.parametrize("overrides, message", [
    ({"selector_top_k": 8}, r"hidden_size 64 < selector_top_k \* \(selector_top_k \+ 1\) = 72"),
    ({"input_embedding_scale": 2.0}, "input_embedding_scale"),
])
def test_dflash2_refuses_what_llama_cpp_cannot_represent(tmp_path, overrides, message):
    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, _ = _dflash2_draft(tmp_path / "d2", **overrides)
    with pytest.raises(DFlashLabError, match=message):
        export_draft_gguf(draft_dir, target, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_dflash2_cli_and_serve_cmd(tmp_path, capsys):
    from dflash_lab.labels.serve import serve_commands

    target = _target_gguf(tmp_path / "target.gguf")
    draft_dir, _ = _dflash2_draft(tmp_path / "d2")
    out = tmp_path / "cli.gguf"
    assert main(["draft", "export", str(draft_dir), "--to", "gguf", "--target", str(target), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    llama = serve_commands("llamacpp", str(target), draft=str(out))
    assert "--spec-draft-n-max 7" in llama[0] and "--spec-draft-n-max 7" in llama[1]  # block 8 - 1
    assert main(["serve-cmd", "--engine", "vllm", "--target", "Qwen/Qwen3-4B", "--draft", str(draft_dir)]) == 0
    vllm = capsys.readouterr().out
    assert '"num_speculative_tokens": 7' in vllm and '"method": "dflash"' in vllm
    sglang = serve_commands("sglang", "Qwen/Qwen3-4B", draft=str(draft_dir))[0]
    assert "--speculative-algorithm DFLASH" in sglang and f"--speculative-draft-model-path {draft_dir}" in sglang
    assert "--speculative-num-draft-tokens 8" in sglang
