"""The epoch order of the training set: random, or length-grouped (issue 13).

A micro-batch pads every sequence to its longest (target tokens) and to its largest anchor count
(draft block tokens), so random order wastes much of a step on padding when lengths are skewed.
Grouped order, for epoch e:

    1. a random permutation of the training set, seeded by (seed, e)  (= the plain random order)
    2. the first steps_per_epoch * global_batch of it (the rest is the dropped remainder, as in
       random order) are cut into windows of `window` global batches; each window is sorted by
       (anchor count, length), longest first
    3. the sorted windows are cut into global batches, and the global batches are shuffled
       (seeded by (seed, e)) so that the run does not see long batches, then short ones

The order is a pure function of (seed, epoch, lengths), so a resumed run sees the same batches,
and a global batch is the same set of sequences whatever the world size or micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-style), stable across processes and Python versions."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _permutation(num: int, seed: int) -> np.ndarray:
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed)).numpy()


@dataclass
class SamplerConfig:
    seed: int = 0
    global_batch: int = 1
    group_by_length: bool = True
    window: int = 8
    """Global batches per sorting window."""


def epoch_order(cfg: SamplerConfig, epoch: int, lengths: np.ndarray | None = None,
                anchor_counts: np.ndarray | None = None) -> np.ndarray:
    """Positions 0..N-1 of the training set in the order epoch `epoch` reads them: int64 [N].

    `lengths` / `anchor_counts` [N]: tokens and anchors per sequence (anchors = min(candidates,
    num_anchors)); needed for grouping, ignored without it."""
    num = len(lengths) if lengths is not None else len(anchor_counts)
    perm = _permutation(num, mix_seed(cfg.seed, 17, epoch))
    if not cfg.group_by_length:
        return perm
    full = (num // cfg.global_batch) * cfg.global_batch
    used, rest = perm[:full], perm[full:]
    lengths = np.zeros(num, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    anchors = np.zeros(num, np.int64) if anchor_counts is None else np.asarray(anchor_counts, np.int64)
    window = cfg.window * cfg.global_batch
    grouped = []
    for start in range(0, full, window):
        idx = used[start:start + window]
        # lexsort: the last key is the primary one; negate for longest first (stable, deterministic)
        grouped.append(idx[np.lexsort((-lengths[idx], -anchors[idx]))])
    if not grouped:
        return perm
    batches = np.concatenate(grouped).reshape(-1, cfg.global_batch)
    batches = batches[_permutation(len(batches), mix_seed(cfg.seed, 18, epoch))]
    return np.concatenate([batches.reshape(-1), rest]).astype(np.int64)


def padding_fraction(order: np.ndarray, micro_batch: int, sizes: np.ndarray, steps: int | None = None) -> float:
    """Share of padded positions when consecutive `micro_batch` entries of `order` are padded to
    their largest `sizes` (lengths for the target, anchor counts for the draft)."""
    sizes = np.asarray(sizes)
    usable = (len(order) // micro_batch) * micro_batch if steps is None else steps * micro_batch
    groups = sizes[np.asarray(order[:usable])].reshape(-1, micro_batch)
    padded = groups.max(axis=1, keepdims=True) * micro_batch
    total = padded.sum()
    return float(1.0 - groups.sum() / total) if total else 0.0


__all__ = ["SamplerConfig", "epoch_order", "padding_fraction", "mix_seed"]
