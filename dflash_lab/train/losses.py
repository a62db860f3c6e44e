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

D-PACE equivalence: for greedy EAL, d EAL_b / d log q_k(y_k) = sum_{j>=k} prod_{i<=j} a_i, which is
D-PACE's position weight with alpha = 0 (q~ = q). So -EAL has the gradient of a D-PACE-weighted
cross-entropy, and `dpace` with dpace_alpha 0 and per-anchor normalisation has greedy EAL's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_lab.train.vocab_stage import vocab_statistics

LOSS_NAMES = ("ce", "kd", "eal", "survival-eal", "dpace")


def position_weights(block_size: int, gamma: float | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 0..B-1 (slot 0 is never valid, its weight is irrelevant)."""
    k = torch.arange(block_size, device=device, dtype=torch.float64)
    if gamma is None:
        return torch.ones(block_size, device=device, dtype=dtype)
    return torch.exp(-(k - 1) / gamma).to(dtype)


def needs_target_logits(name: str, eal_mode: str = "greedy", alpha: float = 0.0, kl_weight: float | None = None) -> bool:
    """Whether the loss reads the target's distribution p_k (KL or overlap)."""
    if name == "ce":
        return False
    if name == "dpace":
        return bool(kl_weight)  # only its KD term does (default weight 0)
    return True  # kd, eal, survival-eal have a KL term (kd with alpha = 1 still logs it)


def needs_overlap(cfg: "LossConfig") -> bool:
    """Whether the loss reads overlap_k = sum_v min(p_k, q_k) (sampled-verify acceptance)."""
    if cfg.name == "dpace":
        return cfg.eal_mode == "sampled" and cfg.kl_term > 0  # the KD term's survival weights
    return cfg.name in ("eal", "survival-eal") and cfg.eal_mode == "sampled"


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


@dataclass
class LossConfig:
    name: str = "kd"
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


# -- the global reduction (SPEC 3) -----------------------------------------------------------------
# Every loss is a sum of per-slot (or per-block) terms divided by a sum over the WHOLE optimizer
# step: all sequences, all accumulation micro-steps, all ranks. The denominators travel as one
# float64 vector so that a single all-reduce carries them. The first three depend only on the
# batch (anchors, labels): they are summed before any forward. The last two depend on the
# draft (detached): see `needs_model_denominators`.
# "selector": DFlash2's sum(w * included) for `selector_gold: exclude` (the trainer fills it in).
DENOMINATORS = ("weights", "slots", "blocks", "survival", "dpace", "selector")
_W, _SLOTS, _BLOCKS, _SURV, _DPACE, _SEL = range(6)


def _acceptance(cfg: LossConfig, ce, overlap):
    """a_k: q_k(y_k) = exp(-ce_k) for greedy verify, the overlap for sampled verify."""
    return torch.exp(-ce) if cfg.eal_mode == "greedy" else overlap


def static_denominators(cfg: LossConfig, valid: torch.Tensor) -> torch.Tensor:
    """[len(DENOMINATORS)] float64: sum(w v) with the position decay, sum(v), and the number of blocks with a valid
    slot (the model-dependent entries are 0)."""
    out = torch.zeros(len(DENOMINATORS), dtype=torch.float64, device=valid.device)
    vf = valid.to(torch.float64)
    w = position_weights(valid.shape[1], cfg.gamma, device=valid.device, dtype=torch.float64)
    out[_W] = (vf * w).sum()
    out[_SLOTS] = vf.sum()
    out[_BLOCKS] = valid.any(dim=1).sum().to(torch.float64)
    return out


def needs_model_denominators(cfg: LossConfig) -> bool:
    """survival-eal's KL term (sum(s v)), dpace's survival-weighted KD term and dpace with
    `normalize: weights` (sum(w v)) divide by a detached sum that depends on the draft."""
    if cfg.name == "survival-eal":
        return True
    if cfg.name == "dpace":
        return cfg.normalize == "weights" or cfg.kl_term > 0
    return False


def model_denominators(cfg: LossConfig, ce, overlap, valid) -> torch.Tensor:
    """[len(DENOMINATORS)] float64, detached: sum(s v) and sum(w_dpace v) of these blocks (static entries 0)."""
    out = torch.zeros(len(DENOMINATORS), dtype=torch.float64, device=valid.device)
    if not needs_model_denominators(cfg):
        return out
    with torch.no_grad():
        vf = valid.to(torch.float64)
        out[_SURV] = (survival_weights(_acceptance(cfg, ce, overlap), valid).to(torch.float64) * vf).sum()
        if cfg.name == "dpace":
            out[_DPACE] = (dpace_weights(torch.exp(-ce), valid, cfg.dpace_alpha).to(torch.float64) * vf).sum()
    return out


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # an empty global batch (no valid slot anywhere) has numerator 0 too: the loss is 0
    return num / den.clamp_min(1e-12).to(num.dtype)


def combine(cfg: LossConfig, ce, kl, overlap, valid, denominators: torch.Tensor | None = None) -> torch.Tensor:
    """This batch's share of the loss, from per-slot scalars [blocks, B] (zeros where invalid).

    `denominators` [len(DENOMINATORS)] (see DENOMINATORS) are the sums over the whole optimizer step; the shares of
    every micro-batch on every rank then add up to the step's loss. None: the sums of these blocks
    alone, i.e. the token-level loss of this batch."""
    if cfg.name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose one of {LOSS_NAMES}")
    if denominators is None:
        denominators = static_denominators(cfg, valid) + model_denominators(cfg, ce, overlap, valid)
    den = denominators.to(ce.device)
    vf = valid.to(ce.dtype)
    b = valid.shape[1]
    if cfg.name in ("ce", "kd"):
        w = position_weights(b, cfg.gamma, device=ce.device, dtype=ce.dtype)[None, :]
        per_slot = ce if cfg.name == "ce" else cfg.alpha * ce + (1 - cfg.alpha) * kl
        return _div((w * vf * per_slot).sum(), den[_W])
    a = _acceptance(cfg, ce, overlap)
    if cfg.name == "dpace":
        w = dpace_weights(torch.exp(-ce), valid, cfg.dpace_alpha)
        main = _div((w * vf * ce).sum(), den[_BLOCKS] if cfg.normalize == "anchors" else den[_DPACE])
    else:
        main = -_div(expected_acceptance(a, valid).sum(), den[_BLOCKS])
    if cfg.kl_term == 0:
        return main
    if cfg.name == "eal":
        return main + cfg.kl_term * _div((kl * vf).sum(), den[_SLOTS])
    s = survival_weights(a, valid)
    return main + cfg.kl_term * _div((s * kl * vf).sum(), den[_SURV])


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
