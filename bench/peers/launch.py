"""Run one tool's trainer in this process, measured: `python launch.py TOOL STATS.json -- ARGS...`.

Runs under the tool's own venv python (ours: the project venv). Before calling the tool's entry
point it
- registers a global optimizer step hook (every torch.optim optimizer, any tool) that logs the
  process CPU time (user + sys, all threads) and wall time after each optimizer step;
- applies the tool's runtime patches (speculators on CPU; never edits their installed files);
and at exit writes STATS.json: the step log, rusage of this process and its children (CPU
seconds, peak RSS).

Self-contained (no dflash_lab import): it runs in the peers' venvs too.
"""

from __future__ import annotations

import json
import resource
import sys
import time

STEPS: list[dict] = []
_FIRST: list[int] = []


def _hook(opt, _args, _kwargs) -> None:
    # one entry per training step: the first optimizer that steps stands for the step (speculators'
    # default Muon mode steps a Muon and an AdamW optimizer every step)
    if not _FIRST:
        _FIRST.append(id(opt))
    if id(opt) == _FIRST[0]:
        STEPS.append({"cpu": time.process_time(), "wall": time.perf_counter()})


class _MaxSteps(Exception):
    """speculators reached --max-steps (see patch_speculators)."""


def patch_speculators() -> None:
    """The three CPU patches of issue 25: the trainer moves the model and every batch to
    `local_rank` (an int = a CUDA device), autocasts on `cuda` when no accelerator exists, and its
    step timer calls torch.accelerator.synchronize (which raises without an accelerator)."""
    import torch
    import speculators.train.trainer as T

    T.get_local_rank = lambda: "cpu"
    init = T.Trainer.__init__

    def __init__(self, *a, **k):
        init(self, *a, **k)
        self.device_type = "cpu"

    T.Trainer.__init__ = __init__
    # 0.9.0's run_training goes on to the next epoch after train_epoch stops at max_steps (one more
    # step and a checkpoint per epoch, forever): end the run there, with the epoch's checkpoint
    train_epoch = T.Trainer.train_epoch

    def stop_at_max_steps(self, epoch, **k):
        train_epoch(self, epoch, **k)
        if self.config.max_steps is not None and self.global_step >= self.config.max_steps:
            self.maybe_save_checkpoint(epoch)
            raise _MaxSteps(str(epoch))

    T.Trainer.train_epoch = stop_at_max_steps
    if torch.accelerator.current_accelerator() is None:
        torch.accelerator.synchronize = lambda *a, **k: None


def run_tool(tool: str, argv: list[str]) -> None:
    if tool == "speculators":
        patch_speculators()
        from speculators.train.cli import main
        from speculators.train.config import TrainConfig

        try:
            main(TrainConfig.resolve(argv))
        except _MaxSteps as done:
            print(f"launch.py: speculators stopped at --max-steps (checkpoint of epoch {done})", flush=True)
    elif tool == "specforge":
        from specforge.cli import main

        rc = main(argv)
        if rc:
            raise SystemExit(rc)
    elif tool == "ours":
        from dflash_lab.cli import main

        rc = main(argv)
        if rc:
            raise SystemExit(rc)
    else:
        raise SystemExit(f"launch.py: unknown tool {tool!r} (speculators, specforge, ours)")


def write_stats(path: str, wall0: float, cpu0: float) -> None:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"steps": STEPS, "cpu_start": cpu0, "wall_start": wall0, "wall_end": time.perf_counter(),
           "cpu_s_total": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
           "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024}
    with open(path, "w") as handle:
        json.dump(out, handle)


def main() -> None:
    tool, stats_path, sep, *argv = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: launch.py TOOL STATS.json -- ARGS...")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    import torch.optim.optimizer as O

    O.register_optimizer_step_post_hook(_hook)
    try:
        run_tool(tool, argv)
    finally:
        write_stats(stats_path, wall0, cpu0)


if __name__ == "__main__":
    main()
