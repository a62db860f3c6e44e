"""One checkpointer for every stateful part of a run (torchtitan's `components/checkpoint.py` is
the model): the trainer hands it `{name: component}` once, at construction; each component has
`state_dict()` / `load_state_dict()`. A save collects every state and gives the dict to
`state.write_checkpoint`, the one module that knows the files; a resume reads the dict back
(`state.read_checkpoint`) and gives every component its own state. The checkpointer also decides
when a checkpoint is due, prunes old ones and keeps the best held-out tau so far (its own state,
under the name "checkpoint", with what describes the checkpoint: its metrics, the seed, whether it
ends an epoch)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dflash_lab.train import distributed as D
from dflash_lab.train import state as S

OWN_STATE = "checkpoint"
"""The checkpointer's own entry of the state dict."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RngState:
    """The process's python / numpy / torch (and CUDA) random states: what a resumed run needs to
    draw the same numbers. JSON-able fields and tensors; the format splits them into files."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                state[f"cuda.{i}"] = s
        return state

    def load_state_dict(self, state: dict) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(state["torch"])
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class CheckpointConfig:
    out_dir: Path
    seed: int = 0
    """Recorded in trainer_state.json."""
    save_every: int = 0
    """A checkpoint every this many steps (0: only at epoch ends, a stop and the end)."""
    keep_last: int | None = None
    keep_epoch_ends: bool = True
    dtype: torch.dtype | None = None
    """The served draft's dtype (the target's); training state stays fp32 (master.safetensors)."""


class Checkpointer:
    """Saves and loads the state of every component it was given; decides when a checkpoint is
    due; prunes; keeps the best held-out tau so far."""

    def __init__(self, cfg: CheckpointConfig, info: D.DistInfo, components: dict[str, Stateful]):
        if OWN_STATE in components:
            raise ValueError(f"component name {OWN_STATE!r} is the checkpointer's own")
        self.cfg, self.info, self.components = cfg, info, dict(components)
        self.best_tau: float | None = None

    def due(self, step: int, total_steps: int, epoch_end: bool, stopping: bool) -> bool:
        """A step checkpoint now? Never at the last step: `final` is written then."""
        if step >= total_steps:
            return False
        every = self.cfg.save_every
        return epoch_end or stopping or (bool(every) and step % every == 0)

    def save(self, name: str, metrics: dict, epoch_end: bool) -> Path:
        """Checkpoint `name` of every component's state now; `metrics` go into trainer_state.json.
        Every rank calls it (a component's state_dict may be a collective); rank 0 writes."""
        tau = metrics.get("heldout_tau")
        if tau is not None:
            self.best_tau = tau if self.best_tau is None else max(self.best_tau, tau)
        states = {key: component.state_dict() for key, component in self.components.items()}
        states[OWN_STATE] = {"best_heldout_tau": self.best_tau, "epoch_end": epoch_end, "metrics": metrics,
                             "seed": self.cfg.seed}
        path = self.cfg.out_dir / "checkpoints" / name
        if self.info.is_main:
            S.write_checkpoint(path, states, dtype=self.cfg.dtype)
            if name != "final":
                self._prune()
        D.barrier(self.info)
        return path

    def _prune(self) -> None:
        try:
            best = S.best_checkpoint(self.cfg.out_dir)
        except Exception:  # an unreadable old checkpoint must not stop the run: prune without protection
            best = None
        S.prune_checkpoints(self.cfg.out_dir, self.cfg.keep_last, protect=best,
                            keep_epoch_ends=self.cfg.keep_epoch_ends)

    def load(self, ckpt: Path) -> None:
        """Every component as checkpoint `ckpt` left it, in the order they were given (the RNG
        last, so that nothing loaded after it draws from it)."""
        states = S.read_checkpoint(ckpt, [*self.components, OWN_STATE])
        for key, component in self.components.items():
            try:
                component.load_state_dict(states[key])
            except (KeyError, TypeError, ValueError) as exc:
                raise S.broken_checkpoint(ckpt, f"the {key} state does not load ({type(exc).__name__}: {exc})") from None
        self.best_tau = states[OWN_STATE].get("best_heldout_tau")


class DraftState:
    """A draft and its optimizer as one component ("draft"): the weights, the config the served
    files need, and the optimizer's state; loads the weights as fp32 (the training copy)."""

    def __init__(self, draft: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.draft, self.optimizer = draft, optimizer

    def state_dict(self) -> dict:
        return {"config": self.draft.config.to_json_dict(), "weights": self.draft.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.draft.load_state_dict({k: v.to(torch.float32) for k, v in state["weights"].items()})
        self.optimizer.load_state_dict(state["optimizer"])


def save_checkpoint(path: Path, draft: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
                    dtype: torch.dtype | None = None) -> Path:
    """A checkpoint of a draft and its optimizer outside a run (tools, tests): the files a run's
    checkpoint has, with `trainer_state` as trainer_state.json."""
    states = {"draft": DraftState(draft, optimizer).state_dict(), "rng": RngState().state_dict(),
              OWN_STATE: trainer_state}
    return S.write_checkpoint(path, states, dtype=dtype)
