"""dflash-lab side by side with SpecForge and vLLM's speculators at equal CPU seconds (issue 25; not a test).

    nice -n 5 python bench/bench_peers.py --work DIR [--cpu-seconds N] [--settings method,defaults]
        [--tools ours,speculators,specforge] [--jobs 2]

1. installs each peer in a venv of its own (bench/peers/install.py: pinned, torch 2.13.0 CPU, --no-deps);
2. the demo's label set (its prompt pack + the target's greedy labels; bench/peers/data.py) and one set
   of target features in each tool's format (bench/peers/features.py);
3. per setting and tool: a 4-step calibration run gives CPU seconds per step, then a run of
   N / (CPU s per step) steps (bench/peers/tools.py for the settings, launch.py for the measurement:
   CPU = user + sys of the trainer's process and its threads between its first and last optimizer step);
4. exports every draft to our format (bench/peers/export.py) and measures it the same way
   (bench/peers/evaluate.py): held-out simulated tau, `dflash-lab eval` pooled tau on the demo's
   evaluation prompts (lossless check on), tokens/s.
Everything lands in DIR (rerunning reuses what finished); the table is printed and written to DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import evaluate, export, install, run, tools  # noqa: E402
from peers.data import demo_labels  # noqa: E402
from peers.features import FeatureSet, build_features  # noqa: E402

CALIBRATION_STEPS = 4


def home() -> Path:
    return Path(os.environ.get("DFLASH_LAB_HOME", Path.home() / ".cache" / "dflash-lab"))


def train_one(work: Path, feats: dict, labels: Path, tool: str, setting: str, budget: float) -> dict:
    """Calibrate, then train for about `budget` CPU seconds; returns the run's stats."""
    base = work / "runs" / setting / tool
    calib = run.run_job(tools.Job(tool, setting, CALIBRATION_STEPS, base / "calibration", feats, labels), home())
    steps = max(CALIBRATION_STEPS, round(budget / calib["cpu_s_per_step"]))
    stats = run.run_job(tools.Job(tool, setting, steps, base / "train", feats, labels), home())
    return {**stats, "calibration_cpu_s_per_step": calib["cpu_s_per_step"]}


def exported(work: Path, feats: dict, tool: str, setting: str) -> Path:
    out = work / "runs" / setting / tool / "train"
    if tool == "ours":
        return tools.ours_export(tools.Job(tool, setting, 0, out, feats, Path()))
    if tool == "specforge":
        return export.specforge_export(str(install.python_of(home(), "specforge")), out, feats["peer_target"])
    draft_cfg = tools.draft_config_json(Path(feats["peer_target"]))
    return export.speculators_to_ours(export.latest_speculators_checkpoint(out / "ckpt"), draft_cfg, out / "ours-format")


def heldout(work: Path, feats: dict, labels: Path, tool: str, setting: str, target) -> dict:
    draft = exported(work, feats, tool, setting)
    recipe = tools.ours_recipe(tools.Job("ours", "method", 1, work / "heldout", feats, labels))
    return {"draft": str(draft), "heldout_tau": evaluate.heldout_tau(draft, labels, recipe, target)}


def eval_one(work: Path, draft: str, tool: str, setting: str) -> dict:
    return evaluate.eval_summary(evaluate.eval_draft(Path(draft), work / "runs" / setting / tool / "eval.json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--cpu-seconds", type=float, default=240.0, help="training CPU seconds per run")
    ap.add_argument("--settings", default=",".join(tools.SETTINGS))
    ap.add_argument("--tools", default=",".join(tools.TOOLS))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU seconds are per process)")
    args = ap.parse_args(argv)
    settings, names = args.settings.split(","), args.tools.split(",")
    bad = [s for s in settings if s not in tools.SETTINGS] + [t for t in names if t not in tools.TOOLS]
    if bad:
        ap.error(f"unknown setting/tool {bad}; settings {tools.SETTINGS}, tools {tools.TOOLS}")
    work = args.work.resolve()
    for t in names:
        if t != "ours":
            install.install(home(), t)
    labels = demo_labels(work)
    feats = build_features(work, labels, FeatureSet(layer_ids=[tools.LAYER_ID], max_length=tools.MAX_LEN))
    pairs = [(s, t) for s in settings for t in names]
    with ThreadPoolExecutor(args.jobs) as pool:
        stats = dict(zip(pairs, pool.map(lambda p: train_one(work, feats, labels, p[1], p[0], args.cpu_seconds), pairs)))
    from dflash_lab.models.target import load_target

    target = load_target("smollm2-135m-instruct", dtype="float32")
    held = {p: heldout(work, feats, labels, p[1], p[0], target) for p in pairs}
    with ThreadPoolExecutor(args.jobs) as pool:  # each eval is a subprocess
        evals = dict(zip(pairs, pool.map(lambda p: eval_one(work, held[p]["draft"], p[1], p[0]), pairs)))
    results = {f"{s}/{t}": {**stats[(s, t)], **held[(s, t)], **evals[(s, t)]} for s, t in pairs}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    table = format_table(results, settings, names, args.cpu_seconds)
    (work / "table.md").write_text(table)
    print(table)
    return 0


def _f(x, d=2):
    return "-" if x is None else f"{x:.{d}f}"


def format_table(results: dict, settings: list[str], names: list[str], budget: float) -> str:
    head = ("| setting | tool | steps | train CPU s | CPU s / step | train wall s | process CPU s | peak RSS MB "
            "| held-out tau | eval tau pooled | eval tau avg of 5 | eval tok/s | lossless |\n|" + "---|" * 13)
    rows = [head]
    for s in settings:
        for t in names:
            r = results[f"{s}/{t}"]
            rows.append(f"| {s} | {t} | {r['steps']} | {_f(r['train_cpu_s'], 0)} | {_f(r['cpu_s_per_step'])} | "
                        f"{_f(r['train_wall_s'], 0)} | {_f(r['cpu_s_total'], 0)} | {_f(r['peak_rss_mb'], 0)} | "
                        f"{_f(r['heldout_tau'], 3)} | {_f(r['tau_all'], 3)} | {_f(r['tau_avg'], 3)} | {_f(r['tokens_per_s'])} | "
                        f"{'yes' if r['lossless'] else 'NO'} |")
    rows.append("\nRatios ours / peer (held-out tau - 1, eval tau - 1: the drafted tokens per step; steps per CPU s):\n")
    rows.append("| setting | peer | held-out (tau-1) | eval (tau-1) | steps per CPU s |\n|---|---|---|---|---|")
    for s in settings:
        if "ours" not in names:
            break
        o = results[f"{s}/ours"]
        for t in (n for n in names if n != "ours"):
            p = results[f"{s}/{t}"]
            ratio = lambda a, b: None if not b else a / b  # noqa: E731
            rows.append(f"| {s} | {t} | {_f(ratio(o['heldout_tau'] - 1, p['heldout_tau'] - 1))} | "
                        f"{_f(ratio((o['tau_all'] or 1) - 1, (p['tau_all'] or 1) - 1))} | "
                        f"{_f(ratio(p['cpu_s_per_step'], o['cpu_s_per_step']))} |")
    return "\n".join(rows) + f"\n\nBudget: {budget:.0f} training CPU seconds per run.\n"


if __name__ == "__main__":
    raise SystemExit(main())
