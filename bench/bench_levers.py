"""Small-budget training levers on the embedded target, at equal wall time (issue: the demo).

    python bench/bench_levers.py --labels DEMO_OUT/labels --minutes 6 --variants base,layers5,slots4x128,ce

Each variant trains the demo's stage-1 recipe (kd from scratch unless the variant says otherwise)
with its schedule sized to the same time budget (`train.time_budget_s`), two variants at a time
with one thread each, then reports the held-out simulated tau of its final checkpoint (SPEC
section 4: walk the target's own continuation, accept while the draft's greedy block matches),
the steps it reached and its slot-1 training accuracy over the last 10 steps.
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
    "base": [],  # the demo recipe as it is now
    "all-slots": ["loss.max_slot=null"],  # the head over all 15 slots
    "s4-it28": ["loss.max_slot=4", "draft.init_from_target_layers=true", "draft.target_layer_ids=[28]"],
    "layers5": ["draft.target_layer_ids=[1,8,15,22,29]"],
    "slots4x128": ["loss.max_slot=4", "data.num_anchors=128"],
    "ce": ["loss.name=ce"],
    "lr5e-3": ["train.lr=5e-3"],
    "init-target": ["draft.init_from_target_layers=true"],
    "lr6e-4": ["train.lr=6e-4"],
    "anchors128": ["data.num_anchors=128"],
    # the head over 4 slots instead of 15: about 3x the steps in the same time
    "s4": ["loss.max_slot=4"],
    "s4-lr5e-3": ["loss.max_slot=4", "train.lr=5e-3"],
    "s4-init-target": ["loss.max_slot=4", "draft.init_from_target_layers=true"],
    "s4-ce": ["loss.max_slot=4", "loss.name=ce"],
    "s4-a96": ["loss.max_slot=4", "data.num_anchors=96"],
    "s4-lr1e-2": ["loss.max_slot=4", "train.lr=1e-2"],
    "s4-it-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3"],
    # the feature that feeds the copied last layer (layer 28's output): its K/V start as the target's
    "s4-it28-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                       "draft.target_layer_ids=[28]"],
    "s4-it28x3-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                         "draft.target_layer_ids=[8,18,28]"],
    "s4-it-lr5e-3-mb1": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                         "train.micro_batch=1", "train.global_batch=1"],
    "s4-lr5e-3-mb1": ["loss.max_slot=4", "train.lr=5e-3", "train.micro_batch=1", "train.global_batch=1"],
}


def recipe(cache: str, minutes: float) -> dict:
    from dflash_lab.demo import PRESETS, demo_recipe

    r = demo_recipe(PRESETS["default"], "stage1-kd", Path(cache))
    # the schedule is sized to the time budget; one held-out evaluation, at the end
    r["train"].update(max_steps=100000, time_budget_s=minutes * 60, eval_interval=0, save_every=0,
                      cpu_threads=1, keep_last=1)
    r["data"]["heldout_max"] = 16
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--variants", default="base,layers5,slots4x128,ce,lr5e-3,init-target")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--set", action="append", default=[], help="extra override for every variant")
    args = parser.parse_args()
    import yaml

    work = Path(args.work or tempfile.mkdtemp(prefix="levers-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    (work / "base.yaml").write_text(yaml.safe_dump(recipe(str(work), args.minutes)))
    pending, running, rows = list(names), [], {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            # each variant fills its own feature cache inside its budget: the same footing for all
            cmd = [sys.executable, "-m", "dflash_lab", "train", "--config", str(work / "base.yaml"),
                   "--data", args.labels, "--out", str(work / name), "--no-progress",
                   f"data.feature_cache={work / 'cache' / name}", *args.set, *VARIANTS[name]]
            log = open(work / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(5)
        for item in list(running):
            name, proc, started = item
            if proc.poll() is None and time.time() - started < args.minutes * 120 + 300:
                continue
            proc.kill()
            proc.wait()
            running.remove(item)
            wall = time.time() - started
            metrics = [json.loads(line) for line in open(work / name / "metrics.jsonl")]
            final = [m for m in metrics if m.get("name") == "final"]
            steps = [m for m in metrics if "acc_per_slot" in m]
            tau = final[-1].get("heldout_tau") if final else None
            acc1 = sum(m["acc_per_slot"][0] for m in steps[-10:]) / max(len(steps[-10:]), 1)
            rows[name] = (metrics[-1]["step"], tau, acc1, steps[-1]["loss"] if steps else float("nan"), wall)
            print(f"done {name}: {rows[name]}", flush=True)
    print(f"{'variant':<14}{'steps':>7}{'held-out tau':>14}{'train acc@1':>13}{'loss':>9}{'wall s':>8}"
          f"   ({args.minutes} min budget each, {args.parallel} at a time, 1 thread each)")
    for name in names:
        steps, tau, acc1, loss, wall = rows[name]
        print(f"{name:<14}{steps:>7}{tau if tau is not None else float('nan'):>14.3f}{acc1:>13.3f}{loss:>9.3f}{wall:>8.0f}")


if __name__ == "__main__":
    main()
