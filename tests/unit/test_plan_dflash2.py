"""`dflash-lab plan` on a DFlash2 recipe plans the DFlash2 draft (conv, selector and its loss term), not a
v1 draft of the same block size: the fake measurement matches a real step on a tiny model, and the
shipped m2-dflash2 recipe fits 72 GB at its micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from dflash_lab.testing import tiny_config
from dflash_lab import plan as P
from dflash_lab.train.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]
LIMIT_72GB = 72 * 1000**3


def _tiny(tmp_path: Path, arch: str, draft: dict | None = None, **loss):
    # hidden 64 (conv groups of 16 divide it); the default rank-256 selector over the top 16 of 512 tokens
    cfg = tiny_config("qwen3", vocab_size=512, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128)
    path = tmp_path / "tiny-target"
    path.mkdir(exist_ok=True)
    cfg.save_pretrained(path)
    recipe = parse_recipe({
        "target": {"name": str(path), "dtype": "float32"},
        "draft": {"arch": arch, "num_layers": 2, "block_size": 4, "mask_token_id": 511, **(draft or {})},
        "data": {"max_length": 96, "num_anchors": 12},
        "loss": {"name": "kd", "chunk_slots": 16, "gamma": 4.0, **loss},
        "train": {"micro_batch": 2, "bf16": True, "attention": "flex", "anchor_chunk": 4},
    })
    return recipe, cfg


@pytest.mark.parametrize("loss,draft", [
    ({"selector_gold": "replace"}, None),
    ({"selector_gold": "exclude"}, None),
    ({"selector_alpha": 0.0}, None),  # selector metrics only, under no_grad (the plan once failed on it)
    ({}, {"sliding_window": 12}),  # most blocks of 96-token sequences lose context to the window
])
def test_dflash2_fake_prediction_matches_a_real_step(tmp_path, loss, draft):
    recipe, cfg = _tiny(tmp_path, "dflash2", draft=draft, **loss)
    fake = P.measure_step(recipe, 2, fake=True, target_cfg=cfg)
    real = P.measure_step(recipe, 2, fake=False, target_cfg=cfg)
    assert abs(fake.peak_bytes - real.peak_bytes) <= 0.10 * real.peak_bytes, (fake, real)
    for kind in ("weights", "optimizer_state"):
        assert fake.peak_by_kind[kind] == real.peak_by_kind[kind]
    assert fake.flops_draft == real.flops_draft and fake.flops_target == real.flops_target > 0


def test_dflash2_plan_counts_the_conv_and_the_selector(tmp_path):
    v1_recipe, cfg = _tiny(tmp_path, "dflash")
    d2_recipe, _ = _tiny(tmp_path, "dflash2", selector_alpha=1.0)
    v1 = P.measure_step(v1_recipe, 2, fake=True, target_cfg=cfg)
    d2 = P.measure_step(d2_recipe, 2, fake=True, target_cfg=cfg)
    # the codebooks [V, r] x 2, the hidden projection and two convs per layer are trained weights
    assert d2.peak_by_kind["weights"] > v1.peak_by_kind["weights"]
    assert d2.peak_by_kind["optimizer_state"] > v1.peak_by_kind["optimizer_state"]
    # the conv and the selector term (its own top-k over the vocabulary, the 16-way scores) cost FLOPs
    assert d2.flops_draft > v1.flops_draft


@pytest.mark.slow
def test_shipped_m2_dflash2_recipe_fits_72gb_at_its_micro_batch():
    recipe = load_recipe(REPO / "recipes" / "qwen3-4b" / "m2-dflash2.yaml")
    plan = P.make_plan(recipe, gpus=8, gpu_memory=80 * 1000**3, search=False, recipe_name="m2-dflash2")
    assert plan.micro_batch * plan.grad_accum * plan.gpus == 64  # the seed's global batch
    assert plan.peak_bytes <= LIMIT_72GB, P.format_plan(plan)


def test_the_window_lowers_the_planned_attention_flops(tmp_path):
    full, cfg = _tiny(tmp_path, "dflash2", draft={"sliding_window": 1000})
    windowed, _ = _tiny(tmp_path, "dflash2", draft={"sliding_window": 12})
    assert (P.measure_step(windowed, 2, fake=True, target_cfg=cfg).flops_draft
            < P.measure_step(full, 2, fake=True, target_cfg=cfg).flops_draft)
