"""`dflash-lab draft init` and `dflash-lab generate` through the real entry point."""

import json

import pytest

from dflash_lab.cli import main
from dflash_lab.models.checkpoint import load_draft
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "tiny-qwen3", kind="qwen3", seed=1)


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_draft_init_then_generate_is_lossless(target_dir, tmp_path, capsys):
    out = tmp_path / "draft"
    assert main(["draft", "init", "--target", str(target_dir), "--num-layers", "2", "--out", str(out), "--seed", "3"]) == 0
    capsys.readouterr()
    target = load_target(target_dir)
    draft = load_draft(out, target)
    assert draft.target_layer_ids == [1, 3] and draft.mask_token_id == len(target.tokenizer)

    base = ["generate", "--target", str(target_dir), "--prompt", "Explain the sky.", "--max-new-tokens", "20", "--json"]
    plain = run_json(capsys, base + ["--drafter", "none"])
    spec = run_json(capsys, base + ["--draft", str(out)])
    lookup = run_json(capsys, base + ["--drafter", "prompt-lookup"])
    assert plain["output_ids"] == spec["output_ids"] == lookup["output_ids"]
    assert set(spec) >= {"output_ids", "cycle_acceptance", "tau_pooled", "wall_s"}
    assert plain["cycle_acceptance"] == [1] * (len(plain["output_ids"]) - 1)
    assert spec["tau_pooled"] == pytest.approx(sum(spec["cycle_acceptance"]) / len(spec["cycle_acceptance"]))
    # the prompt went through the chat template with thinking off
    assert spec["num_prompt_tokens"] == len(target.encode_prompt([{"role": "user", "content": "Explain the sky."}]))
    assert "<think>\n\n</think>" in target.render_prompt([{"role": "user", "content": "x"}])


def test_generate_errors_are_clear(target_dir, tmp_path, capsys):
    assert main(["generate", "--target", str(target_dir), "--drafter", "dflash", "--prompt", "x"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    assert main(["generate", "--target", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    assert main(["generate", "--target", str(target_dir), "--draft", str(tmp_path / "bad"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
