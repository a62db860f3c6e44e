"""The math of one optimizer step, shared by the trainer, `plan` and the benchmarks.

    FeatureSource          the frozen target's features (online, or through the feature cache)
    build_micro_blocks     a micro-batch's anchors and blocks (CPU, a pure function of data and seeds)
    forward_batch          one micro-batch: blocks -> draft -> vocabulary stage -> its loss share and
                           statistics (device tensors, no sync)
    accumulate_gradients   every micro-batch of this rank for one optimizer step, with the global
                           token-level denominators
    heldout_tau            simulated tau on the held-out split, over all ranks

Nothing here holds run state: the trainer's components (`components.py`, `loader.py`) do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from dflash_lab.train import blocks as B
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train import selector_loss as SL
from dflash_lab.train.data import FeatureCache, Sample
from dflash_lab.train.objectives import Denominators, SelectorTerm, SlotStats, empty_denominators
from dflash_lab.train.sampler import mix_seed as _mix_seed

__all__ = ["FeatureSource", "StepConfig", "build_micro_blocks", "forward_batch", "run_micro_batch",
           "accumulate_gradients", "heldout_metrics"]


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
    return loss_cfg.objective.needs_model_denominators() or (
        _is_dflash2(draft_module) and SelectorTerm(loss_cfg).needs_model_denominators())


def _shared_top_k(draft_module) -> int:
    """The selector's candidate count when the base loss's logits can give its candidates (0: not a
    DFlash2 draft, or one whose unary logits are not the plain lm_head logits: a multiplier or a
    softcap changes the masses, a negative multiplier the order)."""
    if not _is_dflash2(draft_module):
        return 0
    cfg = _unwrap(draft_module).config
    return 0 if cfg.output_multiplier is not None or cfg.final_logit_softcapping else cfg.selector_top_k


def _selector(draft_module, batch, valid, h_sel, labels, target, loss_cfg, chunk_slots, t_rows, t_index, top=None):
    """DFlash2's selector CE (numerator only: the caller divides by the step's denominator) and its
    metrics; None for a v1 draft. Held-out (`loss_cfg` None) and selector_alpha 0: metrics only.
    `top`: the candidates from the base loss's logits (`vocab_stage.TopCandidates`), else the
    selector takes its own pass over the vocabulary."""
    if not _is_dflash2(draft_module):
        return None
    pred = SL.teacher_forced_predecessors(batch["block_ids"], batch["labels"])[valid]
    gamma = loss_cfg.gamma if loss_cfg is not None else None
    gold = loss_cfg.selector_gold if loss_cfg is not None else "replace"
    grad = loss_cfg is not None and loss_cfg.selector_alpha > 0
    if not grad:  # a view made under no_grad keeps requires_grad with no grad_fn: autograd hooks fail on it
        h_sel = h_sel.detach()
    with contextlib.nullcontext() if grad else torch.no_grad():
        given = {} if top is None else {"candidate_ids": top.ids, "candidate_mass": top.draft_mass,
                                        "candidate_target_mass": top.target_mass}
        return SL.selector_loss(_unwrap(draft_module), h_sel, target.lm_head, labels, pred, SL.slot_weights(valid, gamma),
                                gold, chunk_slots=chunk_slots, denominator=1.0, target_hidden=t_rows,
                                target_index=t_index, **given)


@dataclass(frozen=True)
class StepConfig:
    """The settings of every forward of a run, fixed for the run (`Trainer._build_step`)."""

    num_anchors: int
    loss_cfg: L.LossConfig | None = None
    """None: held-out scoring only (no loss, no teacher logits)."""
    attention: str = "auto"
    anchor_chunk: int = 64
    chunk_slots: int = 1024
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    max_slot: int | None = None
    """Score only block slots 1..max_slot (None: all)."""

    @classmethod
    def of(cls, fwd: "StepConfig | dict") -> "StepConfig":
        """A StepConfig, or one from the keyword dict earlier callers pass (`fwd`)."""
        return fwd if isinstance(fwd, StepConfig) else cls(**fwd)

    def but(self, **changes) -> "StepConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class MicroSlots:
    """A micro-batch after the vocabulary stage: per-slot statistics [N*A, B] (zeros where invalid),
    the valid mask [N*A, B] and DFlash2's selector output (None for a v1 draft)."""

    ce: torch.Tensor
    kl: torch.Tensor
    overlap: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    selector: object | None

    def stats(self) -> SlotStats:
        return SlotStats(ce=self.ce, kl=self.kl, overlap=self.overlap, valid=self.valid)


