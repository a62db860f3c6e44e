"""The journey report from a registry the test fills: numbers, gap closed, best checkpoints,
baselines, charts, and the refusal to mix harness settings."""

import pytest

from dflash_lab import registry, report
from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval.harness import harness_settings, settings_key

BENCHES = ["gsm8k", "math500", "humaneval", "mbpp", "mt-bench"]
REFERENCE = [6.27, 8.24, 6.72, 5.61, 3.43]  # SPEC section 7, z-lab on the seed's harness


def fake_results(taus, *, drafter="dflash", max_new_tokens=2048, tokens_per_s=20.0, greedy=10.0, created="2026"):
    benchmarks = {}
    for bench, tau in zip(BENCHES, taus):
        if tau is None:
            continue
        settings = harness_settings(target_fingerprint="fp", selection="paper", limit=None,
                                    max_new_tokens=max_new_tokens, backend="builtin", data_sha256=f"data-{bench}")
        benchmarks[bench] = {
            "settings": settings, "settings_key": settings_key(settings), "tau_pooled": tau,
            "tau_per_request": tau + 0.1, "cycles": 100, "generated_tokens": int(100 * tau),
            "acceptance_histogram": {"1": 50, "2": 30, str(max(3, round(tau))): 20}, "lossless": True,
            "wall_s": 10.0, "tokens_per_s": tokens_per_s, "greedy_tokens_per_s": greedy, "num_samples": 4,
        }
    return {"drafter": drafter, "draft": None, "block_size": 16, "created": created, "benchmarks": benchmarks}


def fill(db, journey):
    """journey: {run: {checkpoint label: taus}}; every run warm-starts from the previous best."""
    previous = None
    for run, checkpoints in journey.items():
        registry.ensure_run(run, "training", db, parent=previous)
        for label, taus in checkpoints.items():
            ckpt = registry.ensure_checkpoint(run, label, db, path=f"/runs/{run}/{label}", sha256=f"{run}-{label}")
            registry.record_eval(fake_results(taus), db, checkpoint_id=ckpt)
        previous = f"/runs/{run}/{list(checkpoints)[-1]}"


M1 = [5.00, 6.50, 5.00, 4.50, 2.50]
M19_EP1 = [5.90, 7.00, 5.50, 5.00, 2.90]
M19_EP3 = [6.27, 7.18, 5.87, 5.35, 3.00]


@pytest.fixture
def db(tmp_path):
    db = tmp_path / "r.db"
    fill(db, {"m1": {"final": M1}, "m1.9": {"ep1": M19_EP1, "ep3": M19_EP3, "final": M19_EP1}})
    registry.ensure_run("z-lab-m0", "reference", db)
    ref = registry.ensure_checkpoint("z-lab-m0", "reference", db, path="/zlab", sha256="zlab")
    registry.record_eval(fake_results(REFERENCE), db, checkpoint_id=ref)
    registry.record_eval(fake_results([1.71, 1.8, 1.91, 1.6, 1.43], drafter="prompt-lookup"), db)
    registry.record_eval(fake_results([1.0] * 5, drafter="none", tokens_per_s=8.0), db)
    return db


def avg(xs):
    return sum(xs) / len(xs)


def test_progression_numbers_and_best_checkpoint(db):
    journey = report.collect(["m1", "m1.9"], "z-lab-m0", db)
    m1, m19 = journey.runs
    assert journey.benchmarks == BENCHES
    assert m19.best_label == "ep3" and m19.taus == dict(zip(BENCHES, M19_EP3))
    assert m19.avg == pytest.approx(avg(M19_EP3))
    text = report.progression_table(["m1", "m1.9"], db, "z-lab-m0")
    lines = text.splitlines()
    assert lines[0] == ("| run | draft | best checkpoint | gsm8k | math500 | humaneval | mbpp | mt-bench | avg "
                        "| delta avg |")
    # no recipe and no readable checkpoint: the architecture is unknown, the block size is recorded
    assert lines[2] == f"| m1 | block 16 | final | 5.00 | 6.50 | 5.00 | 4.50 | 2.50 | {avg(M1):.2f} | - |"
    assert lines[3] == (f"| m1.9 | block 16 | ep3 | 6.27 | 7.18 | 5.87 | 5.35 | 3.00 | {avg(M19_EP3):.2f} | "
                        f"{avg(M19_EP3) - avg(M1):+.2f} |")
    assert lines[4].startswith("| z-lab-m0 (reference) | block 16 | reference | 6.27 | 8.24 |")
    # per benchmark best may be another checkpoint than the best average
    assert m19.best_per_benchmark["gsm8k"] == ("ep3", 6.27)


def test_gap_closed_fraction(db):
    journey = report.collect(["m1", "m1.9"], "z-lab-m0", db)
    gap = avg(REFERENCE) - avg(M1)
    closed = (avg(M19_EP3) - avg(M1)) / gap
    sentence = report.gap_sentence(journey)
    assert f"closes {closed:.0%} of the {gap:.2f}-point gap" in sentence
    assert report.closed_fraction(5.0, 6.0, 7.0) == 0.5
    assert report.closed_fraction(7.0, 6.0, 7.0) is None  # no gap to close
    table = report.gap_table(journey)
    # gsm8k: m1.9 reached the reference -> 100% closed; math500: (7.18 - 6.5) / (8.24 - 6.5)
    assert "+0.00 (100% closed)" in table
    assert f"{7.18 - 8.24:+.2f} ({(7.18 - 6.5) / (8.24 - 6.5):.0%} closed)" in table


