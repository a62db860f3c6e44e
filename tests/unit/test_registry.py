"""Run registry: run dirs, checkpoints, lineage through warm starts, eval-run checkpoint selection."""

import json
import shutil

import pytest

from dflash_lab import registry
from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.testing import tiny_target_dir, write_jsonl


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "target")


def make_run(root, name, target_dir, parent=None, steps=(1, 2), seed=0):
    """A training run directory as the trainer writes it, with tiny random drafts."""
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target

    target = load_target(target_dir)
    run_dir = root / name
    labels = [f"step-{s}" for s in steps] + ["final"]
    for i, label in enumerate(labels):
        draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=8))
        draft.init_weights(seed=seed * 10 + i)
        step = steps[i] if i < len(steps) else steps[-1]
        save_draft(draft, run_dir / "checkpoints" / label, extra_files={
            "trainer_state.json": json.dumps({"step": step, "epoch": step / 2, "metrics": {"sim_tau": 1.0 + i}})})
    (run_dir / "run.json").write_text(json.dumps({
        "name": name, "run_dir": str(run_dir.resolve()), "recipe": {"loss": {"kind": "kd"}, "lr": 6e-4},
        "recipe_path": "recipes/x.yaml", "parent": str(parent) if parent else None,
        "data": {"path": "/data/x", "manifest_sha256": "abc123"}, "loss": "kd",
        "schedule": {"epochs": 2, "lr": 6e-4}, "target": {"spec": str(target_dir)},
        "created": "2026-11-26T00:00:00Z", "status": "done"}))
    return run_dir


def test_register_run_and_lineage(tmp_path, target_dir):
    db = tmp_path / "r.db"
    m1 = make_run(tmp_path, "m1", target_dir, seed=1)
    m15 = make_run(tmp_path, "m1.5", target_dir, parent=m1 / "checkpoints" / "final", seed=2)
    # a warm start from a COPY of m1.5's step-2: matched by the weights' sha256
    copy = tmp_path / "copied-ckpt"
    shutil.copytree(m15 / "checkpoints" / "step-2", copy)
    m16 = make_run(tmp_path, "m1.6", target_dir, parent=copy, seed=3)
    for run in (m1, m15, m16):
        registry.register_run(run, db)
    run_id = registry.register_run(m16, db)  # idempotent
    runs = registry.list_runs(db)
    assert [r["name"] for r in runs] == ["m1", "m1.5", "m1.6"]
    assert runs[2]["id"] == run_id and runs[2]["num_checkpoints"] == 3
    chain = registry.lineage("m1.6", db)
    assert [e["run"] for e in chain] == ["m1.6", "m1.5", "m1"]
    assert chain[0]["parent_label"] == "m1.5/step-2" and chain[1]["parent_label"] == "m1/final"
    assert chain[2]["parent_checkpoint"] is None
    info = registry.show_run("m1.5", db)
    assert info["run"]["data_manifest_sha256"] == "abc123" and info["run"]["loss"] == "kd"
    assert info["run"]["schedule"] == {"epochs": 2, "lr": 6e-4}
    assert [c["label"] for c in info["checkpoints"]] == ["step-1", "step-2", "final"]
    assert info["checkpoints"][0]["epoch"] == 0.5 and len(info["checkpoints"][0]["sha256"]) == 64
    with pytest.raises(DFlashLabError, match="known runs: m1"):
        registry.lineage("nope", db)


def test_register_run_needs_run_json(tmp_path):
    with pytest.raises(DFlashLabError, match="run.json"):
        registry.register_run(tmp_path, tmp_path / "r.db")


def test_runs_cli(tmp_path, target_dir, capsys):
    db = tmp_path / "r.db"
    m1 = make_run(tmp_path, "m1", target_dir, seed=1)
    m15 = make_run(tmp_path, "m1.5", target_dir, parent=m1 / "checkpoints" / "final", seed=2)
    assert main(["runs", "register", str(m1), "--db", str(db)]) == 0
    assert main(["runs", "register", str(m15), "--db", str(db)]) == 0
    assert main(["runs", "reference", "z-lab-m0", str(m1 / "checkpoints" / "step-1"), "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["runs", "list", "--db", str(db)]) == 0
    listing = capsys.readouterr().out
    assert "m1.5" in listing and "z-lab-m0" in listing and "reference" in listing
    assert main(["runs", "show", "m1.5", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "lineage: m1.5 (from m1/final) <- m1" in shown
    assert main(["runs", "show", "nope", "--db", str(db)]) == 2
    capsys.readouterr()
    assert main(["runs"]) == 2 and "register" in capsys.readouterr().out  # the runs help, not another's


def test_eval_run_evaluates_each_checkpoint_once_and_marks_best(tmp_path, target_dir, capsys):
    db = tmp_path / "r.db"
    run = make_run(tmp_path, "m1", target_dir, steps=(1,), seed=4)
    bench = tmp_path / "bench"
    write_jsonl(bench / "gsm8k.test.jsonl", [{"question": f"Natalia sold {i} clips."} for i in range(3)])
    def args(run_spec, max_new="6"):
        return ["eval-run", run_spec, "--benchmarks", "gsm8k", "--bench-dir", str(bench), "--limit", "1",
                "--max-new-tokens", max_new, "--db", str(db), "--quiet", "--no-hub", "--no-pypi"]

    assert main(args(str(run))) == 0
    out = capsys.readouterr().out
    assert "m1/step-1: evaluating gsm8k" in out and "m1/final: evaluating gsm8k" in out
    assert "best = " in out and "<- best" in out
    assert (run / "eval" / "final.json").is_file()
    info = registry.show_run("m1", db)
    assert all(len(c["results"]) == 1 for c in info["checkpoints"])
    assert all(c["results"][0]["lossless"] == 1 for c in info["checkpoints"])
    # again, by name: nothing new to do
    assert main(args("m1")) == 0
    out = capsys.readouterr().out
    assert out.count("already evaluated under these settings, skipped") == 2
    # different settings: evaluated again
    assert main(args("m1", max_new="5")) == 0
    assert "skipped" not in capsys.readouterr().out
    info = registry.show_run("m1", db)
    assert all(len(c["results"]) == 2 for c in info["checkpoints"])
