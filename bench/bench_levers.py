"""Small-budget training levers on the embedded target, at equal wall time (issue: the demo).

    python bench/bench_levers.py --labels DEMO_OUT/labels --minutes 6 --variants scratch,init-target,ce,lr5e-3

Each variant trains the demo's stage-1 recipe (1-layer draft, 64 anchors, kd from scratch unless
the variant says otherwise) for the same wall time, two variants at a time with one thread each,
then reports the held-out simulated tau (SPEC section 4: walk the target's own continuation and
accept while the draft's greedy block matches) at the last evaluation and the steps it reached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "scratch": [],
    "init-target": ["draft.init_from_target_layers=true"],
    "ce": ["loss.name=ce"],
    "lr5e-3": ["train.lr=5e-3"],
    "anchors128": ["data.num_anchors=128"],
    "lr5e-3-init-target": ["train.lr=5e-3", "draft.init_from_target_layers=true"],
}


def recipe(cache: str) -> dict:
    from dflash_lab.demo import PRESETS, demo_recipe

    r = demo_recipe(PRESETS["default"], "stage1-kd", Path(cache))
    r["train"].update(max_steps=100000, eval_interval=10, save_every=100000, cpu_threads=1, keep_last=1)
    r["data"]["heldout_max"] = 16
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--variants", default="scratch,init-target,ce,lr5e-3")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    import yaml

    work = Path(args.work or tempfile.mkdtemp(prefix="levers-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    # each variant fills its own feature cache: the same footing for all
    base = recipe(str(work))
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    pending, running, rows = list(names), [], {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            out = work / name
            cmd = [sys.executable, "-m", "dflash_lab", "train", "--config", str(work / "base.yaml"),
                   "--data", args.labels, "--out", str(out), "--no-progress",
                   f"data.feature_cache={work / 'cache' / name}", *VARIANTS[name]]
            log = open(work / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(5)
        for item in list(running):
            name, proc, started = item
            if proc.poll() is not None or time.time() - started > args.minutes * 60:
                proc.kill()
                proc.wait()
                running.remove(item)
                metrics = [json.loads(line) for line in open(work / name / "metrics.jsonl")]
                evals = [m for m in metrics if "heldout_tau" in m]
                rows[name] = (metrics[-1]["step"], evals[-1]["heldout_tau"] if evals else None,
                              max((m["heldout_tau"] for m in evals), default=None), metrics[-1].get("loss"))
    print(f"{'variant':<22}{'steps':>7}{'last tau':>10}{'best tau':>10}{'loss':>9}   ({args.minutes} min each)")
    for name in names:
        steps, last, best, loss = rows[name]
        print(f"{name:<22}{steps:>7}{last:>10.3f}{best:>10.3f}{loss:>9.3f}")


if __name__ == "__main__":
    main()