def test_write_report_files_and_baselines(db, tmp_path):
    path = report.write_report("m1,m1.9", "z-lab-m0", tmp_path / "out", db)
    text = path.read_text()
    for heading in ("## Progression", "## Gap to the reference z-lab-m0", "## Best checkpoints", "## Baselines"):
        assert heading in text
    assert "| prompt-lookup tau | 1.71 |" in text
    assert "| target-only tokens/s (plain greedy) | 8.0 |" in text
    assert "20.0 (2.50x)" in text  # speculative tokens/s against the target-only baseline
    assert (tmp_path / "out" / "tau_per_benchmark.png").stat().st_size > 1000
    assert (tmp_path / "out" / "acceptance_lengths.png").stat().st_size > 1000


def test_mixed_settings_are_rejected(db):
    registry.ensure_run("m1.5", "training", db)
    ckpt = registry.ensure_checkpoint("m1.5", "final", db)
    registry.record_eval(fake_results([5.5] * 5, max_new_tokens=1024), db, checkpoint_id=ckpt)
    with pytest.raises(DFlashLabError, match="max_new_tokens: 2048 vs 1024"):
        report.collect(["m1", "m1.5", "m1.9"], "z-lab-m0", db)
    # once m1.5 is measured under the shared settings too, the report uses those
    registry.record_eval(fake_results([5.5] * 5), db, checkpoint_id=ckpt)
    journey = report.collect(["m1", "m1.5", "m1.9"], "z-lab-m0", db)
    assert journey.runs[1].avg == pytest.approx(5.5)
    assert journey.settings["gsm8k"]["max_new_tokens"] == 2048


def test_missing_benchmark_and_unknown_run(db):
    registry.ensure_run("partial", "training", db)
    ckpt = registry.ensure_checkpoint("partial", "final", db)
    registry.record_eval(fake_results([5.0, None, None, None, None]), db, checkpoint_id=ckpt)
    journey = report.collect(["m1", "partial"], None, db)  # only the shared benchmark is compared
    assert journey.benchmarks == ["gsm8k"]
    with pytest.raises(DFlashLabError, match="has no math500 result"):
        report.collect(["m1", "partial"], None, db, benchmarks=["gsm8k", "math500"])
    with pytest.raises(DFlashLabError, match="no run named 'nope'"):
        report.collect(["nope"], None, db)


def test_report_cli(db, tmp_path, capsys):
    assert main(["report", "--runs", "m1,m1.9", "--reference", "z-lab-m0", "--out", str(tmp_path / "o"),
                 "--db", str(db)]) == 0
    assert "| m1.9 | block 16 | ep3 |" in capsys.readouterr().out
    assert main(["report", "--runs", "m1", "--out", str(tmp_path / "o"), "--db", str(tmp_path / "none.db")]) == 2


def test_acceptance_chart_is_a_histogram_with_a_bar_per_length():
    from dflash_lab.report import histogram_bars

    bars = histogram_bars([("a", {"1": 2, "3": 6}), ("b", {"2": 1, "4": 3})])
    assert [b[0] for b in bars] == ["a", "b"]
    for name, xs, heights, width in bars:
        assert len(xs) == len(heights) == 4  # lengths 1..4, unreached ones as zero bars
        assert abs(sum(heights) - 1.0) < 1e-9
        assert abs(width - 0.4) < 1e-9
    assert bars[0][2] == [0.25, 0.0, 0.75, 0.0] and bars[1][2] == [0.0, 0.25, 0.0, 0.75]
    # side by side inside each length, never overlapping
    assert all(abs(b - a - 0.4) < 1e-9 for a, b in zip(bars[0][1], bars[1][1]))
    assert histogram_bars([]) == []


def _training_run(root, name, arch, block_size, taus, db):
    """A registered training run directory (run.json with its recipe, one final checkpoint) and its
    results at `block_size`, the way `train` and `eval-run` leave them."""
    import json

    run_dir = root / name
    (run_dir / "checkpoints" / "final").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": name, "recipe": {"draft": {"arch": arch,
                                                                                    "block_size": block_size}}}))
    registry.register_run(run_dir, db)
    ckpt = registry.ensure_checkpoint(name, "final", db, path=str(run_dir / "checkpoints" / "final"), sha256=name)
    results = fake_results(taus)
    results["block_size"] = block_size
    registry.record_eval(results, db, checkpoint_id=ckpt)


def test_v1_and_dflash2_runs_in_one_table(tmp_path):
    """Issue 16: the report compares v1 and DFlash2 runs in one table, each row saying which draft
    it is (the recipe's draft.arch, else the checkpoint's config.json for a reference draft)."""
    import json

    db = tmp_path / "r.db"
    _training_run(tmp_path, "m2", "dflash", 16, M1, db)
    _training_run(tmp_path, "m2-dflash2", "dflash2", 8, M19_EP3, db)
    ref_dir = tmp_path / "published-dflash2"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text(json.dumps({"architectures": ["DFlash2DraftModel"]}))
    registry.ensure_run("z-lab-dflash2", "reference", db)
    ref = registry.ensure_checkpoint("z-lab-dflash2", "reference", db, path=str(ref_dir), sha256="ref")
    ref_results = fake_results(REFERENCE)
    ref_results["block_size"] = 8
    registry.record_eval(ref_results, db, checkpoint_id=ref)
    lines = report.progression_table(["m2", "m2-dflash2"], db, "z-lab-dflash2").splitlines()
    assert lines[2].startswith("| m2 | v1, block 16 | final | 5.00 |")
    assert lines[3].startswith("| m2-dflash2 | DFlash2, block 8 | final | 6.27 |")
    assert lines[3].endswith(f"| {avg(M19_EP3) - avg(M1):+.2f} |")
    assert lines[4].startswith("| z-lab-dflash2 (reference) | DFlash2, block 8 | reference |")
