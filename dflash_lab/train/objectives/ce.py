"""ce: position-weighted cross-entropy, sum(w * ce * v) / sum(w * v), w_k = exp(-(k-1)/gamma)."""

from __future__ import annotations

from dflash_lab.train.objectives.base import Objective, divide, position_weights


class CrossEntropy(Objective):
    name = "ce"
    denominators = ("weights",)

    def per_slot(self, stats):
        return stats.ce

    def combine(self, stats, den):
        w = position_weights(stats.valid.shape[1], self.cfg.gamma, device=stats.ce.device, dtype=stats.ce.dtype)
        return divide((w[None, :] * stats.valid.to(stats.ce.dtype) * self.per_slot(stats)).sum(), den["weights"])
