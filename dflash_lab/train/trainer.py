"""The DFlash trainer: one process or `torchrun`, CPU or GPU.

    dflash-lab train --config recipes/smollm2-135m/cpu.yaml --data labels/ --out runs/cpu
    torchrun --nproc-per-node 8 -m dflash_lab train --config recipes/qwen3-4b/m1.yaml --data labels/ --out runs/m1

Each optimizer step takes `global_batch` sequences (micro_batch per rank x world x grad_accum):
the frozen target gives the features (online, or from the feature cache), every sequence gets
`num_anchors` fresh anchors, all its blocks go through the draft in one forward with the block
attention of `blocks.py`, and the loss of `losses.py` is a token-level mean over every slot of
the global batch (its denominators are all-reduced over micro-steps and ranks). The run's parts
are small components (`loader.py`, `components.py`); `train()` wires them. Everything random is a pure function of (seed, epoch, step, slot in the batch):
the epoch order, the anchors, the held-out anchors. With the optimizer state restored, a resumed
run therefore repeats the interrupted one exactly, and the batch layout over ranks does not
change the result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text
from dflash_lab.train import blocks as B
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train import selector_loss as SL
from dflash_lab.train import state as S
from dflash_lab.train.components import (CheckpointConfig, Checkpointer, DraftParts, Metrics, MetricsConfig, OptimConfig,
                                         Progress, RunRecord, cosine_lr, now_iso, truncate_metrics, warn)
from dflash_lab.train.data import FeatureCache, Sample, manifest_sha256
from dflash_lab.train.loader import LoaderConfig, SubsetSource, TrainLoader, split_indices
from dflash_lab.train.recipe import Recipe, load_recipe, parse_recipe, recipe_to_yaml, resolve_batch
from dflash_lab.train.sampler import mix_seed as _mix_seed


__all__ = ["train", "forward_batch", "build_micro_blocks", "accumulate_gradients", "heldout_tau", "FeatureSource",
           "init_from_target_layers", "cosine_lr"]


# -- draft initialisation --------------------------------------------------------------------------
def init_from_target_layers(draft, target) -> list[str]:
    """Copy the target's last decoder layers (attention, MLP, norms) and final norm into the draft
    where shapes match; q_norm/k_norm stay ones when the target has none; fc becomes the identity
    on the last feature layer's slice (zeros elsewhere), and when that feature is the first copied
    layer's input (target_layer_ids[-1] == L - n - 1) hidden_norm takes that layer's input norm.
    Returns the copied tensor names."""
    body = getattr(target.model, "model", target.model)
    layers = list(body.layers)
    n = len(draft.layers)
    copied = []
    with torch.no_grad():
        for i, layer in enumerate(draft.layers):
            source = dict(layers[len(layers) - n + i].named_parameters())
            for name, param in layer.named_parameters():
                if name in source and tuple(source[name].shape) == tuple(param.shape):
                    param.copy_(source[name].to(param.dtype))
                    copied.append(f"layers.{i}.{name}")
                elif name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.fill_(1.0)
        if hasattr(body, "norm") and body.norm.weight.shape == draft.norm.weight.shape:
            draft.norm.weight.copy_(body.norm.weight.to(draft.norm.weight.dtype))
            copied.append("norm.weight")
        h = draft.config.hidden_size
        nfeat = len(draft.config.target_layer_ids)
        draft.fc.weight.zero_()
        draft.fc.weight[:, (nfeat - 1) * h:].copy_(torch.eye(h, dtype=draft.fc.weight.dtype))
        copied.append("fc.weight(identity)")
        first = layers[len(layers) - n]
        if draft.config.target_layer_ids[-1] == len(layers) - n - 1 and hasattr(first, "input_layernorm"):
            # the last feature is exactly the first copied layer's input: c = hidden_norm(h) then
            # gives that layer's own normalised input, so its K/V over the context start as the target's
            draft.hidden_norm.weight.copy_(first.input_layernorm.weight.to(draft.hidden_norm.weight.dtype))
            copied.append("hidden_norm.weight")
        else:
            draft.hidden_norm.weight.fill_(1.0)
    return copied


# -- target features -------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the last feature layer has run (nothing after it is needed)."""


