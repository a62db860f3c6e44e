"""The shipped qwen3-4b mix recipes parse and validate (no data is read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dflash_lab.cli import main
from dflash_lab.data.recipe import validate_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "qwen3-4b"
NAMES = ["mix-m1", "mix-m1.5", "mix-m1.6", "mix-m1.9", "mix-m2"]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates(name):
    r = validate_recipe(RECIPES / f"{name}.yaml")
    assert r.decontaminate is not None and r.decontaminate.ngram == 13
    assert all(s.hf is not None for s in r.sources)


def test_recipe_quotas_match_the_seed():
    q = lambda n: validate_recipe(RECIPES / f"{n}.yaml").quotas.categories
    assert q("mix-m1.5") == {"math": 149672, "code": 149803, "chat": 74617}
    # the seed's totals (374,110 and 224,024) are 18 and 9 more than its per-category counts;
    # the recipes keep the per-category counts
    assert sum(q("mix-m1.5").values()) == 374092
    assert q("mix-m1.6") == {"math": 99254, "code": 99921, "chat": 24840}
    assert sum(q("mix-m1.6").values()) == 224015
    assert q("mix-m1.9") == {"math": 163846, "code": 30000, "chat": 30000}
    assert sum(q("mix-m1").values()) == 890000
    assert sum(q("mix-m2").values()) == 800000
    assert len(validate_recipe(RECIPES / "mix-m1.9.yaml").exclude) == 3
    assert len(validate_recipe(RECIPES / "mix-m1.5.yaml").exclude) == 1
    m16 = validate_recipe(RECIPES / "mix-m1.6.yaml")
    assert m16.sources[0].filters.tags == ["olympiads", "amc_aime", "aops_forum", "math"]
    assert m16.sources[1].shape == "function-completion"


def test_dry_run_cli(capsys):
    assert main(["prompts", "build", "--config", str(RECIPES / "mix-m1.6.yaml"), "--dry-run"]) == 0
    assert "valid (3 sources" in capsys.readouterr().out
