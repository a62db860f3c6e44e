"""DFlash2's selector term, added to the base objective for a DFlash2 draft (docs/dflash2.md):
selector_alpha * sum(w * selector CE) / sum(w * v) (`selector_gold: replace`) or / sum(w * included)
(`exclude`: a draft-dependent denominator, summed before backward). Not a `loss.name`: it rides on
whichever base objective the recipe names; `selector_loss.py` computes its numerator."""

from __future__ import annotations

import torch

from dflash_lab.train.objectives.base import DENOMINATORS, Denominators, empty_denominators


class SelectorTerm:
    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def trains(self) -> bool:
        """selector_alpha 0: metrics only (the selector is frozen)."""
        return self.cfg.selector_alpha > 0

    @property
    def denominator(self) -> str:
        return "weights" if self.cfg.selector_gold == "replace" else "selector"

    def needs_model_denominators(self) -> bool:
        return self.trains and self.denominator == "selector"

    def model_denominators(self, sel) -> torch.Tensor:
        """sum(w * included) of this batch's slots (`selector_loss.SelectorOutput.included_weight`)."""
        out = empty_denominators(sel.included_weight.device)
        out[DENOMINATORS.index("selector")] = sel.included_weight.double()
        return out

    def combine(self, sel, den: Denominators) -> torch.Tensor:
        return self.cfg.selector_alpha * sel.loss / den[self.denominator].clamp_min(1e-12).to(sel.loss.dtype)
