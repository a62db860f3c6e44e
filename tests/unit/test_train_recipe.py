"""Recipes: strict validation before any model loads, overrides, the shipped recipes, the schedule."""

import json
import math
from pathlib import Path

import pytest

from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.train.recipe import load_recipe, resolve_batch
from dflash_lab.train.trainer import cosine_lr

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / "recipes/qwen3-4b" / f"{n}.yaml" for n in ("m1", "m1.5", "m1.6", "m1.9", "m2")] + [ROOT / "recipes/smollm2-135m/cpu.yaml"]


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_overrides_and_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, "train: {lr: 1.0e-3}\n"), ["train.lr=2e-3", "loss.name=eal", "data.num_anchors=64"])
    assert r.train.lr == 2e-3 and r.loss.name == "eal" and r.data.num_anchors == 64
    assert r.data.max_length == 3072 and r.loss.gamma == 7.0


@pytest.mark.parametrize("text,overrides,needle", [
    ("train: {lr: 1.0e-3, learning_rate: 2}\n", [], "unknown key 'train.learning_rate'"),
    ("train: {lr: -1.0e-3}\n", [], "train.lr"),
    ("train: {lr: 1.0e-3}\n", ["trian.lr=1"], "unknown key 'trian'"),  # (an empty recipe is refused)
    ("loss: {name: mse}\n", [], "loss.name"),
    ("train: {micro_batch: 4, global_batch: 10}\n", [], "global_batch 10 is not divisible"),
])
def test_bad_recipes_rejected(tmp_path, text, overrides, needle):
    with pytest.raises(DFlashLabError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(_write(tmp_path, text), overrides)


def test_global_batch_vs_world_size(tmp_path):
    r = load_recipe(_write(tmp_path, "train: {micro_batch: 8, global_batch: 64}\n"))
    assert resolve_batch(r, 8) == (8, 1, 64) and resolve_batch(r, 1) == (8, 8, 64)
    with pytest.raises(DFlashLabError, match="not divisible by micro_batch 8 x world size 3"):
        resolve_batch(r, 3)


def test_cli_rejects_bad_recipe_before_loading_a_model(tmp_path, capsys):
    # the target does not exist: an error about it would mean a model load was attempted
    cfg = _write(tmp_path, "target: {name: /nonexistent/target}\ntrain: {lr: -1, micro_batch: 3, global_batch: 4}\n")
    assert main(["train", "--config", str(cfg), "--data", "x", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe") and "train.lr" in err and "/nonexistent" not in err
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    cfg = _write(tmp_path, "target: {name: /nonexistent/target}\ntrain: {micro_batch: 2, global_batch: 8}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--dry-run", "train.lr=1e-3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["lr"] == 1e-3 and out["resolved"]["grad_accum"] == 4
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    resolve_batch(r, 1)


def test_m1_recipe_matches_the_seed():
    r = load_recipe(ROOT / "recipes/qwen3-4b/m1.yaml")
    assert (r.target.name, r.loss.name, r.loss.alpha, r.loss.gamma) == ("Qwen/Qwen3-4B", "kd", 0.0, 7.0)
    assert (r.train.lr, r.train.epochs, r.train.warmup_ratio, r.train.clip, r.train.global_batch) == (6e-4, 6, 0.04, 1.0, 64)
    assert (r.draft.num_layers, r.draft.block_size, r.data.num_anchors, r.data.max_length) == (5, 16, 512, 3072)
    # the seed's global batch of 64; micro-batch 4 x accumulation 2 fits 80 GB (`dflash-lab plan`)
    assert resolve_batch(r, 8) == (4, 2, 64)


def test_cosine_schedule_phases():
    total, lr = 100, 1.0
    assert cosine_lr(0, total, lr, 0.04) == pytest.approx(0.25)  # warmup: 4 steps
    assert cosine_lr(3, total, lr, 0.04) == pytest.approx(1.0)
    assert cosine_lr(4, total, lr, 0.04) == pytest.approx(1.0)  # decay starts at the peak
    assert cosine_lr(52, total, lr, 0.04) == pytest.approx(0.5)
    assert cosine_lr(99, total, lr, 0.04) < 0.001
    assert cosine_lr(100, total, lr, 0.04, min_lr_ratio=0.1) == pytest.approx(0.1)
    values = [cosine_lr(s, total, lr, 0.04) for s in range(4, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert not math.isnan(cosine_lr(0, 1, lr, 0.0))


def test_window_keys_in_the_draft_section(tmp_path):
    r = load_recipe(_write(tmp_path, "draft: {num_layers: 2, sliding_window: 64, "
                                     "layer_types: [sliding_attention, full_attention]}\n"))
    assert r.draft.sliding_window == 64 and r.draft.layer_types == ["sliding_attention", "full_attention"]
    with pytest.raises(DFlashLabError, match="layer_types"):
        load_recipe(_write(tmp_path, "draft: {layer_types: [sliding]}\n"))


def test_m2_dpace_recipe_is_m2_with_dpace_and_a_window():
    """Needs the `dpace` loss of the core branch (loss.name dpace, dpace_alpha, normalize)."""
    import yaml

    m2 = yaml.safe_load((ROOT / "recipes/qwen3-4b/m2.yaml").read_text())
    dp = yaml.safe_load((ROOT / "recipes/qwen3-4b/m2-dpace.yaml").read_text())
    assert dp["data"] == m2["data"] and dp["train"] == m2["train"] and dp["target"] == m2["target"]
    assert dp["draft"] == {**m2["draft"], "sliding_window": 2048}
    r = load_recipe(ROOT / "recipes/qwen3-4b/m2-dpace.yaml")
    assert (r.loss.name, r.loss.dpace_alpha, r.loss.normalize, r.draft.sliding_window) == ("dpace", 0.5, "anchors", 2048)
    resolve_batch(r, 8)
