"""The losses of the training journey (SPEC section 4): ce, kd, eal, survival-eal.

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
2. `combine` turns the per-slot scalars [blocks, B] (slot 0 and invalid slots masked) into the
   loss of ONE sequence; the trainer averages sequences.

Per sequence, with valid v_k, position weights w_k:
    ce            sum(w * ce * v) / sum(w * v),        w_k = exp(-(k-1)/gamma)
    kd            sum(w * (alpha*ce + (1-alpha)*kl) * v) / sum(w * v)
    eal           -mean_blocks(EAL_b) + kl_weight * sum(kl * v) / sum(v)
    survival-eal  -mean_blocks(EAL_b) + kl_weight * sum(s * kl * v) / sum(s * v)
with EAL_b = sum_{k>=1} prod_{i=1..k} (a_i * v_i): an invalid slot CUTS the product, i.e. the chain
of acceptances stops at the first slot without a label (labels only end at the end of a sequence
or response, so invalid slots are always a suffix of the block). a_k = q_k(y_k) (greedy) or
overlap_k (sampled). EAL_b is E[tau] - 1 of that block; blocks are averaged with equal weight.
Survival weights s_k = prod_{i<k} (a_i * v_i), detached (s_1 = 1).

D-PACE equivalence: for greedy EAL, d EAL_b / d log q_k(y_k) = sum_{j>=k} prod_{i<=j} a_i, which is
D-PACE's position weight w_k = sum_{j>=k} prod_{i<=j} q~_i with alpha = 0 (q~ = q). So -EAL has
the gradient of a D-PACE-weighted cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_lab.train.vocab_stage import vocab_statistics

LOSS_NAMES = ("ce", "kd", "eal", "survival-eal")


def position_weights(block_size: int, gamma: float | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 0..B-1 (slot 0 is never valid, its weight is irrelevant)."""
    k = torch.arange(block_size, device=device, dtype=torch.float64)
    if gamma is None:
        return torch.ones(block_size, device=device, dtype=dtype)
    return torch.exp(-(k - 1) / gamma).to(dtype)


def needs_target_logits(name: str, eal_mode: str = "greedy", alpha: float = 0.0) -> bool:
    if name == "ce":
        return False
    return True  # kd, eal, survival-eal have a KL term (kd with alpha = 1 still logs it)


def needs_overlap(cfg: "LossConfig") -> bool:
    """Only eal / survival-eal with sampled verify read overlap_k (a_k = sum_v min(p_k, q_k))."""
    return cfg.name in ("eal", "survival-eal") and cfg.eal_mode == "sampled"


def slot_statistics(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                    target_hidden: torch.Tensor | None = None, chunk_slots: int = 1024,
                    target_index: torch.Tensor | None = None, need_overlap: bool = True):
    """Per-slot (ce, kl, overlap, correct), each [M], for hidden [M, H] and labels [M].

    `target_hidden` [M, H]: the target's final hidden state at position p+k-1 (so lm_head of it is
    the target's logits for the token at p+k); None skips KL/overlap (zeros). With `target_index`
    [M], `target_hidden` is any [R, H] table and slot i reads row `target_index[i]`; the target's
    logits are then computed once per distinct row, not once per slot. `need_overlap=False`
    returns zeros for overlap (see `needs_overlap`). The lm_head must be frozen.

    One custom autograd function per chunk of `chunk_slots` slots (`vocab_stage.py`): nothing
    vocabulary-sized is kept for backward and nothing is recomputed, whatever the chunk count."""
    return vocab_statistics(hidden, labels, lm_head.weight, getattr(lm_head, "bias", None), target_hidden,
                            target_index, chunk_slots=chunk_slots, need_overlap=need_overlap)


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


def _weighted_mean(values, weights, valid):
    w = weights * valid
    return (w * values).sum() / w.sum().clamp_min(1e-12)


@dataclass
class LossConfig:
    name: str = "kd"
    alpha: float = 0.0
    gamma: float | None = 7.0
    eal_mode: str = "greedy"
    kl_weight: float = 1.0


def combine(cfg: LossConfig, ce, kl, overlap, valid) -> torch.Tensor:
    """The loss of one sequence from per-slot scalars [blocks, B] (zeros where invalid)."""
    valid_f = valid.to(ce.dtype)
    b = valid.shape[1]
    if cfg.name in ("ce", "kd"):
        w = position_weights(b, cfg.gamma, device=ce.device, dtype=ce.dtype)[None, :].expand_as(ce)
        per_slot = ce if cfg.name == "ce" else cfg.alpha * ce + (1 - cfg.alpha) * kl
        return _weighted_mean(per_slot, w, valid_f)
    if cfg.name in ("eal", "survival-eal"):
        a = torch.exp(-ce) if cfg.eal_mode == "greedy" else overlap
        eal = expected_acceptance(a, valid)
        has_valid = valid.any(dim=1)
        eal_mean = eal[has_valid].mean() if has_valid.any() else eal.sum() * 0
        if cfg.name == "eal":
            w = torch.ones_like(ce)
        else:
            w = survival_weights(a, valid)
        return -eal_mean + cfg.kl_weight * _weighted_mean(kl, w, valid_f)
    raise ValueError(f"unknown loss {cfg.name!r}; choose one of {LOSS_NAMES}")


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
    "survival_weights", "combine", "simulated_tau", "scatter_slots", "needs_target_logits", "needs_overlap",
]
