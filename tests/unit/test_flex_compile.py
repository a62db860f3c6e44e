"""The compiled flex path (issue 23 item 3): the trainer's exact call sequence stays within a few
graphs, and past the recompile limit the run stops with the fix instead of falling back silently to
unfused flex attention (every [Q, K] score materialised: ~47 GB at the qwen3-4b recipe's micro-batch 4).

On CPU, with the CUDA compile options (dynamic shapes, one whole graph) and the aot_eager backend:
dynamo's guards, and so its graphs, do not depend on the backend. Flex refuses backward on CPU only in
its device check; the check is skipped here so the grad calls take the same guards as on a GPU."""

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch._dynamo.utils import counters

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train import blocks as B
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train.data import Sample
from dflash_lab.train.loader import InMemorySource, LoaderConfig, TrainLoader
from dflash_lab.train.step import FeatureSource, accumulate_gradients, heldout_metrics

GRAPH_BUDGET = 6  # measured 5 (2026-12-07); FLEX_RECOMPILE_LIMIT leaves room above it


@pytest.fixture
def compiled_flex_on_cpu(monkeypatch):
    """The GPU path's compiled flex on CPU: CUDA's options, aot_eager, fresh dynamo caches."""
    monkeypatch.setattr(B, "compile_flex_on_cpu", True)
    monkeypatch.setitem(B.FLEX_COMPILE_OPTIONS, "cpu", {**B.FLEX_COMPILE_OPTIONS["cuda"], "backend": "aot_eager"})
    monkeypatch.setattr(B, "_FLEX", {})
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _samples(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [Sample(id=f"s{seed}-{i}", category="", input_ids=torch.randint(10, 300, (n,), generator=g).tolist(),
                   loss_mask=[0] * 6 + [1] * (n - 6)) for i, n in enumerate(lengths)]


def _parts(block_size=16, layers=2):
    target = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=layers, block_size=block_size)).init_weights(0)
    return target, draft


def _fwd(loss_cfg, num_anchors):
    """The trainer's `fwd` settings (Trainer._build_step) with flex attention."""
    return dict(num_anchors=num_anchors, loss_cfg=loss_cfg, attention="flex", anchor_chunk=64, chunk_slots=1024,
                device=torch.device("cpu"), autocast_dtype=None)


def _train_step(target, draft, samples, num_anchors, step):
    loss_cfg = L.LossConfig(name="kd", gamma=7.0)
    loader = TrainLoader(InMemorySource(samples), LoaderConfig(
        seed=1, global_batch=len(samples), micro_batch=2, grad_accum=len(samples) // 2, world_size=1, rank=0,
        num_anchors=num_anchors, group_by_length=False))
    features = FeatureSource(target, draft.config.target_layer_ids, True, None, torch.device("cpu"))
    draft.zero_grad(set_to_none=True)
    accumulate_gradients(draft, draft, draft.config, target, features, loader.micro_batches(step),
                         _fwd(loss_cfg, num_anchors), D.DistInfo(), max_slot=None)


def _heldout(target, draft, samples, num_anchors):
    features = FeatureSource(target, draft.config.target_layer_ids, False, None, torch.device("cpu"))
    return heldout_metrics(draft, draft.config, target, features, InMemorySource(samples), _fwd(None, num_anchors),
                           D.DistInfo(), seed=3)


def test_trainer_call_sequence_stays_within_the_graph_budget(compiled_flex_on_cpu):
    """Training micro-batches of changing lengths and anchor counts (1 to 5 query blocks of 128), the
    last layer with the 15 scored slots of 16, and the held-out evaluation (no grad, one sequence at
    a time) between steps, as the trainer interleaves them: a handful of graphs, no eager flex."""
    target, draft = _parts()
    schedule = [([40, 60, 50, 70], 8), ([90, 120, 100, 80], 20), ([200, 150, 180, 220], 40), ([70, 300, 90, 250], 33)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")  # eager flex
        for step, (lengths, anchors) in enumerate(schedule):
            _train_step(target, draft, _samples(lengths, step), anchors, step)
            assert _heldout(target, draft, _samples([lengths[0] + 7, lengths[1]], 100 + step), anchors)
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= GRAPH_BUDGET < B.FLEX_RECOMPILE_LIMIT, graphs
    assert all(p.grad is not None for p in draft.parameters() if p.requires_grad)


def test_past_the_recompile_limit_the_run_stops_with_the_fix(compiled_flex_on_cpu, monkeypatch):
    """Dynamo's default past its limit: run flex eagerly (unfused) with a log line. Here: an error."""
    monkeypatch.setattr(B, "FLEX_RECOMPILE_LIMIT", 2)
    target, draft = _parts()
    _train_step(target, draft, _samples([40, 60], 0), 8, 0)  # the first graph (and the last layer's)
    with pytest.raises(DFlashLabError, match="train.attention=chunked"):
        _train_step(target, draft, _samples([200, 180], 1), 40, 1)
