"""eal: -sum_blocks(EAL_b) / blocks + kl_weight * sum(kl * v) / sum(v) (kl_weight default 1).

EAL_b = sum_{k>=1} prod_{i<=k} a_i v_i, a_k = q_k(y_k) (greedy) or overlap_k (sampled)."""

from __future__ import annotations

from dflash_lab.train.objectives.base import Objective, divide, expected_acceptance


class ExpectedAcceptance(Objective):
    name = "eal"
    denominators = ("blocks", "slots")

    @property
    def kl_weight(self) -> float:
        return float(self.cfg.kl_weight) if self.cfg.kl_weight is not None else 1.0

    def needs_target_logits(self) -> bool:
        return True

    def needs_overlap(self) -> bool:
        return self.cfg.eal_mode == "sampled"

    def main_term(self, stats, den):
        return -divide(expected_acceptance(self.acceptance(stats), stats.valid).sum(), den["blocks"])

    def kl_term(self, stats, den):
        return divide((stats.kl * stats.valid.to(stats.kl.dtype)).sum(), den["slots"])

    def combine(self, stats, den):
        main = self.main_term(stats, den)
        return main if self.kl_weight == 0 else main + self.kl_weight * self.kl_term(stats, den)
