"""The losses of the training journey (SPEC section 4): ce, kd, eal, survival-eal, dpace.

Two stages, so that nothing vocabulary-sized is ever materialised for all slots at once:

1. `slot_statistics` maps the draft's hidden states of the valid slots (and, for KD/KL, the
   target's final hidden states at the positions that predict the same tokens) to per-slot scalars:
       ce_k      = -log q_k(y_k)
       kl_k      = KL(p_k || q_k) over the full vocabulary
       overlap_k = sum_v min(p_k(v), q_k(v))       (sampled-verify acceptance)
       correct_k = [argmax q_k == y_k]               (no gradient)
   It runs over chunks of slots, one custom autograd function per chunk (`vocab_stage.py`): the
   forward keeps only [slots, H] partial gradients, so peak memory is one chunk of [slots, V]
   logits and the backward recomputes nothing.
2. `combine` turns the per-slot scalars [blocks, B] (slot 0 and invalid slots masked) into this
   batch's share of the loss of the optimizer step.

Token-level over the whole optimizer step (SPEC 3): every sum in a denominator below runs over
every slot of the step (all sequences, accumulation micro-steps and ranks); the trainer all-reduces
them (`static_denominators`, `model_denominators`) and passes them to `combine`, so the shares add
up to the step's loss whatever the layout. With valid v_k, position weights w_k:
    ce            sum(w * ce * v) / sum(w * v),        w_k = exp(-(k-1)/gamma)
    kd            sum(w * (alpha*ce + (1-alpha)*kl) * v) / sum(w * v)
    eal           -sum_blocks(EAL_b) / blocks + kl_weight * sum(kl * v) / sum(v)
    survival-eal  -sum_blocks(EAL_b) / blocks + kl_weight * sum(s * kl * v) / sum(s * v)
    dpace         sum(d * ce * v) / blocks  (normalize: anchors; or / sum(d * v): weights)
                  + kl_weight * sum(s * kl * v) / sum(s * v)
with EAL_b = sum_{k>=1} prod_{i=1..k} (a_i * v_i): an invalid slot CUTS the product, i.e. the chain
of acceptances stops at the first slot without a label (labels only end at the end of a sequence
or response, so invalid slots are always a suffix of the block). a_k = q_k(y_k) (greedy) or
overlap_k (sampled). EAL_b is E[tau] - 1 of that block; `blocks` counts the blocks with a valid
slot. Survival weights s_k = prod_{i<k} (a_i * v_i), detached (s_1 = 1). D-PACE weights
d_k = sum_{j>=k} prod_{i<=j} q~_i v_i, q~_i = dpace_alpha + (1 - dpace_alpha) q_i(y_i), detached.

Each loss is one class in `train/objectives/` (what it needs, its denominators, how it combines);
this module keeps the per-slot statistics and the functions the step, `plan` and the tests call.

D-PACE equivalence: for greedy EAL, d EAL_b / d log q_k(y_k) = sum_{j>=k} prod_{i<=j} a_i, which is
D-PACE's position weight with alpha = 0 (q~ = q). So -EAL has the gradient of a D-PACE-weighted
cross-entropy, and `dpace` with dpace_alpha 0 and per-anchor normalisation has greedy EAL's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_lab.train.objectives import DENOMINATORS, LOSS_NAMES, Denominators, SlotStats, objective_for
from dflash_lab.train.objectives.base import (acceptance_chain, dpace_weights, expected_acceptance,  # noqa: F401
                                              position_weights, survival_weights)
from dflash_lab.train.vocab_stage import vocab_statistics


@dataclass
class LossConfig:
    name: str = "kd"
    """One of LOSS_NAMES (`train/objectives/`)."""
    alpha: float = 0.0
    """kd: alpha * CE + (1 - alpha) * KL."""
    gamma: float | None = 7.0
    eal_mode: str = "greedy"
    kl_weight: float | None = None
    """Weight of the KL term of eal / survival-eal / dpace; None = the loss's default (1 for the
    EAL losses, 0 for dpace)."""
    dpace_alpha: float = 0.5
    """dpace: q~ = dpace_alpha + (1 - dpace_alpha) q(y)."""
    normalize: str = "anchors"
    """dpace: divide by the number of valid anchors (`anchors`) or by sum(w v) (`weights`)."""
    selector_alpha: float = 1.0
    """DFlash2 drafts: weight of the selector CE added by the trainer (`selector_loss.py`)."""
    selector_gold: str = "replace"
    """DFlash2: `replace` or `exclude` for a gold token outside the unary top-k."""

    @property
    def kl_term(self) -> float:
        if self.kl_weight is not None:
            return float(self.kl_weight)
        return 0.0 if self.name == "dpace" else 1.0

    @property
    def objective(self):
        """The `objectives.Objective` of this configuration."""
        return objective_for(self)


def needs_target_logits(name: str, eal_mode: str = "greedy", alpha: float = 0.0, kl_weight: float | None = None) -> bool:
    """Whether the loss reads the target's distribution p_k (KL or overlap)."""
    return objective_for(LossConfig(name=name, eal_mode=eal_mode, alpha=alpha, kl_weight=kl_weight)).needs_target_logits()


