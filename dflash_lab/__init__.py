"""dflash-lab: train, evaluate and track DFlash draft models.

Pipeline, one package per step: data -> labels -> train -> eval -> registry -> report.
`models/` (target adapter, draft, checkpoint format) and `decoding/` (the verify loop) are used by
all of them and use none of them.
"""

__version__ = "0.1.0"
