"""dpace: sum(d * ce * v) / blocks (normalize: anchors) or / sum(d * v) (normalize: weights), plus
kl_weight (default 0) * the survival-weighted KD term of survival-eal. D-PACE weights
d_k = sum_{j>=k} prod_{i<=j} q~_i v_i, q~_i = dpace_alpha + (1 - dpace_alpha) q_i(y_i), detached."""

from __future__ import annotations

import torch

from dflash_lab.train.objectives.base import DENOMINATORS, divide, dpace_weights
from dflash_lab.train.objectives.survival_eal import SurvivalEAL


class DPace(SurvivalEAL):
    name = "dpace"
    denominators = ("blocks", "dpace", "survival")

    @property
    def kl_weight(self) -> float:
        return float(self.cfg.kl_weight) if self.cfg.kl_weight is not None else 0.0

    def needs_target_logits(self) -> bool:
        return self.kl_weight > 0  # only its KD term reads p

    def needs_overlap(self) -> bool:
        return self.cfg.eal_mode == "sampled" and self.kl_weight > 0  # the KD term's survival weights

    def needs_model_denominators(self) -> bool:
        return self.cfg.normalize == "weights" or self.kl_weight > 0

    def model_denominators(self, stats):
        out = super().model_denominators(stats)
        with torch.no_grad():
            d = dpace_weights(torch.exp(-stats.ce), stats.valid, self.cfg.dpace_alpha)
            out[DENOMINATORS.index("dpace")] = (d.to(torch.float64) * stats.valid.to(torch.float64)).sum()
        return out

    def main_term(self, stats, den):
        d = dpace_weights(torch.exp(-stats.ce), stats.valid, self.cfg.dpace_alpha)
        total = (d * stats.valid.to(stats.ce.dtype) * stats.ce).sum()
        return divide(total, den["blocks"] if self.cfg.normalize == "anchors" else den["dpace"])
