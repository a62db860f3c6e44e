"""kd: position-weighted alpha * CE + (1 - alpha) * KL(p || q), over sum(w * v)."""

from __future__ import annotations

from dflash_lab.train.objectives.ce import CrossEntropy


class Distillation(CrossEntropy):
    name = "kd"

    def needs_target_logits(self) -> bool:
        return True  # with alpha = 1 it still logs the KL

    def per_slot(self, stats):
        return self.cfg.alpha * stats.ce + (1 - self.cfg.alpha) * stats.kl
