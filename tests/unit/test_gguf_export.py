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
