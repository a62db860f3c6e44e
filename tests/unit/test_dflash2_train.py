"""DFlash2 in the trainer: the recipe keys, the selector term of the loss (against a direct
computation), the warm start from a v1 checkpoint, and the real `train()` on a tiny target whose
checkpoint loads back as DFlash2 and decodes losslessly with its selector."""

import json
import random

import pytest
import torch

from dflash_lab.decoding.dflash2_drafter import DFlash2Drafter
from dflash_lab.decoding.drafters import make_drafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.checkpoint import load_draft, save_draft
from dflash_lab.models.dflash2 import DFlash2DraftModel
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import load_target, wrap_target
from dflash_lab.testing import tiny_model, tiny_target_dir, write_jsonl
from dflash_lab.train import blocks as B
from dflash_lab.train import losses as L
from dflash_lab.train import selector_loss as SL
from dflash_lab.train.data import Sample
from dflash_lab.train.recipe import parse_recipe
from dflash_lab.train.trainer import FeatureSource, _build_draft, build_micro_blocks, forward_batch, train


def test_recipe_dflash2_defaults_and_keys():
    r = parse_recipe({"draft": {"arch": "dflash2"}})
    assert (r.draft.block_size, r.loss.gamma, r.loss.selector_alpha, r.loss.selector_gold) == (8, 4.0, 1.0, "replace")
    r = parse_recipe({"draft": {"arch": "dflash2", "block_size": 16}, "loss": {"gamma": None, "selector_gold": "exclude"}})
    assert (r.draft.block_size, r.loss.gamma, r.loss.selector_gold) == (16, None, "exclude")
    assert parse_recipe({}).draft.block_size == 16 and parse_recipe({}).loss.gamma == 7.0  # v1 unchanged
    with pytest.raises(Exception, match="selector_gold"):
        parse_recipe({"loss": {"selector_gold": "drop"}})


def _setup(block_size=8):
    target = wrap_target(tiny_model("qwen3", seed=1), mask_token_id=5)
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=block_size)).init_weights(0)
    d2 = DFlash2DraftModel.from_v1(v1, seed=3, conv_group_size=16, selector_rank=8)
    samples = [Sample(id=str(i), category="", input_ids=list(range(3 + i, 45 + i)), loss_mask=[0] * 6 + [1] * 36)
               for i in range(2)]
    feats = FeatureSource(target, v1.target_layer_ids, True, None, torch.device("cpu")).get(samples)
    return target, v1, d2, samples, feats


