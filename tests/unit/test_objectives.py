"""A training objective is one class in one file of `train/objectives/` (issue 23 item 9): the
registry finds it, the recipe's `loss.name` choices and the trainer read the registry, and the step
combines whatever the class says it needs."""

import sys
import textwrap
import typing

import pytest
import torch

from dflash_lab.train import losses as L
from dflash_lab.train import objectives as O
from dflash_lab.train.recipe import LossSection


def test_every_recipe_loss_is_one_registered_class_in_its_own_file():
    assert O.LOSS_NAMES == ("ce", "kd", "eal", "survival-eal", "dpace")
    assert typing.get_args(LossSection.model_fields["name"].annotation) == O.LOSS_NAMES
    for name, cls in O.OBJECTIVES.items():
        assert cls.__module__ == f"dflash_lab.train.objectives.{name.replace('-', '_')}"
        assert set(cls.denominators) <= set(O.DENOMINATORS)


def test_what_each_objective_needs():
    needs = {name: (o.needs_target_logits(), o.needs_overlap(), o.needs_model_denominators())
             for name, o in ((n, O.objective_for(L.LossConfig(name=n))) for n in O.LOSS_NAMES)}
    assert needs == {"ce": (False, False, False), "kd": (True, False, False), "eal": (True, False, False),
                     "survival-eal": (True, False, True), "dpace": (False, False, False)}
    sampled_dpace = O.objective_for(L.LossConfig(name="dpace", eal_mode="sampled", kl_weight=0.5))
    assert (sampled_dpace.needs_target_logits(), sampled_dpace.needs_overlap(),
            sampled_dpace.needs_model_denominators()) == (True, True, True)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        O.objective_for(L.LossConfig(name="nope"))


NEW_LOSS = '''
    """focal: a new loss, for the test: sum(w * (1 - q(y))^2 * ce * v) / sum(w * v)."""
    import torch

    from dflash_lab.train.objectives.base import Objective, divide, position_weights


    class Focal(Objective):
        name = "focal"
        denominators = ("weights",)

        def combine(self, stats, den):
            w = position_weights(stats.valid.shape[1], self.cfg.gamma, device=stats.ce.device, dtype=stats.ce.dtype)
            focus = (1 - torch.exp(-stats.ce)) ** 2
            return divide((w * focus * stats.ce * stats.valid.to(stats.ce.dtype)).sum(), den["weights"])
'''


def test_a_new_loss_is_one_class_in_one_new_file(tmp_path, monkeypatch):
    """The file goes in a folder added to the package's path (not into the source tree)."""
    (tmp_path / "focal.py").write_text(textwrap.dedent(NEW_LOSS))
    monkeypatch.setattr(O, "__path__", [*O.__path__, str(tmp_path)])
    try:
        registry = O._registry()
    finally:
        sys.modules.pop("dflash_lab.train.objectives.focal", None)  # the class lives on in `registry`
    assert set(registry) == {*O.LOSS_NAMES, "focal"}
    monkeypatch.setattr(O, "OBJECTIVES", registry)
    # the step's combine runs it like any other
    ce = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.5, 0.0]])
    valid = torch.tensor([[False, True, True], [False, True, False]])
    got = L.combine(L.LossConfig(name="focal", gamma=None), ce, torch.zeros_like(ce), torch.zeros_like(ce), valid)
    q = torch.exp(-ce)
    assert float(got) == pytest.approx(float(((1 - q) ** 2 * ce)[valid].sum() / 3))
