"""What every training objective shares: the per-slot statistics it reads, the step's global
denominators, the position-weight math, and the base class a new loss derives from.

A loss is one `Objective` subclass in one file of this package with a `name` (its recipe name,
`loss.name`); `objectives/__init__.py` finds it. The class says what it needs (the target's
distribution, the sampled-verify overlap, draft-dependent denominators), which global denominators
it divides by, and how it combines the per-slot statistics into this micro-batch's share of the
optimizer step's loss (SPEC sections 3 and 4; the formulas are in `train/losses.py`'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

# Every loss is a sum of per-slot (or per-block) terms divided by a sum over the WHOLE optimizer
# step: all sequences, all accumulation micro-steps, all ranks. The denominators travel as one
# float64 vector so that a single all-reduce carries them. "weights", "slots" and "blocks" depend
# only on the batch (anchors, labels): they are summed before any forward. "survival" and "dpace"
# depend on the draft (detached), "selector" is DFlash2's sum(w * included) for
# `selector_gold: exclude`: objectives with `needs_model_denominators` fill them in.
DENOMINATORS = ("weights", "slots", "blocks", "survival", "dpace", "selector")


class Denominators:
    """The step's denominator vector [len(DENOMINATORS)] float64, read by name."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vector[DENOMINATORS.index(name)]


def empty_denominators(device) -> torch.Tensor:
    return torch.zeros(len(DENOMINATORS), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class SlotStats:
    """Per-slot statistics [blocks, B] (zeros where invalid) and the valid mask [blocks, B]."""

    ce: torch.Tensor
    kl: torch.Tensor
    overlap: torch.Tensor
    valid: torch.Tensor


# -- position-weight math -----------------------------------------------------------------------------
def position_weights(block_size: int, gamma: float | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 0..B-1 (slot 0 is never valid, its weight is irrelevant)."""
    k = torch.arange(block_size, device=device, dtype=torch.float64)
    if gamma is None:
        return torch.ones(block_size, device=device, dtype=dtype)
    return torch.exp(-(k - 1) / gamma).to(dtype)


def acceptance_chain(a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """prod_{i<=k} (a_i * v_i) for each slot, [blocks, B]; slot 0 contributes a factor 1."""
    factors = torch.where(valid, a, torch.zeros_like(a))
    factors = torch.cat([torch.ones_like(factors[:, :1]), factors[:, 1:]], dim=1)
    chain = torch.cumprod(factors, dim=1)
    return torch.cat([torch.zeros_like(chain[:, :1]), chain[:, 1:]], dim=1)


def expected_acceptance(a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """EAL_b = sum_{k>=1} prod_{i=1..k} a_i v_i: [blocks]."""
    return acceptance_chain(a, valid).sum(dim=1)


def survival_weights(a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """s_k = prod_{i<k} (a_i v_i), detached: [blocks, B] (s_1 = 1; slot 0 -> 1, never used)."""
    chain = acceptance_chain(a.detach(), valid)
    shifted = torch.cat([torch.ones_like(chain[:, :1]), chain[:, :-1]], dim=1)
    shifted[:, 1] = 1.0
    return shifted


def dpace_weights(q_label: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """D-PACE's position weights w_k = sum_{j>=k} prod_{i<=j} q~_i, q~_i = alpha + (1-alpha) q_i(y_i),
    detached, [blocks, B]. As in EAL, an invalid slot cuts the product (no acceptance past it)."""
    q_tilde = alpha + (1.0 - alpha) * q_label.detach()
    chain = acceptance_chain(q_tilde, valid)  # prod_{i<=j} q~_i v_i, 0 at slot 0
    return chain.flip(1).cumsum(1).flip(1)  # reverse cumulative sum over j >= k


def divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den; an empty global batch (no valid slot anywhere) has numerator 0 too: the loss is 0."""
    return num / den.clamp_min(1e-12).to(num.dtype)


# -- the base class -------------------------------------------------------------------------------------
class Objective:
    """One training objective, configured by a `losses.LossConfig` (the recipe's `loss` section).

    Subclasses set `name` (the recipe's `loss.name`) and `denominators` (the entries of DENOMINATORS
    they divide by) and implement `combine`; they override the `needs_*` answers and
    `model_denominators` where they differ from plain cross-entropy's."""

    name: ClassVar[str]
    denominators: ClassVar[tuple[str, ...]] = ("weights",)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def kl_weight(self) -> float:
        """The weight of the loss's KL term (kd and ce have none of their own: 0)."""
        return float(self.cfg.kl_weight) if self.cfg.kl_weight is not None else 0.0

    def needs_target_logits(self) -> bool:
        """Whether it reads the target's distribution p_k (KL or overlap)."""
        return False

    def needs_overlap(self) -> bool:
        """Whether it reads overlap_k = sum_v min(p_k, q_k) (sampled-verify acceptance)."""
        return False

    def needs_model_denominators(self) -> bool:
        """Whether it divides by a detached, draft-dependent sum (computed before backward)."""
        return False

    def static_denominators(self, valid: torch.Tensor) -> torch.Tensor:
        """The batch-only sums of these blocks: sum(w v) with the position decay, sum(v), and the number
        of blocks with a valid slot (the draft-dependent entries 0)."""
        out = empty_denominators(valid.device)
        vf = valid.to(torch.float64)
        w = position_weights(valid.shape[1], self.cfg.gamma, device=valid.device, dtype=torch.float64)
        out[DENOMINATORS.index("weights")] = (vf * w).sum()
        out[DENOMINATORS.index("slots")] = vf.sum()
        out[DENOMINATORS.index("blocks")] = valid.any(dim=1).sum().to(torch.float64)
        return out

    def model_denominators(self, stats: SlotStats) -> torch.Tensor:
        """The draft-dependent sums of these blocks, detached (zeros unless `needs_model_denominators`)."""
        return empty_denominators(stats.valid.device)

    def combine(self, stats: SlotStats, den: Denominators) -> torch.Tensor:
        """This batch's share of the step's loss."""
        raise NotImplementedError

    def acceptance(self, stats: SlotStats) -> torch.Tensor:
        """a_k: q_k(y_k) = exp(-ce_k) for greedy verify, the overlap for sampled verify."""
        return torch.exp(-stats.ce) if self.cfg.eal_mode == "greedy" else stats.overlap


__all__ = ["DENOMINATORS", "Denominators", "SlotStats", "Objective", "empty_denominators", "position_weights",
           "acceptance_chain", "expected_acceptance", "survival_weights", "dpace_weights", "divide"]
