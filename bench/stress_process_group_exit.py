"""How often a finished two-rank gloo run dies at exit, with and without `close_process_group`:

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/stress_process_group_exit.py --runs 40

Each run spawns two ranks that wrap a small model in DDP, take three backward steps, drop the
wrapper and close the group, either with `dist.destroy_process_group()` alone ("plain") or with
`distributed.close_process_group()` (which collects the wrapper first). The two variants alternate.
A rank that aborts at exit ("terminate called without an active exception", SIGABRT) fails its run.
Not a test: the failure is rare (a few percent of plain runs), so it needs many runs to show.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from dflash_lab.train import distributed as D


def _rank(rank: int, init_file: str, variant: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _train_and_drop_the_wrapper()
    finally:
        if variant == "close_process_group":
            D.close_process_group()
        else:
            dist.destroy_process_group()


def _train_and_drop_the_wrapper() -> None:
    wrapper = DDP(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]), broadcast_buffers=False)
    for _ in range(3):
        wrapper(torch.randn(8, 64)).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="runs per variant")
    args = parser.parse_args()
    failures = {"plain": 0, "close_process_group": 0}
    start = time.time()
    for _ in range(args.runs):
        for variant in failures:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    mp.spawn(_rank, args=(f"{tmp}/init", variant), nprocs=2, join=True)
                except mp.ProcessExitedException:
                    failures[variant] += 1
    print(f"{'variant':<22}{'runs':>6}{'aborted':>9}")
    for variant, n in failures.items():
        print(f"{variant:<22}{args.runs:>6}{n:>9}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