class FeatureSource:
    """Target features [S, n*H] and, when the loss needs p_k, the final hidden states [S, H]
    (after the target's final norm; lm_head of it = the target's logits), per sample.

    Without `need_final` (ce, held-out scoring) and without a cache (whose entries hold both), the
    target stops after the last feature layer (`stop_early`): the layers above it never run."""

    def __init__(self, target, layer_ids, need_final: bool, cache: FeatureCache | None, device, stop_early: bool = True):
        self.target, self.layer_ids, self.need_final, self.cache, self.device = target, layer_ids, need_final, cache, device
        body = getattr(target.model, "model", target.model)
        layers = list(getattr(body, "layers", []))
        # hidden_states[L] is after the final norm: a feature of the last layer needs the whole forward
        self._layers = layers if (stop_early and not need_final and cache is None and layers
                                  and max(layer_ids) < len(layers) - 1) else None

    def _forward(self, ids):
        """(features [N, S, n*H], final hidden [N, S, H] or None)."""
        model = self.target.model
        if self._layers is None:
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            return torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1), out.hidden_states[-1]
        captured = {}
        last = max(self.layer_ids)

        def hook(index):
            def fn(module, args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == last:
                    raise _StopForward
            return fn

        handles = [self._layers[i].register_forward_hook(hook(i)) for i in sorted(set(self.layer_ids))]
        try:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.cat([captured[i] for i in self.layer_ids], dim=-1), None

    @torch.no_grad()
    def _run(self, samples: list[Sample]):
        if self.device.type == "cuda" and len(samples) > 1:  # batched, right-padded (causal: exact)
            ids = B.pad_sequences([torch.tensor(s.input_ids) for s in samples]).to(self.device)
            feats, final = self._forward(ids)
            return [(feats[j, : len(s.input_ids)], None if final is None else final[j, : len(s.input_ids)])
                    for j, s in enumerate(samples)]
        result = []
        for s in samples:
            feats, final = self._forward(torch.tensor([s.input_ids], device=self.device))
            result.append((feats[0], None if final is None else final[0]))
        return result

    def get(self, samples: list[Sample]):
        if self.cache is None:
            return self._run(samples)
        found = [self.cache.get(s) for s in samples]
        missing = [s for s, f in zip(samples, found) if f is None]
        if missing:
            fresh = iter(self._run(missing))
            for i, f in enumerate(found):
                if f is None:
                    feats, final = next(fresh)
                    self.cache.put(samples[i], feats, final)
                    # read back: every epoch sees the same (rounded) values, fresh or cached
                    found[i] = self.cache.get(samples[i])
                    self.cache.hits -= 1
        return [(f.to(self.device), fin.to(self.device)) for f, fin in found]


# -- one forward over a micro-batch ----------------------------------------------------------------
def build_micro_blocks(samples, anchor_seeds, *, num_anchors: int, block_size: int, mask_token_id: int,
                       max_slot: int | None = None) -> dict[str, torch.Tensor]:
    """The blocks of a micro-batch (CPU): anchors [N, A], block_ids, positions, labels, valid [N, A, B].
    `max_slot`: slots past it count as invalid (they reach neither the head nor the loss). Depends only
    on the data and the seeds, so the step's denominators can be summed before any forward."""
    items = []
    for s, seed in zip(samples, anchor_seeds):
        ids = torch.tensor(s.input_ids)
        mask = torch.tensor(s.loss_mask)
        gen = torch.Generator().manual_seed(seed)
        anchors = B.sample_anchors(mask, num_anchors, gen)
        block_ids, positions, labels, valid = B.build_blocks(ids, mask, anchors, block_size, mask_token_id)
        items.append({"anchors": anchors, "block_ids": block_ids, "positions": positions, "labels": labels, "valid": valid})
    batch = B.collate_blocks(items, pad_id=mask_token_id)
    if max_slot is not None:
        batch["valid"] = batch["valid"] & (torch.arange(block_size) <= max_slot)
    return batch


def _unwrap(draft_module):
    return getattr(draft_module, "module", draft_module)  # DDP


def _is_dflash2(draft_module) -> bool:
    from dflash_lab.models.dflash2 import DFlash2DraftModel

    return isinstance(_unwrap(draft_module), DFlash2DraftModel)


def _needs_model_denominators(loss_cfg, draft_module) -> bool:
    """The base loss's draft-dependent sums, or DFlash2's exact `exclude` mean (sum(w * included))."""
    return L.needs_model_denominators(loss_cfg) or (
        loss_cfg.selector_alpha > 0 and loss_cfg.selector_gold == "exclude" and _is_dflash2(draft_module))


def _selector(draft_module, batch, valid, h_sel, labels, target, loss_cfg, chunk_slots, t_rows, t_index):
    """DFlash2's selector CE (numerator only: the caller divides by the step's denominator) and its
    metrics; None for a v1 draft. Held-out (`loss_cfg` None) and selector_alpha 0: metrics only."""
    if not _is_dflash2(draft_module):
        return None
    pred = SL.teacher_forced_predecessors(batch["block_ids"], batch["labels"])[valid]
    gamma = loss_cfg.gamma if loss_cfg is not None else None
    gold = loss_cfg.selector_gold if loss_cfg is not None else "replace"
    grad = loss_cfg is not None and loss_cfg.selector_alpha > 0
    with contextlib.nullcontext() if grad else torch.no_grad():
        return SL.selector_loss(_unwrap(draft_module), h_sel, target.lm_head, labels, pred, SL.slot_weights(valid, gamma),
                                gold, chunk_slots=chunk_slots, denominator=1.0, target_hidden=t_rows,
                                target_index=t_index)


def forward_batch(draft_module, draft_cfg, target, features, samples, anchor_seeds, *, num_anchors, loss_cfg,
                  attention="auto", anchor_chunk=64, chunk_slots=1024, device=torch.device("cpu"),
                  autocast_dtype=None, max_slot=None, blocks=None, denominators=None, model_denominators=None,
                  reduce=None):
    """This micro-batch's share of the step's loss, and its statistics (device tensors, no sync).

    `denominators` [5] (`losses.DENOMINATORS`): the step's model-independent sums, all-reduced;
    None = this micro-batch's own (the loss is then its token-level mean). `model_denominators`:
    the step's draft-dependent sums (survival-eal, dpace) from a pre-pass; None = computed here
    and passed through `reduce` (an all-reduce over ranks, or None for this batch alone).
    `blocks`: `build_micro_blocks` of these samples (built here when None). `max_slot`: score only
    slots 1..max_slot. `loss_cfg` None: held-out scoring only (no loss, no teacher logits)."""
    bsz = draft_cfg.block_size
    if blocks is None:
        blocks = build_micro_blocks(samples, anchor_seeds, num_anchors=num_anchors, block_size=bsz,
                                    mask_token_id=draft_cfg.mask_token_id, max_slot=max_slot)
    batch = {k: v.to(device) for k, v in blocks.items()}
    n, a = batch["anchors"].shape
    ctx = B.pad_sequences([f for f, _ in features])  # [N, S, n*H]
    s_max = ctx.shape[1]
    ctx_pos = torch.arange(s_max, device=device)[None].expand(n, s_max)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    valid = batch["valid"]
    with autocast:
        with torch.no_grad():
            # fp32 like the draft's master weights: RoPE and norms in fp32, autocast runs the linears in bf16
            noise = target.embed(batch["block_ids"].view(n, a * bsz)).float()
        attn = B.make_attention(attention, batch["anchors"], bsz, anchor_chunk)
        # only the scored slots go through the last layer's query/MLP and the (large) lm_head
        h_sel = draft_module(noise, batch["positions"].view(n, a * bsz), ctx, ctx_pos, attention=attn,
                             output_slots=valid.view(n, a * bsz))
        labels = batch["labels"][valid]
        t_rows = t_index = None
        if loss_cfg is not None and L.needs_target_logits(loss_cfg.name, loss_cfg.eal_mode, loss_cfg.alpha, loss_cfg.kl_term):
            final = B.pad_sequences([fin for _, fin in features])  # [N, S, H]
            seq_idx = torch.arange(n, device=device)[:, None, None].expand_as(valid)[valid]
            # flat index of position p+k-1 in [N*S]: slot k's target distribution lives there
            t_index = seq_idx * final.shape[1] + batch["positions"][valid] - 1
            t_rows = final.reshape(-1, final.shape[-1]).to(h_sel.dtype)
        ce, kl, overlap, correct = L.slot_statistics(h_sel, labels, target.lm_head, t_rows, chunk_slots,
                                                     target_index=t_index,
                                                     need_overlap=loss_cfg is not None and L.needs_overlap(loss_cfg))
        sel = _selector(draft_module, batch, valid, h_sel, labels, target, loss_cfg, chunk_slots, t_rows, t_index)
    # every sequence's blocks at once: [N*A, B] (the reduction is token-level, not per sequence)
    ce_b, kl_b, ov_b, cor_b = (L.scatter_slots(x, valid).view(n * a, bsz) for x in (ce, kl, overlap, correct))
    flat_valid = valid.view(n * a, bsz)
    loss = None
    local_model = torch.zeros(len(L.DENOMINATORS), dtype=torch.float64, device=device)
    if loss_cfg is not None:
        dens = L.static_denominators(loss_cfg, flat_valid) if denominators is None else denominators.to(device)
        if _needs_model_denominators(loss_cfg, draft_module):
            local_model = L.model_denominators(loss_cfg, ce_b, ov_b, flat_valid)
            if sel is not None:
                local_model[L.DENOMINATORS.index("selector")] = sel.included_weight.double()
            if model_denominators is None:
                model_denominators = reduce(local_model.clone()) if reduce is not None else local_model
            dens = dens + model_denominators.to(device)
        loss = L.combine(loss_cfg, ce_b, kl_b, ov_b, flat_valid, dens)
        if sel is not None and loss_cfg.selector_alpha > 0:  # token-level: / the step's sum(w*valid) or sum(w*included)
            den = dens[L.DENOMINATORS.index("weights" if loss_cfg.selector_gold == "replace" else "selector")]
            loss = loss + loss_cfg.selector_alpha * sel.loss / den.clamp_min(1e-12).to(sel.loss.dtype)
    with torch.no_grad():
        has = flat_valid.any(dim=1)
        taus = L.simulated_tau(cor_b, flat_valid)[has]
        vd = flat_valid.double()
        stats = {
            "correct_per_slot": (cor_b.double() * vd).sum(dim=0), "valid_per_slot": vd.sum(dim=0),
            "tau_sum": taus.double().sum(), "blocks": has.double().sum(),
            "kl_sum": (kl_b.double() * vd).sum(), "ce_sum": (ce_b.double() * vd).sum(),
            "block_tokens": torch.tensor(float(n * a * bsz), dtype=torch.float64, device=device),
            "valid_slots": vd.sum(), "model_denominators": local_model,
        }
        if sel is not None:
            stats.update(SL.selector_stats(sel, valid))
    return loss, stats


# -- one optimizer step ---------------------------------------------------------------------------
def accumulate_gradients(model, draft, draft_cfg, target, features, micro_batches, fwd: dict, info: D.DistInfo,
                         max_slot=None):
    """Forward and backward of every micro-batch of this rank for one optimizer step; the draft's
    .grad then holds the gradient of the step's loss (DDP averages over ranks, hence x world).

    The model-independent denominators of the token-level loss are summed over the micro-batches
    and all-reduced first. When the loss also divides by a draft-dependent sum (survival-eal,
    dpace: `losses.needs_model_denominators`), that sum is exact as well: with one micro-batch per
    rank it is all-reduced inside the forward, before backward; with accumulation a no-grad
    pre-pass over the micro-batches computes it first (about one extra draft forward; the target
    features it fetched are kept for the main pass, so the target runs once).
    Returns (this rank's share of the loss, statistics), device tensors."""
    loss_cfg = fwd["loss_cfg"]
    blocks = [build_micro_blocks(mb.samples, mb.anchor_seeds, num_anchors=fwd["num_anchors"],
                                 block_size=draft_cfg.block_size, mask_token_id=draft_cfg.mask_token_id,
                                 max_slot=max_slot) for mb in micro_batches]
    static = sum(L.static_denominators(loss_cfg, b["valid"].flatten(0, 1)) for b in blocks)
    static = D.all_reduce_sum(static, info)
    model_dens, reduce = None, None
    kept = [None] * len(micro_batches)  # the pre-pass's target features, reused by the main pass
    if _needs_model_denominators(loss_cfg, draft):
        if len(micro_batches) == 1:
            reduce = lambda t: D.all_reduce_sum(t, info)  # noqa: E731
        else:
            with torch.no_grad():
                local = None
                for i, (mb, blk) in enumerate(zip(micro_batches, blocks)):
                    kept[i] = features.get(mb.samples)
                    _, st = forward_batch(draft, draft_cfg, target, kept[i], mb.samples, mb.anchor_seeds,
                                          blocks=blk, denominators=static, model_denominators=static * 0, **fwd)
                    local = st["model_denominators"] if local is None else local + st["model_denominators"]
                model_dens = D.all_reduce_sum(local, info)
    loss_total, agg = None, None
    for i, (mb, blk) in enumerate(zip(micro_batches, blocks)):
        feats = kept[i] if kept[i] is not None else features.get(mb.samples)
        kept[i] = None
        sync = contextlib.nullcontext() if (i == len(micro_batches) - 1 or not info.enabled) else model.no_sync()
        with sync:
            loss, st = forward_batch(model, draft_cfg, target, feats, mb.samples, mb.anchor_seeds, blocks=blk,
                                     denominators=static, model_denominators=model_dens, reduce=reduce, **fwd)
            (loss * info.world_size).backward()
        loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        agg = st if agg is None else {k: agg[k] + st[k] for k in agg}
    return loss_total, agg


@torch.no_grad()
def heldout_tau(draft, draft_cfg, target, features, heldout, fwd: dict, info: D.DistInfo, seed: int,
                lockstep: bool = False) -> float | None:
    """Simulated tau on the held-out split (fixed anchors, every slot scored, no teacher logits),
    over all ranks; for a DFlash2 draft the tau of the selector's own greedy walk. `lockstep`: every rank runs the target equally often (FSDP gathers per layer)."""
    if len(heldout) == 0:
        return None
    draft.eval()
    rounds = math.ceil(len(heldout) / info.world_size)
    kw = {**fwd, "loss_cfg": None}
    sums = torch.zeros(2, dtype=torch.float64)
    for r in range(rounds):
        j = r * info.world_size + info.rank
        if j >= len(heldout):
            if lockstep:
                features.get([heldout.sample(0)])
            continue
        s = heldout.sample(j)
        _, st = forward_batch(draft, draft_cfg, target, features.get([s]), [s], [_mix_seed(seed, 424242, j)], **kw)
        sums += torch.stack([st.get("sel_tau_sum", st["tau_sum"]), st["blocks"]]).cpu()
    draft.train()
    totals = D.all_reduce_sum(sums, info)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


# -- the run ---------------------------------------------------------------------------------------
def _pick_device(name: str, info: D.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        name = f"cuda:{info.local_rank}"
    return torch.device(name)


def _as_recipe(config) -> Recipe:
    if isinstance(config, Recipe):
        return config
    if isinstance(config, dict):
        return parse_recipe(config)
    return load_recipe(config)


def _build_draft(recipe: Recipe, target, seed: int, device):
    """(draft in fp32 on `device`, parent checkpoint or None)."""
    from dflash_lab.models.checkpoint import load_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config

    dflash2 = recipe.draft.arch == "dflash2"
    parent = S.resolve_init(recipe.draft.init)
    if parent is not None:
        draft = load_draft(parent, target, dtype=torch.float32)
        master = S.master_weights(parent)
        if master is not None:  # our own checkpoint in bf16: start from its fp32 training weights
            draft.load_state_dict({k: v.float() for k, v in master.items()})
        if isinstance(draft, DFlash2DraftModel) and not dflash2:
            raise DFlashLabError(f"draft.init {parent} is a DFlash2 draft but draft.arch is dflash; "
                                 "set draft.arch: dflash2 (or start a v1 draft from a v1 checkpoint)")
        if dflash2 and not isinstance(draft, DFlash2DraftModel):
            # warm start from v1: its backbone, identity conv, zero successor codebook (= the v1 draft)
            draft = DFlash2DraftModel.from_v1(draft, seed=seed, block_size=recipe.draft.block_size)
    else:
        build = build_dflash2_config if dflash2 else build_draft_config
        cfg = build(
            target, num_layers=recipe.draft.num_layers, block_size=recipe.draft.block_size,
            mask_token_id=recipe.draft.mask_token_id, target_layer_ids=recipe.draft.target_layer_ids,
            intermediate_size=recipe.draft.intermediate_size, rope_theta=recipe.draft.rope_theta,
            sliding_window=recipe.draft.sliding_window, layer_types=recipe.draft.layer_types,
        )
        draft = (DFlash2DraftModel if dflash2 else DFlashDraftModel)(cfg).init_weights(seed)
        if recipe.draft.init_from_target_layers:
            init_from_target_layers(draft, target)
    if isinstance(draft, DFlash2DraftModel) and recipe.loss.selector_alpha == 0:
        draft.candidate_selector.requires_grad_(False)  # no gradient ever (DDP needs one for every trainable)
    draft.activation_checkpointing = recipe.train.activation_checkpointing  # recompute layers in backward
    return draft.to(device=device, dtype=torch.float32).train(), parent


def _loss_config(lcfg) -> L.LossConfig:
    return L.LossConfig(name=lcfg.name, alpha=lcfg.alpha, gamma=lcfg.gamma, eal_mode=lcfg.eal_mode,
                        kl_weight=lcfg.kl_weight, dpace_alpha=lcfg.dpace_alpha, normalize=lcfg.normalize,
                        selector_alpha=lcfg.selector_alpha, selector_gold=lcfg.selector_gold)


def _load_source(target, data_path, dcfg, info: D.DistInfo, progress: bool = True):
    """The sample source: the token store of this data (built once per node, by local rank 0,
    memory-mapped, so a rank's memory does not grow with the dataset). Returns (store, stats)."""
    from dflash_lab.train.store import TokenStore

    store = TokenStore.open_or_build(data_path, target, dcfg.max_length, dcfg.min_supervised,
                                     root=dcfg.token_store, local_rank=info.local_rank,
                                     progress=progress and info.local_rank == 0)
    return store, store.stats


def train(config, data_path, out_dir, target=None, resume: bool = False, max_steps: int | None = None,
          progress: bool = True, stop_after: int | None = None, db: str | None = None,
          recipe_path: str | None = None) -> Path:
    """Train a DFlash draft; returns the final checkpoint (or the last one when `stop_after` stops
    the run early). `config`: a Recipe, a dict, or a YAML path; with `resume` and config None the
    run's own config.yaml is used. `target`: an already loaded TargetModel to reuse."""
    out_dir = Path(out_dir).expanduser().resolve()
    if config is None:
        if not (out_dir / "config.yaml").is_file():
            raise DFlashLabError(f"--resume: {out_dir}/config.yaml not found; pass --config or a run directory")
        config = out_dir / "config.yaml"
    recipe = _as_recipe(config)
    updates = {k: v for k, v in (("max_steps", max_steps), ("stop_after", stop_after)) if v is not None}
    if updates:
        recipe = parse_recipe({**recipe.model_dump(mode="json"), "train": {**recipe.train.model_dump(mode="json"), **updates}})
    tcfg = recipe.train
    if recipe.target.fsdp and recipe.data.feature_cache:
        raise DFlashLabError("target.fsdp with data.feature_cache: cache hits differ between ranks, which FSDP's "
                             "per-layer gathers cannot follow; drop one of them")
    world = D.env_world_size()
    resolve_batch(recipe, world)

    if (out_dir / "run.json").exists() and not resume:
        if S.list_checkpoints(out_dir):
            raise DFlashLabError(f"--out {out_dir} already holds a run with checkpoints; pass --resume to continue it "
                                 "or choose a new directory")
    resume_from = S.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None and not (out_dir / "run.json").exists():
        raise DFlashLabError(f"--resume: no run in {out_dir} (no run.json, no checkpoints)")
    if resume_from is not None and resume_from.name == "final":
        return resume_from  # already finished

    device = _pick_device(tcfg.device, D.DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world))
    info = D.init_distributed(device.type)
    try:
        return _run(recipe, config, data_path, out_dir, target, resume, resume_from, progress, db, recipe_path, device, info)
    finally:
        D.shutdown(info)


def _run(recipe, config, data_path, out_dir, target, resume, resume_from, progress, db, recipe_path, device, info) -> Path:
    tcfg, dcfg, lcfg = recipe.train, recipe.data, recipe.loss
    micro, accum, global_batch = resolve_batch(recipe, info.world_size)
    use_bf16 = tcfg.bf16 if tcfg.bf16 is not None else device.type == "cuda"
    if tcfg.cpu_threads and device.type == "cpu":
        torch.set_num_threads(tcfg.cpu_threads)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed % (1 << 32))
    torch.manual_seed(tcfg.seed)

    # target + data
    if target is None:
        from dflash_lab.models.target import load_target

        target = load_target(recipe.target.name, dtype=recipe.target.dtype, device=str(device))
    if recipe.target.fsdp:
        D.shard_target(target, info)
    source, tok_stats = _load_source(target, data_path, dcfg, info, progress)
    num_records = tok_stats["records"]
    train_idx, held_idx = split_indices(len(source), dcfg.heldout, dcfg.heldout_max, tcfg.seed)
    train_set, heldout = SubsetSource(source, train_idx), SubsetSource(source, held_idx)
    if len(train_set) < global_batch:
        raise DFlashLabError(
            f"data {data_path}: {len(train_set)} usable training sequences (of {num_records} records; "
            f"{tok_stats['skipped_few_supervised']} skipped with < {dcfg.min_supervised} supervised tokens) is fewer than "
            f"one global batch ({global_batch}); lower train.global_batch/micro_batch or add data"
        )
    loader = TrainLoader(train_set, LoaderConfig(
        seed=tcfg.seed, global_batch=global_batch, micro_batch=micro, grad_accum=accum, world_size=info.world_size,
        rank=info.rank, num_anchors=dcfg.num_anchors, group_by_length=dcfg.group_by_length, group_window=dcfg.group_window))
    steps_per_epoch = loader.steps_per_epoch
    progress_state = Progress(total_steps=min(tcfg.epochs * steps_per_epoch, tcfg.max_steps or 1 << 62),
                              budget_fixed=not tcfg.time_budget_s)

    # draft + optimizer + schedule
    draft, parent = _build_draft(recipe, target, tcfg.seed, device)
    dcfg_draft = draft.config
    parts = DraftParts(draft, OptimConfig(lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                                          warmup_ratio=tcfg.warmup_ratio, min_lr_ratio=tcfg.min_lr_ratio, clip=tcfg.clip))
    if resume_from is not None:
        from safetensors.torch import load_file

        parts.load_checkpoint(resume_from)
        st = S.read_trainer_state(resume_from)
        progress_state.load_state_dict(st, bool(tcfg.time_budget_s))
        loader.load_state_dict(st["data_position"])
        S.set_rng_state(json.loads((resume_from / "rng.json").read_text()), load_file(str(resume_from / "rng.safetensors")))

    model = D.wrap_draft(draft, info, str(device))
    loss_cfg = _loss_config(lcfg)
    need_final = L.needs_target_logits(loss_cfg.name, loss_cfg.eal_mode, loss_cfg.alpha, loss_cfg.kl_term)
    cache = None
    if dcfg.feature_cache:
        cache = FeatureCache(dcfg.feature_cache, target.fingerprint, dcfg_draft.target_layer_ids, dcfg.feature_cache_dtype)
    features = FeatureSource(target, dcfg_draft.target_layer_ids, need_final, cache, device,
                             stop_early=not recipe.target.fsdp)
    fwd = dict(num_anchors=dcfg.num_anchors, loss_cfg=loss_cfg, attention=tcfg.attention, anchor_chunk=tcfg.anchor_chunk,
               chunk_slots=lcfg.chunk_slots, device=device, autocast_dtype=torch.bfloat16 if use_bf16 else None)

    # run directory
    record = RunRecord(out_dir / "run.json")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # stop_after is run control, not recipe: a resumed run must not stop again at the same step
        saved_recipe = parse_recipe({**recipe.model_dump(mode="json"),
                                     "train": {**recipe.train.model_dump(mode="json"), "stop_after": None}})
        atomic_write_text(out_dir / "config.yaml", recipe_to_yaml(saved_recipe))
        record.write({
            "name": recipe.name or out_dir.name,
            "run_dir": str(out_dir),
            "recipe": saved_recipe.model_dump(mode="json"),
            "recipe_path": recipe_path or (str(config) if isinstance(config, (str, os.PathLike)) else None),
            "parent": str(parent.resolve()) if parent is not None else None,
            "data": {"path": str(Path(data_path).resolve()), "manifest_sha256": manifest_sha256(data_path),
                     "records": num_records, "train_sequences": len(train_set), "heldout_sequences": len(heldout),
                     "tokenize": tok_stats},
            "loss": recipe.loss.model_dump(mode="json"),
            "schedule": {"total_steps": progress_state.total_steps, "steps_per_epoch": steps_per_epoch, "epochs": tcfg.epochs,
                         "global_batch": global_batch, "micro_batch": micro, "grad_accum": accum, "world_size": info.world_size,
                         "lr": tcfg.lr, "warmup_ratio": tcfg.warmup_ratio, "min_lr_ratio": tcfg.min_lr_ratio,
                         "time_budget_s": tcfg.time_budget_s, "group_by_length": dcfg.group_by_length},
            "target": target.describe(),
            "draft": dcfg_draft.to_json_dict(),
            "device": str(device), "bf16": use_bf16,
            "created": now_iso(),
            "status": "running",
        }, resume_from, resume)
        truncate_metrics(out_dir / "metrics.jsonl", progress_state.step)
    D.barrier(info)

    metrics = Metrics(MetricsConfig(out_dir=out_dir, block_size=dcfg_draft.block_size, global_batch=global_batch,
                                    log_every=tcfg.log_every, progress=progress, total_steps=progress_state.total_steps,
                                    initial_step=progress_state.step), info)
    checkpointer = Checkpointer(CheckpointConfig(out_dir=out_dir, keep_last=tcfg.keep_last, dtype=target.dtype), info)

    def evaluate() -> float | None:
        return heldout_tau(draft, dcfg_draft, target, features, heldout, fwd, info, tcfg.seed, lockstep=recipe.target.fsdp)

    def checkpoint(name: str, last: dict, epoch_end: bool) -> Path:
        # `last` holds the last step's metrics: a held-out tau in them was measured on these very weights
        tau = last["heldout_tau"] if "heldout_tau" in last else evaluate()
        if tau is not None:
            last = {**last, "heldout_tau": tau}
        progress_state.record_tau(tau)
        position = loader.state_dict()
        state = {**progress_state.state_dict(), "epoch": position["epoch"] + 1, "epoch_end": epoch_end,
                 "data_position": position, "metrics": last, "seed": tcfg.seed}
        path = checkpointer.save(name, parts, state)
        metrics.write_event(progress_state.step, {"event": "checkpoint", "name": name, **last})
        return path

    last_metrics: dict = {}
    stop_at = tcfg.stop_after
    stopped_early = False
    budget_mark = None  # (time, step) where the step timing for train.time_budget_s starts
    p = progress_state
    while p.step < p.total_steps:
        while not loader.epoch_done and p.step < p.total_steps:
            t0 = time.perf_counter()
            lr = parts.set_lr(p.step, p.total_steps)
            loss, stats = accumulate_gradients(model, draft, dcfg_draft, target, features, loader.micro_batches(p.step),
                                               fwd, info, max_slot=lcfg.max_slot)
            grad_norm = parts.step()
            p.step += 1
            loader.advance()
            if not p.budget_fixed and budget_mark is None:
                budget_mark = (time.perf_counter(), p.step)  # the first step pays warm-up costs: not timed
            elif not p.budget_fixed and p.step - budget_mark[1] >= 3:
                # the next three steps, averaged over ranks so that every rank decides the same length
                per_step = D.all_reduce_sum(torch.tensor([(time.perf_counter() - budget_mark[0]) / (p.step - budget_mark[1])],
                                                         dtype=torch.float64), info) / max(info.world_size, 1)
                p.total_steps = min(p.total_steps, max(p.step, tcfg.min_steps or 0,
                                                       int(tcfg.time_budget_s / float(per_step[0]))))
                p.budget_fixed = True
                if info.is_main:
                    record.update(schedule={"total_steps": p.total_steps})
                metrics.set_total(p.total_steps)
            metrics.add_step(loss, stats, grad_norm, time.perf_counter() - t0)
            epoch_pos = loader.epoch + loader.step_in_epoch / steps_per_epoch
            do_eval = tcfg.eval_interval and p.step % tcfg.eval_interval == 0
            row = None
            if metrics.due(p.step) or do_eval:
                row = last_metrics = metrics.read(lr, epoch_pos)
                if do_eval:
                    tau = evaluate()
                    if tau is not None:
                        last_metrics["heldout_tau"] = tau
                metrics.write(p.step, last_metrics)
            metrics.tick(row)
            epoch_end = loader.epoch_done
            saved = False
            if epoch_end and p.step < p.total_steps:
                checkpoint(f"step-{p.step}", dict(last_metrics), epoch_end=True)
                saved = True
            elif not epoch_end and p.step < p.total_steps and tcfg.save_every and p.step % tcfg.save_every == 0:
                checkpoint(f"step-{p.step}", dict(last_metrics), epoch_end=False)
                saved = True
            if stop_at is not None and stop_at <= p.step < p.total_steps:
                if not saved:
                    checkpoint(f"step-{p.step}", dict(last_metrics), epoch_end=epoch_end)
                stopped_early = True
                break
        if stopped_early:
            break
        if loader.epoch_done:
            loader.next_epoch()
    metrics.close()

    if stopped_early:
        return S.latest_checkpoint(out_dir)
    epoch_end = loader.step_in_epoch == 0 or loader.epoch_done
    if loader.step_in_epoch == 0 and loader.epoch > 0:
        loader.epoch, loader.step_in_epoch = loader.epoch - 1, steps_per_epoch
    result = checkpoint("final", dict(last_metrics), epoch_end=epoch_end)
    if info.is_main:
        changes = {"status": "finished", "finished": now_iso(), "best_checkpoint": str(S.best_checkpoint(out_dir))}
        if cache is not None:
            changes["feature_cache"] = {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses}
        record.update(**changes)
        db = db or recipe.registry.db
        if db:
            try:
                from dflash_lab.registry import register_run
            except ImportError:
                warn("[train] dflash_lab.registry is not available; run not registered")
            else:
                register_run(out_dir, db=db)
    D.barrier(info)
    return result
