"""DFlash training: data -> blocks -> losses -> trainer (see docs/training.md)."""

from dflash_lab.train.recipe import Recipe, load_recipe  # noqa: F401
from dflash_lab.train.state import best_checkpoint  # noqa: F401


def train(*args, **kwargs):
    """See `dflash_lab.train.trainer.train`."""
    from dflash_lab.train.trainer import train as _train

    return _train(*args, **kwargs)
