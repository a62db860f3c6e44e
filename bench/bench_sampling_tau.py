"""tau at T = 0 and at T > 0 for a draft and prompt lookup, on the same prompts (builtin loop).

    python bench/bench_sampling_tau.py --draft DIR [--target smollm2-135m-instruct] \
        --bench-dir ../shared/data/benchmarks --limit 4 --max-new-tokens 64 --seed 0

Prints one markdown table (pooled tau per benchmark and the average) for the four combinations
(draft | prompt-lookup) x (greedy | T 0.7 / top-p 0.8 / top-k 20, Qwen3's non-thinking recommendation).
Sampled numbers depend on the seed: they are one sample of each response, not an expectation.
"""

from __future__ import annotations

import argparse
import json
import time

from dflash_lab.decoding.sampling import SamplingParams
from dflash_lab.eval.benchmarks import load_selected, parse_benchmark_names
from dflash_lab.eval.harness import evaluate, load_prompt_target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--bench-dir", required=True)
    ap.add_argument("--benchmarks", default="gsm8k,math500,humaneval,mbpp,mt-bench")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write all numbers as JSON here")
    ap.add_argument("--lossless-check", action="store_true", help="T = 0: also re-decode greedily and compare")
    args = ap.parse_args()

    target = load_prompt_target(args.target)
    names = parse_benchmark_names(args.benchmarks)
    benches = load_selected(names, args.bench_dir, args.limit, "paper", allow_pypi=False, allow_hub=False)
    settings = {"T=0 (greedy)": SamplingParams(),
                "T=0.7 top-p 0.8 top-k 20": SamplingParams(0.7, top_p=0.8, top_k=20, seed=args.seed)}
    rows = []
    for who in (args.draft, "prompt-lookup"):
        for label, sampling in settings.items():
            t0 = time.perf_counter()
            results = evaluate(target, who, benches, limit=args.limit, max_new_tokens=args.max_new_tokens,
                               lossless_check=args.lossless_check and sampling.greedy, progress=False, sampling=sampling)
            taus = {b: r["tau_pooled"] for b, r in results["benchmarks"].items()}
            lossless = {b: r["lossless"] for b, r in results["benchmarks"].items()}
            rows.append({"drafter": "draft" if who == args.draft else who, "sampling": label, "tau": taus,
                         "avg": results["tau_pooled_avg"], "lossless": lossless,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| drafter | sampling | " + " | ".join(names) + " | avg |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for r in rows:
        print(f"| {r['drafter']} | {r['sampling']} | " + " | ".join(f"{r['tau'][b]:.2f}" for b in names)
              + f" | {r['avg']:.2f} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