@pytest.mark.parametrize("gold", ["replace", "exclude"])
def test_selector_term_enters_the_token_level_loss(gold):
    target, v1, d2, samples, feats = _setup()
    with torch.no_grad():  # a live selector, so its term is not trivially the unary CE
        d2.candidate_selector.successor_codebook.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12]
    cfg = dict(name="survival-eal", gamma=4.0, selector_gold=gold)
    kw = dict(num_anchors=5, chunk_slots=4096)
    base_v1, _ = forward_batch(v1, v1.config, target, feats, samples, seeds, loss_cfg=L.LossConfig(**cfg), **kw)
    off, st_off = forward_batch(d2, d2.config, target, feats, samples, seeds,
                                loss_cfg=L.LossConfig(**cfg, selector_alpha=0.0), **kw)
    on, st_on = forward_batch(d2, d2.config, target, feats, samples, seeds,
                              loss_cfg=L.LossConfig(**cfg, selector_alpha=1.0), **kw)
    assert torch.equal(off, base_v1)  # selector_alpha 0: the base loss (the backbone is v1's)
    assert "sel_tau_sum" in st_off and "sel_tau_sum" in st_on
    # reference: the base loss + sum(w ce inc) / sum(w valid or included), computed directly
    blocks = build_micro_blocks(samples, seeds, num_anchors=5, block_size=8, mask_token_id=5)
    valid = blocks["valid"]
    n, a, b = valid.shape
    ctx = torch.nn.utils.rnn.pad_sequence([f for f, _ in feats], batch_first=True)
    with torch.no_grad():
        hidden = d2(target.embed(blocks["block_ids"].view(n, a * b)).float(), blocks["positions"].view(n, a * b), ctx,
                    torch.arange(ctx.shape[1])[None].expand(n, -1),
                    attention=B.make_attention("auto", blocks["anchors"], b, 64)).view(n, a, b, -1)
        w = SL.slot_weights(valid, 4.0)
        pred = SL.teacher_forced_predecessors(blocks["block_ids"], blocks["labels"])[valid]
        sel = SL.selector_loss(d2, hidden[valid], target.lm_head, blocks["labels"][valid], pred, w, gold)
    expected_den = w.sum() if gold == "replace" else (w * sel.included).sum()
    assert gold == "replace" or not sel.included.all()  # exclude really leaves some slot out
    expected = sel.loss * sel.included_weight / expected_den
    assert torch.allclose(on - off, expected, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(on, off)


def test_warm_start_from_a_v1_checkpoint_has_the_v1_logits(tmp_path):
    target, v1, _, samples, feats = _setup(block_size=16)
    path = save_draft(v1, tmp_path / "v1", dtype=torch.float32)
    recipe = parse_recipe({"draft": {"arch": "dflash2", "init": str(path)}})
    d2, parent = _build_draft(recipe, target, seed=0, device=torch.device("cpu"))
    assert isinstance(d2, DFlash2DraftModel) and parent == path and d2.config.block_size == 8
    assert d2.candidate_selector.predecessor_codebook.requires_grad
    seeds = [4, 5]
    cfg8 = build_draft_config(target, num_layers=1, block_size=8)
    v1_8 = DFlashDraftModel(cfg8)
    v1_8.load_state_dict(v1.state_dict())
    blocks = build_micro_blocks(samples, seeds, num_anchors=4, block_size=8, mask_token_id=5)
    ctx = torch.nn.utils.rnn.pad_sequence([f for f, _ in feats], batch_first=True)
    args = (target.embed(blocks["block_ids"].view(2, -1)).float(), blocks["positions"].view(2, -1), ctx,
            torch.arange(ctx.shape[1])[None].expand(2, -1))
    with torch.no_grad():
        assert torch.equal(target.lm_head(d2(*args)), target.lm_head(v1_8(*args)))
    frozen, _ = _build_draft(parse_recipe({"draft": {"arch": "dflash2", "init": str(path)},
                                           "loss": {"selector_alpha": 0}}), target, 0, torch.device("cpu"))
    assert not any(p.requires_grad for p in frozen.candidate_selector.parameters())
    with pytest.raises(Exception, match="draft.arch: dflash2"):
        _build_draft(parse_recipe({"draft": {"init": str(save_draft(d2, tmp_path / "d2"))}}), target, 0,
                     torch.device("cpu"))


WORDS = "the quick brown fox jumps over lazy dog add return step answer".split()


def test_train_dflash2_two_steps_checkpoint_decodes_losslessly(tmp_path):
    target_dir = tiny_target_dir(tmp_path / "target")
    rng = random.Random(0)
    rows = []
    for i in range(8):
        phrase = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"id": f"s{i}", "category": "chat", "source": "test",
                     "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                                  {"role": "assistant", "content": " ".join([phrase] * 5)}]})
    data = write_jsonl(tmp_path / "labels" / "shard-00000.jsonl", rows).parent
    target = load_target(str(target_dir), dtype="float32")
    recipe = {
        "target": {"name": str(target_dir)},
        "draft": {"arch": "dflash2", "num_layers": 1},
        "data": {"max_length": 96, "num_anchors": 6, "heldout": 2},
        "loss": {"name": "survival-eal", "chunk_slots": 64, "selector_gold": "exclude"},
        "train": {"lr": 1e-2, "max_steps": 2, "micro_batch": 2, "global_batch": 4, "grad_accum": 2, "seed": 0,
                  "device": "cpu", "eval_interval": 2},
    }
    final = train(recipe, data, tmp_path / "run", target=target, progress=False)
    # interrupted after step 1 and resumed: the same weights (the DFlash2 tensors round-trip)
    train(recipe, data, tmp_path / "cut", target=target, progress=False, stop_after=1)
    resumed = train(None, data, tmp_path / "cut", target=target, progress=False, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(final / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and "candidate_selector.successor_codebook" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step2 = [r for r in rows if r.get("step") == 2 and "loss" in r][0]
    for key in ("selector_recall", "selector_accuracy", "selector_target_mass", "selector_tau", "unary_tau",
                "heldout_tau", "heldout_unary_tau"):
        assert key in step2 and step2[key] == step2[key], key  # present and not NaN
    event = [r for r in rows if r.get("event") == "checkpoint" and r["name"] == "final"][0]
    assert {"heldout_tau", "heldout_unary_tau"} <= event.keys()  # the selector walk's tau beside the argmax's
    assert json.loads((final / "config.json").read_text())["architectures"] == ["DFlash2DraftModel"]
    draft = load_draft(final, target)
    assert isinstance(draft, DFlash2DraftModel) and draft.config.block_size == 8
    drafter = make_drafter("dflash", target=target, draft=draft)
    assert isinstance(drafter, DFlash2Drafter)
    for prompt in ([3, 17, 40, 41], list(range(20, 50))):
        assert speculative_generate(target, make_drafter("dflash", target=target, draft=draft), prompt, 20).output_ids \
            == greedy_generate(target, prompt, 20).output_ids


def test_dflash2_recipes_and_the_demo_variant(tmp_path):
    from pathlib import Path

    from dflash_lab.demo import PRESETS, STAGES, demo_recipe
    from dflash_lab.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    m2, m2d = load_recipe(root / "qwen3-4b/m2.yaml"), load_recipe(root / "qwen3-4b/m2-dflash2.yaml")
    assert (m2d.draft.arch, m2d.draft.num_layers, m2d.draft.block_size, m2d.loss.gamma) == ("dflash2", 5, 8, 4.0)
    assert (m2d.loss.name, m2d.loss.selector_alpha, m2d.data.prompt_set) == (m2.loss.name, 1.0, m2.data.prompt_set)
    cpu = load_recipe(root / "smollm2-135m/cpu-dflash2.yaml")
    assert (cpu.draft.arch, cpu.draft.block_size, cpu.draft.init_from_target_layers) == ("dflash2", 8, True)
    for stage in STAGES:
        r = parse_recipe(demo_recipe(PRESETS["test"], stage, tmp_path, arch="dflash2"))
        assert (r.draft.arch, r.draft.block_size, r.loss.gamma, r.loss.selector_alpha) == ("dflash2", 8, 4.0, 1.0)
        v1 = parse_recipe(demo_recipe(PRESETS["test"], stage, tmp_path))
        assert (v1.draft.arch, v1.draft.block_size, v1.loss.gamma) == ("dflash", 16, 7.0)


# -- the selector term under the step's global reduction: layout invariance -----------------------
def _layout_parts():
    target = wrap_target(tiny_model("qwen3"), mask_token_id=5)
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=4)).init_weights(0)
    d2 = DFlash2DraftModel.from_v1(v1, seed=1, conv_group_size=16, selector_rank=8)
    with torch.no_grad():  # a live conv and selector
        gen = torch.Generator().manual_seed(2)
        for name, p in d2.named_parameters():
            if "_conv.kernel_projection" in name or "successor" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return target, d2


def _layout_step(target, draft, model, info, micro, accum, gold):
    from dflash_lab.train import distributed as D
    from dflash_lab.train.loader import InMemorySource, LoaderConfig, TrainLoader
    from dflash_lab.train.trainer import accumulate_gradients

    g = torch.Generator().manual_seed(1)
    samples = []
    for i, (prompt, answer) in enumerate([(5, 4), (6, 30), (4, 12), (7, 50)]):
        ids = torch.randint(3, 300, (prompt + answer,), generator=g).tolist()
        samples.append(Sample(id=f"s{i}", category="", input_ids=ids, loss_mask=[0] * prompt + [1] * answer))
    loader = TrainLoader(InMemorySource(samples), LoaderConfig(
        seed=3, global_batch=4, micro_batch=micro, grad_accum=accum, world_size=info.world_size, rank=info.rank,
        num_anchors=6, group_by_length=False))
    features = FeatureSource(target, draft.config.target_layer_ids, True, None, torch.device("cpu"))
    cfg = L.LossConfig(name="ce", gamma=4.0, selector_gold=gold)
    fwd = dict(num_anchors=6, loss_cfg=cfg, chunk_slots=7, device=torch.device("cpu"), anchor_chunk=2)
    draft.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, draft, draft.config, target, features, loader.micro_batches(0), fwd, info)
    return float(D.all_reduce_sum(loss.detach().clone(), info)), {n: p.grad.clone() for n, p in draft.named_parameters()}