def forward_batch(draft_module, draft_cfg, target, features, samples, anchor_seeds, *, num_anchors, loss_cfg,
                  attention="auto", anchor_chunk=64, chunk_slots=1024, device=torch.device("cpu"),
                  autocast_dtype=None, max_slot=None, blocks=None, denominators=None, model_denominators=None,
                  reduce=None):
    """This micro-batch's share of the step's loss, and its statistics (device tensors, no sync):
    `run_micro_batch` with the step's settings as keywords (plan, bench scripts, tests)."""
    step = StepConfig(num_anchors=num_anchors, loss_cfg=loss_cfg, attention=attention, anchor_chunk=anchor_chunk,
                      chunk_slots=chunk_slots, device=device, autocast_dtype=autocast_dtype, max_slot=max_slot)
    return run_micro_batch(step, draft_module, draft_cfg, target, features, samples, anchor_seeds, blocks=blocks,
                           denominators=denominators, model_denominators=model_denominators, reduce=reduce)


def run_micro_batch(step: StepConfig, draft_module, draft_cfg, target, features, samples, anchor_seeds, *,
                    blocks=None, denominators=None, model_denominators=None, reduce=None):
    """This micro-batch's share of the step's loss, and its statistics (device tensors, no sync).

    `denominators` [len(DENOMINATORS)]: the step's model-independent sums, all-reduced; None = this
    micro-batch's own (the loss is then its token-level mean). `model_denominators`: the step's
    draft-dependent sums (survival-eal, dpace, DFlash2 `exclude`) from a pre-pass; None = computed
    here and passed through `reduce` (an all-reduce over ranks, or None for this batch alone).
    `blocks`: `build_micro_blocks` of these samples (built here when None)."""
    if blocks is None:
        blocks = build_micro_blocks(samples, anchor_seeds, num_anchors=step.num_anchors, block_size=draft_cfg.block_size,
                                    mask_token_id=draft_cfg.mask_token_id, max_slot=step.max_slot)
    batch = {k: v.to(step.device) for k, v in blocks.items()}
    autocast = (torch.autocast(step.device.type, dtype=step.autocast_dtype) if step.autocast_dtype
                else contextlib.nullcontext())
    with autocast:
        h_sel = _draft_hidden(step, draft_module, target, features, batch)
        slots = _vocab_stage(step, draft_module, target, features, batch, h_sel)
    loss, local_model = _micro_loss(step, draft_module, slots, denominators, model_denominators, reduce)
    return loss, _statistics(slots, local_model)


def _draft_hidden(step: StepConfig, draft_module, target, features, batch) -> torch.Tensor:
    """The draft's last hidden states of the scored slots [M, H]: every block of every sequence in one
    forward, only the scored slots through the last layer's query/MLP (and the lm_head after)."""
    n, a = batch["anchors"].shape
    bsz = batch["block_ids"].shape[-1]
    ctx = B.pad_sequences([f for f, _ in features])  # [N, S, n*H]
    ctx_pos = torch.arange(ctx.shape[1], device=step.device)[None].expand(n, ctx.shape[1])
    with torch.no_grad():
        # fp32 like the draft's master weights: RoPE and norms in fp32, autocast runs the linears in bf16
        noise = target.embed(batch["block_ids"].view(n, a * bsz)).float()
    attn = B.make_attention(step.attention, batch["anchors"], bsz, step.anchor_chunk)
    return draft_module(noise, batch["positions"].view(n, a * bsz), ctx, ctx_pos, attention=attn,
                        output_slots=batch["valid"].view(n, a * bsz))


def _teacher_rows(step: StepConfig, features, batch, dtype):
    """(the target's final hidden states [N*S, H], the row each scored slot reads [M]) when the loss
    reads the target's distribution, else (None, None): slot k reads position p+k-1."""
    cfg = step.loss_cfg
    if cfg is None or not cfg.objective.needs_target_logits():
        return None, None
    valid = batch["valid"]
    n = valid.shape[0]
    final = B.pad_sequences([fin for _, fin in features])  # [N, S, H]
    seq_idx = torch.arange(n, device=step.device)[:, None, None].expand_as(valid)[valid]
    t_index = seq_idx * final.shape[1] + batch["positions"][valid] - 1
    return final.reshape(-1, final.shape[-1]).to(dtype), t_index


