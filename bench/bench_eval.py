"""Benchmark of the `builtin` eval backend on the embedded target (CPU): tokens/s of speculative
decoding with a draft (and with prompt-lookup) against plain greedy, per benchmark, and the cost of
the lossless check (a greedy re-decode of every response).

    python bench/bench_eval.py --bench-dir ../shared/data/benchmarks                # random 1-layer draft
    python bench/bench_eval.py --bench-dir ../shared/data/benchmarks --draft DIR    # a trained draft
    python bench/bench_eval.py --limit 4 --max-new-tokens 64 --threads 2 --out bench/eval-bench.json

Not a test: it prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from dflash_lab.eval.benchmarks import BENCHMARKS, load_selected
from dflash_lab.eval.harness import evaluate, write_results
from dflash_lab.models.target import load_target


def random_draft(target, out: Path, block_size: int, layers: int) -> Path:
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    draft = DFlashDraftModel(build_draft_config(target, num_layers=layers, block_size=block_size))
    draft.init_weights(seed=0)
    return save_draft(draft, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--draft", help="draft directory (default: a random 1-layer draft, block 16)")
    p.add_argument("--bench-dir", help="benchmark files (default: hub, then PyPI)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-prompt-lookup", action="store_true")
    p.add_argument("--out", help="also write the raw results JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_target(args.target)
    benches = load_selected(args.benchmarks.split(","), args.bench_dir, args.limit, "paper")
    tmp = tempfile.TemporaryDirectory()
    draft = args.draft or str(random_draft(target, Path(tmp.name) / "draft", 16, 1))
    drafters = [("draft" if args.draft else "random draft", draft)]
    if not args.no_prompt_lookup:
        drafters.append(("prompt-lookup", "prompt-lookup"))

    rows, raw = [], {}
    for label, drafter in drafters:
        start = time.perf_counter()
        results = evaluate(target, drafter, benches, args.bench_dir, args.limit, "paper", args.max_new_tokens,
                           lossless_check=True, progress=True)
        total = time.perf_counter() - start
        raw[label] = results
        for name, b in results["benchmarks"].items():
            rows.append([label, name, b["num_responses"], b["generated_tokens"], b["tau_pooled"],
                         b["tokens_per_s"], b["greedy_tokens_per_s"], b["speedup"],
                         (b["wall_s"] + b["greedy_wall_s"]) / b["wall_s"], b["lossless"]])
        print(f"{label}: {total:.0f} s in all")

    print(f"\n{args.target} on {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, {args.limit} samples x {args.max_new_tokens} new tokens per benchmark\n")
    print("| drafter | benchmark | responses | tokens | tau pooled | spec tok/s | greedy tok/s | speedup | "
          "wall with lossless check / without | lossless |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f}x | "
              f"{r[8]:.2f}x | {r[9]} |")
    if args.out:
        write_results(raw, args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
