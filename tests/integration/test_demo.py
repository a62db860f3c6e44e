"""The whole journey, end to end, on the embedded target: `dflash-lab demo` (CI's test preset)."""

import json

import pytest

from dflash_lab.cli import main

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_resume_skips_everything(tmp_path, bench_dir, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--preset", "test", "--out", str(out), "--bench-dir", str(bench_dir)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "| stage1-kd |" in printed.out and "| stage2-survival-eal |" in printed.out

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["stage1-kd", "stage2-survival-eal"]  # training order
    benchmarks = {"gsm8k", "math500", "humaneval", "mbpp", "mt-bench"}
    assert set(summary["baseline"]["prompt-lookup"]) == benchmarks
    for stage in summary["stages"].values():
        assert set(stage) == benchmarks and all(tau >= 1.0 for tau in stage.values())
    assert (out / "runs" / "stage2-survival-eal" / "checkpoints").is_dir()
    assert summary["final_draft"].startswith(str(out / "runs" / "stage2-survival-eal" / "checkpoints"))
    assert (out / summary["final_draft"] / "config.json").is_file()
    run2 = json.loads((out / "runs" / "stage2-survival-eal" / "run.json").read_text())
    assert run2["parent"] and "stage1-kd" in run2["parent"]  # warm-started from stage 1

    report = (out / "report" / "report.md").read_text()
    assert "stage1-kd" in report and "stage2-survival-eal" in report and "prompt-lookup" in report
    assert (out / "report" / "tau_per_benchmark.png").stat().st_size > 1000
    for name in ("stage1-kd", "stage2-survival-eal", "prompt-lookup"):
        result = json.loads((out / "eval" / f"{name}.json").read_text())
        for bench in result["benchmarks"].values():
            assert bench["lossless"] is True  # every response equalled plain greedy

    # a rerun skips every finished stage: nothing is trained, labelled or evaluated again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "report" not in p.parts}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "training" not in err and "evaluating" not in err and "regenerating" not in err
    for path, stamp in stamps.items():
        if path.name not in ("demo_state.json", "summary.json", "dflash-lab.db"):
            assert path.stat().st_mtime_ns == stamp, path
