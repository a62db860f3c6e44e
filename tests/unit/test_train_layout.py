"""The step's loss and every gradient do not depend on how the global batch is laid out: world 2 x
micro 1 x accum 2 (2 gloo processes, DDP, so its no_sync branch runs) equals world 1 x micro 4 and
micro 2 x accum 2 on one process, for every loss. Also FSDP2 over the target's decoder layers
(2 gloo processes) gives the features of the whole target."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train.data import Sample
from dflash_lab.train.loader import InMemorySource, LoaderConfig, TrainLoader
from dflash_lab.train.trainer import FeatureSource, accumulate_gradients

LOSSES = [
    L.LossConfig(name="ce", gamma=4.0),
    L.LossConfig(name="kd", alpha=0.3, gamma=4.0),
    L.LossConfig(name="eal", kl_weight=0.5),
    L.LossConfig(name="survival-eal", kl_weight=1.0),
    L.LossConfig(name="survival-eal", eal_mode="sampled", kl_weight=1.0),
    L.LossConfig(name="dpace", dpace_alpha=0.5, kl_weight=0.5),
    L.LossConfig(name="dpace", dpace_alpha=0.5, kl_weight=0.0, normalize="weights"),
]
GLOBAL = 4


def _samples():
    """Four sequences of very different lengths (a short answer weighs per token, not per sequence)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (prompt, answer) in enumerate([(5, 4), (6, 30), (4, 12), (7, 50)]):
        ids = torch.randint(3, 300, (prompt + answer,), generator=g).tolist()
        out.append(Sample(id=f"s{i}", category="", input_ids=ids, loss_mask=[0] * prompt + [1] * answer))
    return out


def _parts():
    target = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=4)).init_weights(0)
    return target, draft


def _step(target, draft, model, info, micro, accum, loss_cfg):
    loader = TrainLoader(InMemorySource(_samples()), LoaderConfig(
        seed=3, global_batch=GLOBAL, micro_batch=micro, grad_accum=accum, world_size=info.world_size, rank=info.rank,
        num_anchors=6, group_by_length=False))
    features = FeatureSource(target, draft.config.target_layer_ids, True, None, torch.device("cpu"))
    fwd = dict(num_anchors=6, loss_cfg=loss_cfg, chunk_slots=7, device=torch.device("cpu"), anchor_chunk=2)
    draft.zero_grad(set_to_none=True)
    loss, stats = accumulate_gradients(model, draft, draft.config, target, features, loader.micro_batches(0), fwd, info)
    loss = D.all_reduce_sum(loss.detach().clone(), info)
    return float(loss), {n: p.grad.clone() for n, p in draft.named_parameters()}, float(D.all_reduce_sum(stats["valid_slots"].clone(), info))


def _fsdp_check(info):
    """Features and final hidden states of the sharded target vs the whole one, on this rank's
    own sample (the ranks run different lengths); and which tensors were sharded."""
    from torch.distributed.tensor import DTensor

    whole = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    sharded = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    D.shard_target(sharded, info)
    sample = _samples()[info.rank]
    ref = FeatureSource(whole, [1, 3], True, None, torch.device("cpu")).get([sample])[0]
    got = FeatureSource(sharded, [1, 3], True, None, torch.device("cpu"), stop_early=False).get([sample])[0]
    body = sharded.model.model
    return {
        "equal": all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got)),
        "layers_sharded": all(isinstance(p, DTensor) for p in body.layers.parameters()),
        "rest_whole": not any(isinstance(p, DTensor) for p in (*body.embed_tokens.parameters(), *body.norm.parameters(),
                                                                  *sharded.lm_head.parameters())),
    }


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = D.DistInfo(rank=rank, world_size=world)
        results = _rank_results(info)
        results["fsdp"] = _fsdp_check(info)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        D.close_process_group()  # frees the DDP wrapper first: a rank could otherwise abort at exit


def _rank_results(info):
    target, draft = _parts()
    model = D.wrap_draft(draft, info, "cpu")
    results = {}
    for i, cfg in enumerate(LOSSES):
        loss, grads, valid = _step(target, draft, model, info, micro=1, accum=2, loss_cfg=cfg)
        results[i] = (loss, grads, valid)
    return results


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        return torch.load(out_file, weights_only=True)


@pytest.mark.parametrize("index", range(len(LOSSES)), ids=lambda i: f"{LOSSES[i].name}-{LOSSES[i].eal_mode}-{LOSSES[i].normalize}")
def test_layout_invariance(index, two_process_results):
    cfg = LOSSES[index]
    target, draft = _parts()
    one = D.DistInfo()
    ref_loss, ref_grads, ref_valid = _step(target, draft, draft, one, micro=4, accum=1, loss_cfg=cfg)
    acc_loss, acc_grads, acc_valid = _step(target, draft, draft, one, micro=2, accum=2, loss_cfg=cfg)
    ddp_loss, ddp_grads, ddp_valid = two_process_results[index]
    assert ref_valid == acc_valid == ddp_valid > 0
    for loss in (acc_loss, ddp_loss):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    nonzero = 0
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        for grads in (acc_grads, ddp_grads):
            # float32 sums in another order: a layout-dependent weighting would be off by far more
            assert torch.allclose(grads[name], ref, rtol=1e-4, atol=1e-6 * scale), (name, float((grads[name] - ref).abs().max()))
        nonzero += int(ref.abs().sum() > 0)
    assert nonzero > 3


def test_fsdp_target_shards_only_decoder_layers(two_process_results):
    assert two_process_results["fsdp"] == {"equal": True, "layers_sharded": True, "rest_whole": True}
