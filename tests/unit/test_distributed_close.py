"""`close_process_group` frees the DDP wrappers that still hold the group before destroying it.

Without that, a dropped DDP wrapper (it sits in reference cycles) lives until the interpreter exits,
and gloo's teardown there aborted one rank of a finished two-rank run now and then (CI, stop 19)."""

import gc
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dflash_lab.train import distributed as D


def test_close_frees_a_dropped_ddp_wrapper_before_destroying_the_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    was_enabled = gc.isenabled()
    gc.disable()  # no collection may slip in between dropping the wrapper and closing the group
    try:
        wrapper = DDP(torch.nn.Linear(4, 4), broadcast_buffers=False)
        wrapper(torch.randn(2, 4)).sum().backward()
        # DDP's own cycles depend on what ran before in the process: make sure there is one, as in a
        # trainer (the wrapper is reachable from the draft's hooks and the trainer's components)
        wrapper.cycle = [wrapper]
        alive = weakref.ref(wrapper)
        del wrapper
        assert alive() is not None
        D.close_process_group()
        assert alive() is None
        assert not dist.is_initialized()
    finally:
        if was_enabled:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
