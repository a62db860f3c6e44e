"""survival-eal: eal's main term + kl_weight * sum(s * kl * v) / sum(s * v), with the detached
survival weights s_k = prod_{i<k} a_i v_i (a draft-dependent denominator, summed before backward)."""

from __future__ import annotations

import torch

from dflash_lab.train.objectives.base import DENOMINATORS, divide, empty_denominators, survival_weights
from dflash_lab.train.objectives.eal import ExpectedAcceptance


class SurvivalEAL(ExpectedAcceptance):
    name = "survival-eal"
    denominators = ("blocks", "survival")

    def needs_model_denominators(self) -> bool:
        return True

    def model_denominators(self, stats):
        out = empty_denominators(stats.valid.device)
        with torch.no_grad():
            s = survival_weights(self.acceptance(stats), stats.valid)
            out[DENOMINATORS.index("survival")] = (s.to(torch.float64) * stats.valid.to(torch.float64)).sum()
        return out

    def kl_term(self, stats, den):
        s = survival_weights(self.acceptance(stats), stats.valid)
        return divide((s * stats.kl * stats.valid.to(stats.kl.dtype)).sum(), den["survival"])
