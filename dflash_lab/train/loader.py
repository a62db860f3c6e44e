"""Samples for the trainer: a sample source, the held-out split, and the per-rank data loader.

A *sample source* is any object with
    __len__()                    number of samples
    sample(i) -> Sample          one tokenised sample (input_ids, loss_mask, id, category)
    lengths                      np int array [N]: tokens per sample
    num_anchor_candidates        np int array [N]: anchor candidates per sample
`InMemorySource` wraps a list of `Sample` (what `tokenize_records` returns); the token store
(`dflash_lab.train.store.TokenStore`) has the same interface over memory-mapped files. The loader
only calls `sample(i)` for the samples of its own rank's micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dflash_lab.train import blocks as B
from dflash_lab.train.data import Sample
from dflash_lab.train.sampler import SamplerConfig, epoch_order, mix_seed


class InMemorySource:
    """A sample source over a list of samples held in memory."""

    def __init__(self, samples: list[Sample]):
        self._samples = list(samples)
        self.lengths = np.array([len(s.input_ids) for s in self._samples], dtype=np.int64)
        self.num_anchor_candidates = np.array(
            [int(B.anchor_candidates(torch.tensor(s.loss_mask)).numel()) for s in self._samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._samples)

    def sample(self, i: int) -> Sample:
        return self._samples[int(i)]


class SubsetSource:
    """The samples `indices` of another source (the training or the held-out split)."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(source.lengths)[self.indices]
        self.num_anchor_candidates = np.asarray(source.num_anchor_candidates)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, i: int) -> Sample:
        return self.source.sample(int(self.indices[int(i)]))


def split_indices(num: int, heldout: float, heldout_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions, ascending: the same split as `data.split_heldout` (a seeded
    permutation; `heldout` < 1 is a fraction, >= 1 a count)."""
    count = int(round(num * heldout)) if heldout < 1 else int(heldout)
    count = min(count, heldout_max, num - 1) if num > 1 else 0
    if heldout > 0 and count == 0 and num >= 4:
        count = 1
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed + 7919)).numpy()
    held = np.zeros(num, dtype=bool)
    held[order[:count]] = True
    return np.nonzero(~held)[0], np.nonzero(held)[0]


@dataclass
class LoaderConfig:
    seed: int = 0
    global_batch: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    world_size: int = 1
    rank: int = 0
    num_anchors: int = 512
    group_by_length: bool = True
    group_window: int = 8


@dataclass
class MicroBatch:
    samples: list[Sample]
    anchor_seeds: list[int]


class TrainLoader:
    """This rank's micro-batches of each optimizer step, and the data position (its state).

    Global batch g of an epoch is `order[g * global_batch:(g + 1) * global_batch]`; micro-step i
    of rank r takes its slots `(i * world + r) * micro ...`. Sequence k of the global batch of
    step s draws its anchors with the seed (seed, s, k), so the anchors, like the order, do not
    depend on the layout."""

    def __init__(self, source, cfg: LoaderConfig):
        self.source, self.cfg = source, cfg
        self.steps_per_epoch = len(source) // cfg.global_batch
        self.epoch, self.step_in_epoch = 0, 0
        self._order_epoch, self._order = None, None
        self._sampler = SamplerConfig(seed=cfg.seed, global_batch=cfg.global_batch,
                                      group_by_length=cfg.group_by_length, window=cfg.group_window)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # -- batches ----------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            anchors = np.minimum(np.asarray(self.source.num_anchor_candidates), self.cfg.num_anchors)
            self._order = epoch_order(self._sampler, epoch, np.asarray(self.source.lengths), anchors)
            self._order_epoch = epoch
        return self._order

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches for global optimizer step `step` at the current position."""
        c = self.cfg
        start = self.step_in_epoch * c.global_batch
        batch = self.order(self.epoch)[start:start + c.global_batch]
        out = []
        for acc in range(c.grad_accum):
            first = (acc * c.world_size + c.rank) * c.micro_batch
            slots = range(first, first + c.micro_batch)
            out.append(MicroBatch([self.source.sample(batch[k]) for k in slots], [mix_seed(c.seed, step, k) for k in slots]))
        return out

    def advance(self) -> None:
        self.step_in_epoch += 1

    @property
    def epoch_done(self) -> bool:
        return self.step_in_epoch >= self.steps_per_epoch

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def finish_position(self) -> bool:
        """At the end of the run, before the final checkpoint: an epoch that ended with the run
        (the position already at the next one's start) goes back to its end, so the checkpoint
        says which epoch it finished. True when the run ends on an epoch boundary."""
        on_boundary = self.step_in_epoch == 0 or self.epoch_done
        if self.step_in_epoch == 0 and self.epoch > 0:
            self.epoch, self.step_in_epoch = self.epoch - 1, self.steps_per_epoch
        return on_boundary


__all__ = ["InMemorySource", "SubsetSource", "split_indices", "LoaderConfig", "MicroBatch", "TrainLoader"]
