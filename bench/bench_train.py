"""CPU training throughput of the DFlash trainer on the embedded target (not a test).

    python bench/bench_train.py                      # both variants, a short run each
    python bench/bench_train.py --steps 6 --threads 2 --data out/labels/smollm2

For each variant (online target features; the feature cache, pre-filled) it runs the real trainer
(`dflash_lab.train.trainer.train`) with recipes/smollm2-135m/cpu.yaml in a fresh subprocess and
reports sequences/s, block tokens/s (anchors x block size per second), seconds per step and the process's peak RSS. Without --data it builds a labelled set from GSM8K
test questions and reference answers (the target did not write them: fine for throughput, not for
tau).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m" / "cpu.yaml"


def build_data(path: Path, n: int) -> Path:
    src = Path("/work/shared/data/benchmarks/gsm8k.test.jsonl")
    rows = []
    with open(src) as handle:
        for i, line in enumerate(handle):
            if i >= n:
                break
            r = json.loads(line)
            answer = r["answer"].replace("<<", "").replace(">>", " ")
            rows.append({"id": f"gsm8k-{i}", "category": "math", "source": "gsm8k",
                         "messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": answer + "\n\n" + answer}],
                         "response_tokens": 0, "finish_reason": "stop"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_variant(args) -> dict:
    """Inside the subprocess: one variant, JSON on the last stdout line."""
    import torch

    from dflash_lab.models.target import load_target
    from dflash_lab.train.recipe import load_recipe
    from dflash_lab.train.trainer import train

    torch.set_num_threads(args.threads)
    target = load_target(args.target, dtype="float32")
    overrides = [f"train.max_steps={args.steps}", "train.save_every=0", "train.eval_interval=0", "data.heldout=0",
                 f"train.cpu_threads={args.threads}", "train.epochs=100"]
    cache_s = None
    if args.variant == "cache":
        cache_dir = Path(args.work) / "feature-cache"
        overrides.append(f"data.feature_cache={cache_dir}")
        recipe = load_recipe(RECIPE, overrides)
        # pre-fill the cache (what the first epoch does) so the timed steps read it
        from dflash_lab.train.data import FeatureCache, read_records, tokenize_records
        from dflash_lab.train.trainer import FeatureSource
        from dflash_lab.models.target import default_target_layer_ids

        samples, _ = tokenize_records(target, read_records(args.data), recipe.data.max_length)
        layer_ids = default_target_layer_ids(target.num_layers, recipe.draft.num_layers)
        cache = FeatureCache(cache_dir, target.fingerprint, layer_ids)
        src = FeatureSource(target, layer_ids, True, cache, torch.device("cpu"))
        t0 = time.perf_counter()
        for s in samples:
            src.get([s])
        cache_s = time.perf_counter() - t0
    else:
        overrides.append("data.feature_cache=null")
        recipe = load_recipe(RECIPE, overrides)
    out = Path(args.work) / f"run-{args.variant}"
    t0 = time.perf_counter()
    train(recipe, args.data, out, target=target, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    timed = rows
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    block_tokens = sum(r["block_tokens_per_s"] * r["step_s"] for r in timed) / len(timed)
    seqs = recipe.train.global_batch or recipe.train.micro_batch
    return {
        "variant": args.variant, "steps": len(rows), "step_s": step_s, "sequences_per_s": seqs / step_s,
        "block_tokens_per_s": block_tokens / step_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": wall, "cache_fill_s": cache_s, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--data", help="labelled dataset (default: built from GSM8K)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="online,cache")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = args.data or str(build_data(work / "labels.jsonl", args.samples))
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--data", data, "--target", args.target,
               "--steps", str(args.steps), "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"# bench_train: {args.target}, recipe {RECIPE.relative_to(ROOT)}, {args.steps} steps, "
          f"threads {args.threads}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print("| variant | steps | s/step | sequences/s | block tokens/s | peak RSS MB | cache fill s | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        fill = f"{r['cache_fill_s']:.1f}" if r["cache_fill_s"] is not None else "-"
        print(f"| {r['variant']} | {r['steps']} | {r['step_s']:.2f} | {r['sequences_per_s']:.2f} | {r['block_tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {fill} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
