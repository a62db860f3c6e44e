"""The training objectives: one `Objective` subclass per `loss.name`, one file each.

    objective = objective_for(loss_cfg)      # the class registered under loss_cfg.name
    objective.needs_target_logits(), objective.combine(stats, denominators), ...

A new loss is a new module in this package with one `Objective` subclass that sets `name`: the
modules here are imported when the package is, every subclass that sets its own `name` is
registered, and the recipe's `loss.name` choices (`LOSS_NAMES`) and the trainer read this registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from dflash_lab.train.objectives.base import (DENOMINATORS, Denominators, Objective, SlotStats,  # noqa: F401
                                              empty_denominators)
from dflash_lab.train.objectives.selector import SelectorTerm  # noqa: F401

_NOT_OBJECTIVES = {"base", "selector"}


def _registry() -> dict[str, type[Objective]]:
    found: dict[str, type[Objective]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_OBJECTIVES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Objective) and "name" in vars(value):
                if value.name in found and found[value.name] is not value:
                    raise RuntimeError(f"two objectives named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return found


OBJECTIVES = _registry()
# the order users read in errors and docs: the journey's order, then any new loss by name
_ORDER = ("ce", "kd", "eal", "survival-eal", "dpace")
LOSS_NAMES = tuple(n for n in _ORDER if n in OBJECTIVES) + tuple(sorted(set(OBJECTIVES) - set(_ORDER)))


def objective_for(cfg) -> Objective:
    """The objective of `cfg.name`, configured by `cfg` (a `losses.LossConfig`)."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose one of {LOSS_NAMES}")
    return OBJECTIVES[cfg.name](cfg)


__all__ = ["OBJECTIVES", "LOSS_NAMES", "objective_for", "Objective", "SlotStats", "Denominators", "DENOMINATORS",
           "SelectorTerm", "empty_denominators"]