def _layout_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    from dflash_lab.train import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = _layout_rank_results(D.DistInfo(rank=rank, world_size=world))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        D.close_process_group()  # frees the DDP wrapper first: a rank could otherwise abort at exit


def _layout_rank_results(info):
    from dflash_lab.train import distributed as D

    target, draft = _layout_parts()
    model = D.wrap_draft(draft, info, "cpu")  # DDP: the selector's gradients come from outside its forward
    return {gold: _layout_step(target, draft, model, info, 1, 2, gold) for gold in ("replace", "exclude")}


def test_selector_loss_does_not_depend_on_the_batch_layout(tmp_path):
    """micro 4 == micro 2 x accum 2 == 2 DDP ranks x accum 2, loss and every gradient, both policies."""
    import torch.multiprocessing as mp

    from dflash_lab.train import distributed as D

    mp.spawn(_layout_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "out.pt", weights_only=True)
    target, draft = _layout_parts()
    for gold in ("replace", "exclude"):
        ref_loss, ref = _layout_step(target, draft, draft, D.DistInfo(), 4, 1, gold)
        for loss, grads in (_layout_step(target, draft, draft, D.DistInfo(), 2, 2, gold), ddp[gold]):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            scale = max(float(g.abs().max()) for g in ref.values())
            for name, g in ref.items():
                assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6 * scale), (gold, name)
        assert ref["candidate_selector.successor_codebook"].abs().sum() > 0
