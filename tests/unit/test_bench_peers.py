"""Plumbing of bench/bench_peers.py (issue 25) on tiny tensors, no peer installed: the feature
files each peer reads, the speculators -> ours converter and the CPU-seconds summary."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from peers import export, features, run  # noqa: E402

from dflash_lab.models.checkpoint import load_draft  # noqa: E402
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config  # noqa: E402
from dflash_lab.models.target import wrap_target  # noqa: E402
from dflash_lab.testing import tiny_model  # noqa: E402


def _rows(n=3, seq=7, taps=2, hidden=4):
    g = torch.Generator().manual_seed(0)
    return [(list(range(5, 5 + seq)), [0, 0] + [1] * (seq - 2), torch.randn(seq, taps * hidden, generator=g),
             torch.randn(seq, hidden, generator=g)) for _ in range(n)]


def test_speculators_features_layout(tmp_path):
    rows = _rows()
    out = features.write_speculators(tmp_path / "spec", rows, n_train=2)
    with safe_open(str(out / "hidden_states" / "hs_1.safetensors"), "pt") as h:
        hs, ids = h.get_tensor("hidden_states"), h.get_tensor("token_ids")
    # [S, taps + 1, H]: the taps in order, then the last layer (speculators' verifier_last_hidden_states)
    assert hs.shape == (7, 3, 4) and ids.tolist() == rows[1][0]
    assert torch.equal(hs[:, :-1].flatten(1), rows[1][2]) and torch.equal(hs[:, -1], rows[1][3])
    from datasets import load_from_disk

    ds = load_from_disk(str(out / "dataset"))
    assert ds.column_names == ["input_ids", "loss_mask", "seq_len"] and ds["seq_len"] == [7, 7, 7]
    assert torch.equal(ds[0]["input_ids"], torch.tensor(rows[0][0]))  # torch format: speculators compares tensors
    assert json.loads((out / "split.json").read_text()) == {"train": 2, "total": 3}


def test_specforge_features_layout(tmp_path):
    rows = _rows(n=2)
    out = features.write_specforge(tmp_path / "sf", rows)
    files = sorted(out.glob("*.ckpt"))
    assert [f.name for f in files] == ["data_00000.ckpt", "data_00001.ckpt"]
    raw = torch.load(files[0], weights_only=True)  # a dict of tensors only: loads without unpickling code
    assert set(raw) == {"input_ids", "loss_mask", "hidden_states"}
    assert raw["input_ids"].shape == raw["loss_mask"].shape == (7,) and raw["hidden_states"].shape == (7, 8)


def _speculators_checkpoint(tmp_path, draft, cfg_json, **changes):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {k: v.to(torch.bfloat16) for k, v in draft.state_dict().items()}
    state["verifier_lm_head.weight"] = torch.zeros(3, 3)  # frozen extras the converter drops
    state["embed_tokens.weight"] = torch.zeros(3, 3)
    save_file(state, str(ckpt / "model.safetensors"))
    layer = {k: cfg_json[k] for k in export._SAME} | {"rope_parameters": {"rope_theta": cfg_json["rope_theta"]}}
    spec = {"transformer_layer_config": layer, "block_size": cfg_json["block_size"],
            "mask_token_id": cfg_json["dflash_config"]["mask_token_id"],
            "aux_hidden_state_layer_ids": cfg_json["dflash_config"]["target_layer_ids"],
            "draft_vocab_size": cfg_json["vocab_size"], **changes}
    (ckpt / "config.json").write_text(json.dumps(spec))
    return ckpt


def test_speculators_to_ours_roundtrip(tmp_path):
    target = wrap_target(tiny_model("llama"), mask_token_id=5)
    cfg = build_draft_config(target, num_layers=1, block_size=4)
    draft = DFlashDraftModel(cfg).init_weights(0)
    cfg_json = cfg.to_json_dict()
    out = export.speculators_to_ours(_speculators_checkpoint(tmp_path, draft, cfg_json), cfg_json, tmp_path / "ours")
    loaded = load_draft(out, target)
    for name, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16).float()), name
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert not any(k.startswith(("verifier_", "embed_tokens")) for k in h.keys())


def test_speculators_to_ours_refuses_another_shape(tmp_path):
    target = wrap_target(tiny_model("llama"), mask_token_id=5)
    cfg = build_draft_config(target, num_layers=1, block_size=4)
    cfg_json = cfg.to_json_dict()
    ckpt = _speculators_checkpoint(tmp_path, DFlashDraftModel(cfg).init_weights(0), cfg_json, block_size=8)
    with pytest.raises(ValueError, match="block_size: speculators 8 vs ours 4"):
        export.speculators_to_ours(ckpt, cfg_json, tmp_path / "ours")


def test_summarize_counts_cpu_between_steps():
    steps = [{"cpu": 10.0, "wall": 100.0}, {"cpu": 12.0, "wall": 103.0}, {"cpu": 14.0, "wall": 106.0}]
    s = run.summarize({"steps": steps, "cpu_s_total": 30.0, "peak_rss_mb": 5.0})
    # 2 intervals of 2 s for 3 steps: the first step's own time is estimated as the mean interval
    assert s["steps"] == 3 and s["train_cpu_s"] == pytest.approx(6.0) and s["cpu_s_per_step"] == pytest.approx(2.0)
    assert s["train_wall_s"] == pytest.approx(9.0)
