"""Measure an exported draft (our format) the same way for every tool.

- `heldout_tau`: our trainer's held-out simulated tau (`Evaluator.evaluate`: the same held-out
  split, the same fixed anchors, every slot scored), with the draft as `draft.init` of a trainer
  that never takes a step.
- `eval_draft`: `dflash-lab eval` on the demo's evaluation prompts (all five benchmarks, 2 prompts
  each, paper selection, 64 new tokens, lossless check on), fp32 on the CPU, one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = "/work/shared/data/benchmarks"
ROOT = Path(__file__).resolve().parents[2]


def heldout_tau(draft_dir: Path, labels: Path, recipe: dict, target) -> float:
    import torch

    from dflash_lab.train import distributed as D
    from dflash_lab.train.recipe import parse_recipe
    from dflash_lab.train.trainer import RunOptions, Trainer

    r = json.loads(json.dumps(recipe))
    r["draft"].update(init=str(draft_dir), init_from_target_layers=False)
    r["train"].update(max_steps=1, time_budget_s=None, min_steps=None)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunOptions(data_path=labels, out_dir=Path(tmp) / "run", progress=False, db=str(Path(tmp) / "db"))
        trainer = Trainer(parse_recipe(r), run, torch.device("cpu"), D.init_distributed("cpu"), target)
        return trainer.evaluator.evaluate()["heldout_tau"]


def eval_draft(draft_dir: Path, out: Path, limit: int = 2, max_new_tokens: int = 64) -> dict:
    """Run `dflash-lab eval` (a subprocess, niced); returns its results JSON."""
    if not out.exists():
        cmd = ["nice", "-n", "5", sys.executable, "-m", "dflash_lab", "eval", "--target", "smollm2-135m-instruct",
               "--draft", str(draft_dir), "--out", str(out), "--bench-dir", BENCH_DIR, "--limit", str(limit),
               "--selection", "paper", "--max-new-tokens", str(max_new_tokens), "--device", "cpu",
               "--dtype", "float32", "--no-db", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def eval_summary(res: dict) -> dict:
    """Pooled tau over every verify cycle of every benchmark, tokens/s, lossless."""
    benches = res["benchmarks"]
    cycles = sum(v.get("cycles") or 0 for v in benches.values())
    pooled = sum((v.get("tau_pooled") or 0) * (v.get("cycles") or 0) for v in benches.values())
    return {"tau_by_bench": {b: v.get("tau_pooled") for b, v in benches.items()},
            "tau_all": pooled / cycles if cycles else None,
            "tau_avg": res.get("tau_pooled_avg"),
            "tokens_per_s": _mean([v.get("tokens_per_s") for v in benches.values()]),
            "lossless": all(v.get("lossless", True) is not False for v in benches.values())}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
