"""Padding of random vs length-grouped batch order (issue 13), on bench_data.py's length distribution.

    python bench/bench_padding.py                     # 20,000 samples, global batch 64, micro 8 / 4 / 2
    python bench/bench_padding.py --samples 200000 --micro 8,2 --num-anchors 512

A micro-batch pads every sequence to its longest (target tokens) and its largest anchor count (draft
block tokens = anchors x block size), so this is the share of each that is padding, per order, as
the trainer's own sampler (`dflash_lab.train.sampler.epoch_order`) lays out epoch 0. Response lengths
are `bench_data.response_lengths` (log-normal, median 600 tokens, sigma 0.65, capped at 3,072);
prompts are 100 tokens; anchor candidates = response tokens - 1 (every supervised position that has
a supervised successor), capped at `--num-anchors` as the trainer caps them. Pure arithmetic: no
model, seconds on any machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_data import response_lengths  # noqa: E402

from dflash_lab.train.sampler import SamplerConfig, epoch_order, padding_fraction  # noqa: E402


def padding_table(samples: int, global_batch: int, micros: list[int], num_anchors: int, prompt: int,
                  window: int, seed: int) -> list[dict]:
    responses = response_lengths(samples, seed)
    lengths = responses + prompt
    anchors = np.minimum(responses - 1, num_anchors)
    steps = samples // global_batch
    rows = []
    for micro in micros:
        row = {"micro_batch": micro}
        for grouped in (False, True):
            cfg = SamplerConfig(seed=seed, global_batch=global_batch, group_by_length=grouped, window=window)
            order = epoch_order(cfg, 0, lengths, anchors)
            kind = "grouped" if grouped else "random"
            row[f"target_{kind}"] = padding_fraction(order, micro, lengths, steps * global_batch // micro)
            row[f"draft_{kind}"] = padding_fraction(order, micro, anchors, steps * global_batch // micro)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro", default="8,4,2", help="micro-batch sizes, comma-separated")
    ap.add_argument("--num-anchors", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--window", type=int, default=8, help="global batches per sorting window (data.group_window)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = padding_table(args.samples, args.global_batch, [int(m) for m in args.micro.split(",")], args.num_anchors,
                         args.prompt_tokens, args.window, args.seed)
    print(f"{args.samples} samples, global batch {args.global_batch}, window {args.window}, "
          f"anchors capped at {args.num_anchors}, prompt {args.prompt_tokens} tokens")
    print("| micro-batch | target tokens: random / grouped | draft block tokens: random / grouped |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['micro_batch']} | {r['target_random']:.1%} / {r['target_grouped']:.1%} "
              f"| {r['draft_random']:.1%} / {r['draft_grouped']:.1%} |")


if __name__ == "__main__":
    main()