def _vocab_stage(step: StepConfig, draft_module, target, features, batch, h_sel) -> MicroSlots:
    """Per-slot ce, kl, overlap, correct through the frozen head (and DFlash2's selector on the same
    candidates), scattered back to [N*A, B]."""
    valid = batch["valid"]
    labels = batch["labels"][valid]
    t_rows, t_index = _teacher_rows(step, features, batch, h_sel.dtype)
    cfg = step.loss_cfg
    ce, kl, overlap, correct, *top = L.slot_statistics(
        h_sel, labels, target.lm_head, t_rows, step.chunk_slots, target_index=t_index,
        need_overlap=cfg is not None and cfg.objective.needs_overlap(), top_k=_shared_top_k(draft_module))
    sel = _selector(draft_module, batch, valid, h_sel, labels, target, cfg, step.chunk_slots, t_rows, t_index,
                    top[0] if top else None)
    n, a, bsz = valid.shape
    ce_b, kl_b, ov_b, cor_b = (L.scatter_slots(x, valid).view(n * a, bsz) for x in (ce, kl, overlap, correct))
    return MicroSlots(ce=ce_b, kl=kl_b, overlap=ov_b, correct=cor_b, valid=valid.view(n * a, bsz), selector=sel)


def _micro_loss(step: StepConfig, draft_module, slots: MicroSlots, denominators, model_denominators, reduce):
    """(this micro-batch's share of the loss or None, its draft-dependent denominators [len(DENOMINATORS)]).
    The objective's share, plus DFlash2's selector term; each divides by the step's global sums."""
    device = slots.ce.device
    local_model = empty_denominators(device)
    if step.loss_cfg is None:
        return None, local_model
    objective, stats = step.loss_cfg.objective, slots.stats()
    selector = SelectorTerm(step.loss_cfg) if slots.selector is not None else None
    dens = objective.static_denominators(slots.valid) if denominators is None else denominators.to(device)
    if _needs_model_denominators(step.loss_cfg, draft_module):
        if objective.needs_model_denominators():
            local_model = objective.model_denominators(stats)
        if selector is not None:
            local_model = local_model + selector.model_denominators(slots.selector)
        if model_denominators is None:
            model_denominators = reduce(local_model.clone()) if reduce is not None else local_model
        dens = dens + model_denominators.to(device)
    loss = objective.combine(stats, Denominators(dens))
    if selector is not None and selector.trains:  # token-level: / the step's sum(w*valid) or sum(w*included)
        loss = loss + selector.combine(slots.selector, Denominators(dens))
    return loss, local_model


@torch.no_grad()
def _statistics(slots: MicroSlots, local_model) -> dict[str, torch.Tensor]:
    """What the metrics read (sums over this micro-batch, float64 device tensors)."""
    flat_valid = slots.valid
    has = flat_valid.any(dim=1)
    taus = L.simulated_tau(slots.correct, flat_valid)[has]
    vd = flat_valid.double()
    stats = {
        "correct_per_slot": (slots.correct.double() * vd).sum(dim=0), "valid_per_slot": vd.sum(dim=0),
        "tau_sum": taus.double().sum(), "blocks": has.double().sum(),
        "kl_sum": (slots.kl.double() * vd).sum(), "ce_sum": (slots.ce.double() * vd).sum(),
        "block_tokens": torch.tensor(float(flat_valid.numel()), dtype=torch.float64, device=flat_valid.device),
        "valid_slots": vd.sum(), "model_denominators": local_model,
    }
    if slots.selector is not None:
        stats.update(SL.selector_stats(slots.selector, flat_valid))
    return stats