def needs_overlap(cfg: LossConfig) -> bool:
    """Whether the loss reads overlap_k = sum_v min(p_k, q_k) (sampled-verify acceptance)."""
    return cfg.objective.needs_overlap()


def needs_model_denominators(cfg: LossConfig) -> bool:
    """Whether the loss divides by a detached sum that depends on the draft (survival-eal, dpace's
    survival-weighted KD term and dpace with `normalize: weights`)."""
    return cfg.objective.needs_model_denominators()


def slot_statistics(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                    target_hidden: torch.Tensor | None = None, chunk_slots: int = 1024,
                    target_index: torch.Tensor | None = None, need_overlap: bool = True, top_k: int = 0):
    """Per-slot (ce, kl, overlap, correct), each [M], for hidden [M, H] and labels [M]; with `top_k`
    a fifth item, `vocab_stage.TopCandidates` (each slot's top-k ids and masses, from the same logits).

    `target_hidden` [M, H]: the target's final hidden state at position p+k-1 (so lm_head of it is
    the target's logits for the token at p+k); None skips KL/overlap (zeros). With `target_index`
    [M], `target_hidden` is any [R, H] table and slot i reads row `target_index[i]`; the target's
    logits are then computed once per distinct row, not once per slot. `need_overlap=False`
    returns zeros for overlap (see `needs_overlap`). The lm_head must be frozen.

    One custom autograd function per chunk of `chunk_slots` slots (`vocab_stage.py`): nothing
    vocabulary-sized is kept for backward and nothing is recomputed, whatever the chunk count."""
    return vocab_statistics(hidden, labels, lm_head.weight, getattr(lm_head, "bias", None), target_hidden,
                            target_index, chunk_slots=chunk_slots, need_overlap=need_overlap, top_k=top_k)


# -- the global reduction (SPEC 3): see objectives/base.py's DENOMINATORS -----------------------------
def static_denominators(cfg: LossConfig, valid: torch.Tensor) -> torch.Tensor:
    """[len(DENOMINATORS)] float64: sum(w v) with the position decay, sum(v), and the number of blocks
    with a valid slot (the model-dependent entries are 0)."""
    return cfg.objective.static_denominators(valid)


def model_denominators(cfg: LossConfig, ce, overlap, valid) -> torch.Tensor:
    """[len(DENOMINATORS)] float64, detached: the draft-dependent sums of these blocks (survival, dpace;
    static entries 0; all 0 for a loss without them)."""
    objective = cfg.objective
    stats = SlotStats(ce=ce, kl=torch.zeros_like(ce), overlap=overlap, valid=valid)
    if not objective.needs_model_denominators():
        return torch.zeros(len(DENOMINATORS), dtype=torch.float64, device=valid.device)
    return objective.model_denominators(stats)


def combine(cfg: LossConfig, ce, kl, overlap, valid, denominators: torch.Tensor | None = None) -> torch.Tensor:
    """This batch's share of the loss, from per-slot scalars [blocks, B] (zeros where invalid).

    `denominators` [len(DENOMINATORS)] (see DENOMINATORS) are the sums over the whole optimizer step; the shares of
    every micro-batch on every rank then add up to the step's loss. None: the sums of these blocks
    alone, i.e. the token-level loss of this batch."""
    objective = objective_for(cfg)
    stats = SlotStats(ce=ce, kl=kl, overlap=overlap, valid=valid)
    if denominators is None:
        denominators = objective.static_denominators(valid) + model_denominators(cfg, ce, overlap, valid)
    return objective.combine(stats, Denominators(denominators.to(ce.device)))


def simulated_tau(correct: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 + sum_k prod_{i<=k} correct_i per block, [blocks] (greedy top-1 matches)."""
    return 1.0 + expected_acceptance(correct.float(), valid)


def scatter_slots(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-valid-slot values [M] back to [blocks, B] with zeros elsewhere."""
    out = values.new_zeros(valid.shape)
    out[valid] = values
    return out


__all__ = [
    "LOSS_NAMES", "LossConfig", "position_weights", "slot_statistics", "acceptance_chain", "expected_acceptance",
    "survival_weights", "dpace_weights", "combine", "simulated_tau", "scatter_slots", "needs_target_logits",
    "needs_overlap", "DENOMINATORS", "static_denominators", "model_denominators", "needs_model_denominators",
]
