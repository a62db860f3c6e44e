"""Issue 21: `eval --backend sglang|vllm --server URL` checks, before the target loads, that each
server is reachable, is that kind of server and serves the draft being evaluated; `eval-run` over
several checkpoints against a server that cannot show its draft is refused."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from dflash_lab.cli import main
from dflash_lab.eval import harness
from dflash_lab.models.checkpoint import save_draft
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import FakeOpenAIServer  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    target_dir = tiny_target_dir(root / "target")
    target = load_target(target_dir)
    cfg = build_draft_config(target, num_layers=1, block_size=4)
    drafts = {}
    for name, seed in (("a", 0), ("b", 1)):
        drafts[name] = save_draft(DFlashDraftModel(cfg).init_weights(seed=seed), root / f"draft-{name}")
    drafts["a-copy"] = Path(shutil.copytree(drafts["a"], root / "elsewhere" / "draft-a"))
    return {"root": root, "target": target_dir, **drafts}


def _eval(env, tmp_path, server_url, backend, draft, *extra):
    return main(["eval", "--target", str(env["target"]), "--draft", str(draft), "--backend", backend,
                 "--server", server_url, "--out", str(tmp_path / "r.json"), "--no-db", "--no-hub", "--no-pypi",
                 "--bench-dir", str(tmp_path / "no-bench"), "--quiet", *extra])


@pytest.fixture
def no_target_load(monkeypatch):
    """Any refusal must come before the target (or the benchmarks) load."""
    def boom(*a, **k):
        raise AssertionError("loaded before the server check")

    monkeypatch.setattr(harness, "load_prompt_target", boom)
    monkeypatch.setattr("dflash_lab.eval.commands.load_selected", boom)


def _refused(capsys, code):
    assert code == 2 or code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_a_server_with_another_draft_is_refused_naming_both(env, tmp_path, capsys, no_target_load, engine):
    with FakeOpenAIServer(engine=engine, draft=str(env["b"])) as server:
        (tmp_path / "no-bench").mkdir()
        err = _refused(capsys, _eval(env, tmp_path, server.url, engine, env["a"]))
    assert str(env["b"]) in err and str(env["a"]) in err and "sha256" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_a_server_without_a_draft_is_refused(env, tmp_path, capsys, no_target_load, engine):
    with FakeOpenAIServer(engine=engine, draft=None) as server:
        (tmp_path / "no-bench").mkdir()
        err = _refused(capsys, _eval(env, tmp_path, server.url, engine, env["a"]))
    assert "without a draft" in err and str(env["a"]) in err


def test_unreachable_or_wrong_kind_of_server_is_refused_first(env, tmp_path, capsys, no_target_load):
    (tmp_path / "no-bench").mkdir()
    err = _refused(capsys, _eval(env, tmp_path, "http://127.0.0.1:9", "sglang", env["a"]))
    assert "http://127.0.0.1:9 is not reachable" in err
    with FakeOpenAIServer(engine="vllm", draft=str(env["a"])) as server:
        err = _refused(capsys, _eval(env, tmp_path, server.url, "sglang", env["a"]))
        assert "is not an SGLang server" in err
    with FakeOpenAIServer(engine="sglang", draft=str(env["a"])) as server:
        err = _refused(capsys, _eval(env, tmp_path, server.url, "vllm", env["a"]))
        assert "is not a vLLM server" in err


@pytest.mark.parametrize("served, how", [("a", "same path"), ("a-copy", "same weights (sha256)")])
def test_the_served_draft_is_verified_and_recorded(env, tmp_path, bench_dir, served, how):
    with FakeOpenAIServer(engine="sglang", draft=str(env[served])) as server:
        assert main(["eval", "--target", str(env["target"]), "--draft", str(env["a"]), "--backend", "sglang",
                     "--server", server.url, "--out", str(tmp_path / "r.json"), "--no-db", "--bench-dir",
                     str(bench_dir), "--benchmarks", "gsm8k", "--limit", "2", "--max-new-tokens", "6",
                     "--quiet"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    [record] = results["server_drafts"]
    assert record["verified"] is True and record["how"] == how and record["draft_path"] == str(env[served])
    assert record["engine"] == "sglang" and record["url"] == server.url and record["draft_sha256"]
    assert results["benchmarks"]["gsm8k"]["tau_pooled"] == pytest.approx(3.0)


def test_vllm_without_dev_mode_evaluates_one_checkpoint_with_a_warning(env, tmp_path, capsys, no_target_load):
    from dflash_lab.eval import server_check

    with FakeOpenAIServer(engine="vllm", draft=str(env["b"]), vllm_dev_mode=False) as server:
        [check] = server_check.check_servers([server.url], "vllm", env["a"])
    assert check.known is False and check.verified is False and "VLLM_SERVER_DEV_MODE=1" in check.how
    assert "cannot verify" in capsys.readouterr().err
    with FakeOpenAIServer(engine="vllm", draft=str(env["a"])) as server:
        [check] = server_check.check_servers([server.url], "vllm", env["a"])
    assert check.verified and check.target == "tiny" and check.draft_path == str(env["a"])


def _run_dir(env, root: Path) -> Path:
    """A run directory with two checkpoints (the draft files of a and b)."""
    run = root / "run"
    for label, src in (("step-2", env["a"]), ("final", env["b"])):
        shutil.copytree(src, run / "checkpoints" / label)
        (run / "checkpoints" / label / "trainer_state.json").write_text(json.dumps({"step": 2 if label != "final" else 4}))
    (run / "run.json").write_text(json.dumps({"name": "r", "status": "finished", "target": {"spec": str(env["target"])}}))
    return run


def test_eval_run_refuses_several_checkpoints_against_an_unverifiable_server(env, tmp_path, capsys, no_target_load):
    run = _run_dir(env, tmp_path)
    db = str(tmp_path / "db.sqlite")
    with FakeOpenAIServer(engine="vllm", draft=str(env["a"]), vllm_dev_mode=False) as server:
        err = _refused(capsys, main(["eval-run", str(run), "--backend", "vllm", "--server", server.url,
                                     "--db", db, "--quiet"]))
    assert "can evaluate one checkpoint, not 2" in err and "--checkpoints" in err


def test_eval_run_refuses_a_checkpoint_the_server_does_not_serve(env, tmp_path, capsys, no_target_load):
    run = _run_dir(env, tmp_path)
    db = str(tmp_path / "db.sqlite")
    with FakeOpenAIServer(engine="sglang", draft=str(env["a"])) as server:
        err = _refused(capsys, main(["eval-run", str(run), "--backend", "sglang", "--server", server.url,
                                     "--db", db, "--quiet"]))
    assert "checkpoint final" in err and str(env["a"]) in err and "--checkpoints" in err
