"""The stateful parts of a training run, each small, with a typed config (torchtitan's layout).

    DraftParts     the draft, its AdamW optimizer and the schedule (cosine_lr); state_dict: the
                   weights and the optimizer's state
    Progress       step and the schedule's length (fixed by the time budget or not); state_dict
    TimeBudget     train.time_budget_s: times the first steps and fixes the schedule's length
    Evaluator      held-out simulated tau, every `eval_interval` steps and at each checkpoint
    Metrics        step statistics accumulated on the device, read once per log interval
                   (state_dict: the open interval); metrics.jsonl, TensorBoard, the progress bar
    RunRecord      run.json
The data loader (`loader.TrainLoader`, state: the data position) is another; `trainer.Trainer`
builds them and hands the stateful ones, by name, to the one `checkpointer.Checkpointer`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dflash_lab.fileio import atomic_write_text
from dflash_lab.train import distributed as D
from dflash_lab.train.checkpointer import DraftState
from dflash_lab.train.step import heldout_metrics


# -- schedule --------------------------------------------------------------------------------------
def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = math.ceil(total_steps * warmup_ratio)
    min_lr = base_lr * min_lr_ratio
    if step < warmup:  # 1) linear warmup from base_lr/warmup up to base_lr
        return base_lr * (step + 1) / warmup
    if step >= total_steps:  # 3) past the end: the floor
        return min_lr
    # 2) cosine decay from base_lr (first step after warmup) towards min_lr (at total_steps)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class OptimConfig:
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.0
    clip: float | None = 1.0


class DraftParts(DraftState):
    """The draft (fp32 master weights), its optimizer and the learning-rate schedule; its state
    (`DraftState`): the weights and the optimizer's."""

    def __init__(self, draft: torch.nn.Module, cfg: OptimConfig):
        super().__init__(draft, torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                                  weight_decay=cfg.weight_decay))
        self.cfg = cfg
        self.params = [p for p in draft.parameters() if p.requires_grad]

    def set_lr(self, step: int, total_steps: int) -> float:
        lr = cosine_lr(step, total_steps, self.cfg.lr, self.cfg.warmup_ratio, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> torch.Tensor:
        """Clip, step, zero; returns the gradient norm (a device tensor: no sync)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip if self.cfg.clip else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


@dataclass
class Progress:
    """Where the run is (the loader holds the data position) and how long its schedule is."""

    step: int = 0
    total_steps: int = 0
    budget_fixed: bool = True
    """False while train.time_budget_s has not yet decided `total_steps`."""

    def state_dict(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "budget_fixed": self.budget_fixed}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        if not self.budget_fixed and state.get("budget_fixed"):  # a length the budget decided stays
            self.total_steps, self.budget_fixed = state["total_steps"], True


@dataclass
class TimeBudget:
    """train.time_budget_s: the three steps after the first (which pays warm-up costs) are timed,
    averaged over ranks so that every rank decides the same length, and the schedule becomes
    budget / step time steps (never fewer than `min_steps`, never more than it was)."""

    seconds: float | None
    min_steps: int = 0
    _mark: tuple[float, int] | None = None  # (time, step) where the timing starts

    def observe(self, progress: Progress, info: D.DistInfo) -> bool:
        """Called after each step; True when this call fixed `progress.total_steps`."""
        if progress.budget_fixed:
            return False
        if self._mark is None:
            self._mark = (time.perf_counter(), progress.step)
            return False
        timed = progress.step - self._mark[1]
        if timed < 3:
            return False
        seconds = torch.tensor([(time.perf_counter() - self._mark[0]) / timed], dtype=torch.float64)
        per_step = float(D.all_reduce_sum(seconds, info)[0]) / max(info.world_size, 1)
        progress.total_steps = min(progress.total_steps,
                                   max(progress.step, self.min_steps, int(self.seconds / per_step)))
        progress.budget_fixed = True
        return True


@dataclass
class EvalConfig:
    seed: int
    """The held-out anchors are drawn from it, the same at every evaluation."""
    every: int = 0
    """train.eval_interval: evaluate every this many steps (0: only at checkpoints)."""
    lockstep: bool = False
    """Every rank runs the target equally often (target.fsdp gathers per layer)."""


class Evaluator:
    """Held-out simulated tau of the draft (`step.heldout_metrics`); no state of its own."""

    def __init__(self, cfg: EvalConfig, draft: torch.nn.Module, target, features, heldout, fwd,
                 info: D.DistInfo):
        self.cfg, self.draft, self.target, self.features, self.heldout = cfg, draft, target, features, heldout
        self.fwd, self.info = fwd, info

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def evaluate(self) -> dict[str, float]:
        """`heldout_tau` (and DFlash2's `heldout_unary_tau`); empty when the held-out split is."""
        return heldout_metrics(self.draft, self.draft.config, self.target, self.features, self.heldout, self.fwd,
                               self.info, self.cfg.seed, lockstep=self.cfg.lockstep)


# -- metrics ---------------------------------------------------------------------------------------
STAT_KEYS = ("loss", "tau_sum", "blocks", "block_tokens", "valid_slots", "kl_sum", "ce_sum")
HELDOUT_KEYS = ("heldout_tau", "heldout_unary_tau")  # Evaluator.evaluate's keys (the second: DFlash2)


def selector_keys(stats: dict) -> list[str]:
    """A DFlash2 draft's selector metric sums (`selector_loss.selector_stats`), in a fixed order."""
    return sorted(k for k in stats if k.startswith("sel_") or k == "unary_tau_sum")


@dataclass
class MetricsConfig:
    out_dir: Path
    block_size: int
    global_batch: int
    log_every: int = 1
    progress: bool = True


@dataclass
class _Window:
    """Sums over the steps since the last read, on the device."""

    vec: torch.Tensor | None = None
    steps: int = 0
    seconds: float = 0.0
    grad_norm: torch.Tensor | None = None


class Metrics:
    """Statistics of each step stay on the device; `read` all-reduces and syncs once per log
    interval and reports the interval's means (with log_every 1: the step's own)."""

    def __init__(self, cfg: MetricsConfig, info: D.DistInfo):
        self.cfg, self.info = cfg, info
        self.window = _Window()
        self.extra_keys: list[str] = []  # DFlash2: selector sums, after the per-slot counts
        self.writer = None
        self.bar = None

    def open(self, initial_step: int, total_steps: int) -> None:
        """TensorBoard's writer and the progress bar (rank 0), at the step the run starts from
        (known once a resumed run has loaded its checkpoint)."""
        if not self.info.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.cfg.out_dir / "tb"), purge_step=initial_step or None)
        except Exception:  # tensorboard missing: metrics.jsonl still has everything
            self.writer = None
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def add_step(self, loss: torch.Tensor, stats: dict, grad_norm: torch.Tensor, seconds: float) -> None:
        vec = torch.cat([torch.stack([loss.detach().double().reshape(()).to(stats["tau_sum"].device)]
                                     + [stats[k] for k in STAT_KEYS[1:]]),
                         stats["correct_per_slot"], stats["valid_per_slot"]])
        self.extra_keys = selector_keys(stats)
        if self.extra_keys:
            vec = torch.cat([vec, torch.stack([stats[k].to(vec) for k in self.extra_keys])])
        w = self.window
        w.vec = vec if w.vec is None else w.vec.to(vec) + vec
        w.steps += 1
        w.seconds += seconds
        w.grad_norm = grad_norm.detach()

    def read(self, lr: float, epoch: float) -> dict:
        """The interval's metrics over all ranks (one all-reduce, one sync)."""
        w, bsz = self.window, self.cfg.block_size
        vec = D.all_reduce_sum(w.vec.detach().cpu(), self.info)
        steps = max(w.steps, 1)
        correct, counts = vec[7:7 + bsz], vec[7 + bsz:7 + 2 * bsz]
        acc = (correct / counts.clamp_min(1)).tolist()
        dt = w.seconds / steps
        out = {
            "loss": float(vec[0] / steps), "train_tau": float(vec[1] / max(vec[2], 1)),
            "ce": float(vec[6] / max(vec[4], 1)), "kl": float(vec[5] / max(vec[4], 1)),
            "lr": lr, "grad_norm": float(w.grad_norm), "step_s": dt,
            "sequences_per_s": self.cfg.global_batch / dt, "block_tokens_per_s": float(vec[3]) / steps / dt,
            "acc_per_slot": [round(x, 5) for x in acc[1:]], "epoch": epoch,
        }
        if self.extra_keys:  # selector recall, masses, accuracy, selector-walk tau beside unary tau
            from dflash_lab.train.selector_loss import summarise_stats

            out.update(summarise_stats(dict(zip(self.extra_keys, vec[7 + 2 * bsz:].tolist()))))
        self.window = _Window()
        return out

    def state_dict(self) -> dict:
        """The open interval (steps since the last log), summed over ranks: a collective, so every
        rank calls it (Checkpointer.save does). Empty when the last step was logged."""
        w = self.window
        if w.vec is None:
            return {}
        vec = D.all_reduce_sum(w.vec.detach().cpu(), self.info)
        return {"sums": vec.tolist(), "steps": w.steps, "seconds": w.seconds,
                "grad_norm": float(w.grad_norm), "extra_keys": list(self.extra_keys)}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run's first log covers the whole interval, as the uninterrupted run's: the
        summed window goes to rank 0 only (`read` sums over ranks again)."""
        if not state:
            return
        sums = torch.tensor(state["sums"], dtype=torch.float64)
        self.window = _Window(vec=sums if self.info.is_main else torch.zeros_like(sums), steps=state["steps"],
                              seconds=state["seconds"], grad_norm=torch.tensor(state["grad_norm"]))
        self.extra_keys = list(state.get("extra_keys", []))

    def due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0

    def write(self, step: int, metrics: dict) -> None:
        if not self.info.is_main:
            return
        append_metrics(self.cfg.out_dir / "metrics.jsonl", {"step": step, **metrics})
        if self.writer is not None:
            for key in ("loss", "train_tau", "ce", "kl", "lr", "grad_norm", "sequences_per_s", "block_tokens_per_s"):
                if key in metrics:
                    self.writer.add_scalar(f"train/{key}", metrics[key], step)
            self._write_heldout(step, metrics)
            for key in sorted(k for k in metrics if k.startswith("selector_") or k == "unary_tau"):
                self.writer.add_scalar(f"selector/{key}", metrics[key], step)
            for k, a in enumerate(metrics.get("acc_per_slot", []), 1):
                self.writer.add_scalar(f"acc/slot_{k:02d}", a, step)

    def write_event(self, step: int, row: dict) -> None:
        if not self.info.is_main:
            return
        if self.writer is not None:
            self._write_heldout(step, row)
        append_metrics(self.cfg.out_dir / "metrics.jsonl", {"step": step, **row})

    def _write_heldout(self, step: int, metrics: dict) -> None:
        for key in HELDOUT_KEYS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", metrics[key], step)

    def tick(self, metrics: dict | None) -> None:
        if self.bar is None:
            return
        if metrics:
            post = {"loss": f"{metrics['loss']:.3f}", "tau": f"{metrics['train_tau']:.2f}", "lr": f"{metrics['lr']:.1e}"}
            if "heldout_tau" in metrics:
                post["eval_tau"] = f"{metrics['heldout_tau']:.2f}"
            self.bar.set_postfix(post)
        self.bar.update(1)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they are about to be recomputed)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


# -- run.json --------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    path: Path
    data: dict = field(default_factory=dict)

    def write(self, run: dict, resume_from: Path | None, resume: bool) -> None:
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            run["created"] = old.get("created", run["created"])
            run["parent"] = old.get("parent", run["parent"])
            run["recipe_path"] = old.get("recipe_path", run["recipe_path"])
            run["resumed_from"] = str(resume_from) if resume_from is not None else None
        self.save(run)

    def update(self, **changes) -> dict:
        run = json.loads(self.path.read_text())
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(run.get(key), dict):
                run[key].update(value)
            else:
                run[key] = value
        self.save(run)
        return run

    def save(self, run: dict) -> None:
        atomic_write_text(self.path, json.dumps(run, indent=2) + "\n")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def warn(message: str) -> None:
    print(message, file=sys.stderr)