# -- one optimizer step ---------------------------------------------------------------------------
def accumulate_gradients(model, draft, draft_cfg, target, features, micro_batches, fwd: StepConfig | dict,
                         info: D.DistInfo, max_slot=None):
    """Forward and backward of every micro-batch of this rank for one optimizer step; the draft's
    .grad then holds the gradient of the step's loss (DDP averages over ranks, hence x world).

    The model-independent denominators of the token-level loss are summed over the micro-batches
    and all-reduced first. When the loss also divides by a draft-dependent sum (survival-eal,
    dpace, DFlash2 `exclude`), that sum is exact as well: with one micro-batch per rank it is
    all-reduced inside the forward, before backward; with accumulation a no-grad pre-pass over the
    micro-batches computes it first (about one extra draft forward; the target features it fetched
    are kept for the main pass, so the target runs once). `fwd`: the run's StepConfig (or its
    keywords); `max_slot` overrides its max_slot. Returns (this rank's share of the loss,
    statistics), device tensors."""
    step = StepConfig.of(fwd)
    if max_slot is not None:
        step = step.but(max_slot=max_slot)
    blocks = [build_micro_blocks(mb.samples, mb.anchor_seeds, num_anchors=step.num_anchors,
                                 block_size=draft_cfg.block_size, mask_token_id=draft_cfg.mask_token_id,
                                 max_slot=step.max_slot) for mb in micro_batches]
    objective = step.loss_cfg.objective
    static = D.all_reduce_sum(sum(objective.static_denominators(b["valid"].flatten(0, 1)) for b in blocks), info)
    kept = [None] * len(micro_batches)  # the pre-pass's target features, reused by the main pass
    model_dens, reduce = None, None
    if _needs_model_denominators(step.loss_cfg, draft):
        if len(micro_batches) == 1:
            reduce = lambda t: D.all_reduce_sum(t, info)  # noqa: E731
        else:
            model_dens = _model_denominators_pre_pass(step, draft, draft_cfg, target, features, micro_batches,
                                                      blocks, static, kept, info)
    loss_total, agg = None, None
    for i, (mb, blk) in enumerate(zip(micro_batches, blocks)):
        feats = kept[i] if kept[i] is not None else features.get(mb.samples)
        kept[i] = None
        sync = contextlib.nullcontext() if (i == len(micro_batches) - 1 or not info.enabled) else model.no_sync()
        with sync:
            loss, st = run_micro_batch(step, model, draft_cfg, target, feats, mb.samples, mb.anchor_seeds, blocks=blk,
                                       denominators=static, model_denominators=model_dens, reduce=reduce)
            (loss * info.world_size).backward()
        loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        agg = st if agg is None else {k: agg[k] + st[k] for k in agg}
    return loss_total, agg


@torch.no_grad()
def _model_denominators_pre_pass(step, draft, draft_cfg, target, features, micro_batches, blocks, static, kept,
                                 info: D.DistInfo) -> torch.Tensor:
    """The step's draft-dependent denominators from a no-grad forward of every micro-batch, all-reduced;
    the target features it fetched are left in `kept` for the main pass."""
    local = None
    for i, (mb, blk) in enumerate(zip(micro_batches, blocks)):
        kept[i] = features.get(mb.samples)
        _, st = run_micro_batch(step, draft, draft_cfg, target, kept[i], mb.samples, mb.anchor_seeds, blocks=blk,
                                denominators=static, model_denominators=static * 0)
        local = st["model_denominators"] if local is None else local + st["model_denominators"]
    return D.all_reduce_sum(local, info)


@torch.no_grad()
def heldout_metrics(draft, draft_cfg, target, features, heldout, fwd: StepConfig | dict, info: D.DistInfo, seed: int,
                    lockstep: bool = False) -> dict[str, float]:
    """Simulated tau on the held-out split (fixed anchors, every slot scored, no teacher logits), over
    all ranks: `heldout_tau`, for a DFlash2 draft the tau of the selector's own greedy walk, with
    `heldout_unary_tau` beside it (the unary argmax alone: what the selector adds is the difference).
    Empty when the split is. `lockstep`: every rank runs the target equally often (FSDP gathers per layer)."""
    if len(heldout) == 0:
        return {}
    draft.eval()
    rounds = math.ceil(len(heldout) / info.world_size)
    step = StepConfig.of(fwd).but(loss_cfg=None, max_slot=None)
    sums = torch.zeros(3, dtype=torch.float64)  # walk tau, unary tau, blocks
    for r in range(rounds):
        j = r * info.world_size + info.rank
        if j >= len(heldout):
            if lockstep:
                features.get([heldout.sample(0)])
            continue
        s = heldout.sample(j)
        _, st = run_micro_batch(step, draft, draft_cfg, target, features.get([s]), [s], [_mix_seed(seed, 424242, j)])
        sums += torch.stack([st.get("sel_tau_sum", st["tau_sum"]), st["tau_sum"], st["blocks"]]).cpu()
    draft.train()
    walk, unary, blocks = D.all_reduce_sum(sums, info).tolist()
    if blocks == 0:
        return {}
    out = {"heldout_tau": walk / blocks}
    if _is_dflash2(draft):
        out["heldout_unary_tau"] = unary / blocks
    return out
