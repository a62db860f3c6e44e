"""One training micro-step of the trainer's own code on fake tensors (see the package docstring):
the real-indices dispatch mode, the flex stand-in, the frozen-aware MemTracker, and
`measure_step`, which returns the step's peak memory by kind and its FLOPs."""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass

import torch

from dflash_lab.plan.models import (_target_dtype, build_draft, build_target, synthetic_samples, target_config,
                                    target_flops_with_experts)
from dflash_lab.train.recipe import Recipe

# MemTracker's reference types -> the kinds the plan reports
KINDS = {"Parameter": "weights", "Buffer": "other", "Gradient": "gradients", "Optstate": "optimizer_state",
         "Activation": "activations", "Temp": "temporaries", "Other": "other"}
KIND_ORDER = ["weights", "gradients", "optimizer_state", "activations", "temporaries", "other"]



# -- fake-tensor machinery -------------------------------------------------------------------------
def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _real_index_list(indices):
    """Boolean masks among index tensors -> their real integer coordinates (what aten does itself)."""
    out = []
    for idx in indices:
        if isinstance(idx, torch.Tensor) and not _is_fake(idx) and idx.dtype in (torch.bool, torch.uint8):
            out.extend(idx.nonzero().unbind(1))
        else:
            out.append(idx)
    return out


_INDEX_OPS = None


def _index_ops():
    global _INDEX_OPS
    if _INDEX_OPS is None:
        aten = torch.ops.aten
        _INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                      aten._index_put_impl_.default, aten._unsafe_index_put.default}
    return _INDEX_OPS


def _real_indices_mode():
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class _RealIndices(TorchDispatchMode):
        """See the module docstring: real batch building under fake tensors."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            leaves = pytree.arg_tree_leaves(*args, **kwargs)
            if not any(_is_fake(t) for t in leaves):
                with unset_fake_temporarily():
                    return func(*args, **kwargs)
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                return False if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
            if func in _index_ops() and len(args) > 1:
                with unset_fake_temporarily():
                    indices = _real_index_list(args[1])
                args = (args[0], indices, *args[2:])
            return func(*args, **kwargs)

    return _RealIndices()


class FlopTally:
    """FLOPs that FlopCounterMode cannot see (the flex stand-in's attention)."""

    def __init__(self):
        self.flops = 0


def visible_attention_pairs(anchor_pos: torch.Tensor, block_size: int, window: int | None) -> int:
    """(query, key) pairs per head the training mask keeps: slot k of anchor p sees its B own keys
    and the context keys j < p with p + k - j < W (blocks rule 4), i.e. min(p, W - 1 - k) of them."""
    if not anchor_pos.numel():
        return 0
    slots = torch.arange(block_size, device=anchor_pos.device)
    context = anchor_pos[..., None].expand(*anchor_pos.shape, block_size)
    if window is not None:
        context = context.clamp(max=window - 1 - slots)
    return int((context + block_size).sum())


def _flex_stand_in(tally: FlopTally):
    class _FlexStandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, pairs):
            out = torch.zeros_like(q)
            lse = q.new_zeros(q.shape[:3], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            tally.flops += 4 * q.shape[-1] * pairs  # QK^T and PV over the visible pairs (all heads)
            ctx.pairs = pairs
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, _out, _lse = ctx.saved_tensors
            tally.flops += 10 * q.shape[-1] * ctx.pairs  # scores recomputed, dP, dV, dQ, dK
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    def attention_for(anchor_pos: torch.Tensor, block_size: int):
        pos = anchor_pos.detach()

        def attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, window=None):
            # as FlexBlockAttention: q, k, v in v's dtype, keys = [context ; blocks ; zeros to a
            # multiple of the 128-key block] (tests/unit/test_plan.py compares what both keep)
            from dflash_lab.train import blocks as B

            dt = v_ctx.dtype
            keys = k_ctx.shape[2] + k_blk.shape[2]
            zeros = k_blk.new_zeros(*k_blk.shape[:2], B._ceil_to(keys, B.FLEX_BLOCK) - keys, k_blk.shape[3])
            k = torch.cat([k_ctx, k_blk, zeros], dim=2).to(dt)
            v = torch.cat([v_ctx, v_blk, zeros.to(v_blk.dtype)], dim=2).to(dt)
            out = _FlexStandIn.apply(q.to(dt), k, v, visible_attention_pairs(pos, block_size, window) * q.shape[1])
            return out.to(q.dtype)

        return attention

    return attention_for


@contextlib.contextmanager
def _flex_replaced(tally: FlopTally):
    """`blocks.make_attention` with the flex path replaced by the stand-in (chunked stays real)."""
    from dflash_lab.train import blocks as B

    original = B.make_attention
    stand_in = _flex_stand_in(tally)

    def make_attention(kind, anchor_pos, block_size, *args, **kwargs):
        if kind in ("auto", "flex"):
            return stand_in(anchor_pos, block_size)
        return original(kind, anchor_pos, block_size, *args, **kwargs)

    B.make_attention = make_attention
    try:
        yield
    finally:
        B.make_attention = original


def _total_key():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    return _TOTAL_KEY


def _tracker_class(base):
    class FrozenAwareMemTracker(base):
        """MemTracker hooks every parameter of a module it sees run for gradients, which a frozen
        parameter (the target's) refuses; frozen modules are tracked without the hooks."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            if install_grad_hooks and not all(p.requires_grad for p in module.parameters()):
                install_grad_hooks = False
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            # only the global peak is reported: skip the per-module peaks (a walk over every module
            # on every op, most of a Qwen3-4B-shaped step's planning time)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_total_key()]:
                    self._peak_mem[dev] = dev_snap[_total_key()]
                    self._peak_mem_snap[dev] = dict(dev_snap)

        def _pre_fw_hook(self, module, inputs):
            # The step calls a module at top level more than once (the target's embedding: in the target's
            # forward and for the draft's block input), which MemTracker takes for a second iteration.
            # Only the global peak is reported, so a repeated forward starts the module's stats afresh.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

    return FrozenAwareMemTracker


# -- one measured step -----------------------------------------------------------------------------
@dataclass
class StepMeasure:
    micro_batch: int
    activation_checkpointing: bool
    peak_bytes: int
    peak_by_kind: dict[str, int]
    flops_target: int  # the target's forward over the micro-batch
    flops_draft: int  # the draft's forward + backward, the loss stage, the optimizer
    fake: bool
    wall_s: float


def _forward_kwargs(recipe: Recipe, attention: str, autocast_dtype):
    from dflash_lab.train import losses as L
    from dflash_lab.train.step import forward_batch

    lc = recipe.loss
    # every loss setting the trainer passes (D-PACE's and DFlash2's selector term change the step too)
    loss_cfg = L.LossConfig(name=lc.name, alpha=lc.alpha, gamma=lc.gamma, eal_mode=lc.eal_mode, kl_weight=lc.kl_weight,
                            dpace_alpha=lc.dpace_alpha, normalize=lc.normalize, selector_alpha=lc.selector_alpha,
                            selector_gold=lc.selector_gold)
    wanted = dict(num_anchors=recipe.data.num_anchors, loss_cfg=loss_cfg, attention=attention,
                  anchor_chunk=recipe.train.anchor_chunk, chunk_slots=lc.chunk_slots, device=torch.device("cpu"),
                  autocast_dtype=autocast_dtype, max_slot=lc.max_slot)
    accepted = inspect.signature(forward_batch).parameters
    return forward_batch, {k: v for k, v in wanted.items() if k in accepted}


def target_features(target, layer_ids: list[int], samples):
    """The batched GPU path of `trainer.FeatureSource._run`: one right-padded no-grad forward over
    the micro-batch, features [S, n*H] and final hidden states [S, H] per sample."""
    from dflash_lab.train import blocks as B

    with torch.no_grad():
        ids = B.pad_sequences([torch.tensor(s.input_ids) for s in samples])
        out = target.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        feats = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)
        final = out.hidden_states[-1]
        del out
        return [(feats[j, : len(s.input_ids)], final[j, : len(s.input_ids)]) for j, s in enumerate(samples)]


def measure_step(recipe: Recipe, micro_batch: int, *, fake: bool = True, activation_checkpointing: bool | None = None,
                 grads_present: bool = False, attention: str | None = None, target_cfg=None,
                 prompt_tokens: int = 256) -> StepMeasure:
    """Peak memory by kind and FLOPs of one training micro-step of `recipe` at `micro_batch`.

    fake=False runs the same step for real on CPU (tiny models: the honesty check of the fake one).
    `grads_present`: gradients already exist (a later micro-step of gradient accumulation)."""
    if activation_checkpointing is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.train.activation_checkpointing = activation_checkpointing
    cfg = target_cfg if target_cfg is not None else target_config(recipe.target.name)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        parts = _step_parts(recipe, cfg, _target_dtype(recipe.target.dtype), fake, grads_present)
        samples = synthetic_samples(micro_batch, recipe.data.max_length, prompt_tokens,
                                    int(cfg.get_text_config().vocab_size), seed=recipe.train.seed)
        snapshot, target_flops, draft_flops = _tracked_step(recipe, parts, samples, fake,
                                                            attention or recipe.train.attention)
    target, draft = parts[0], parts[1]
    peak_by_kind, total = _peak_by_kind(snapshot)
    tokens = micro_batch * max(len(x.input_ids) for x in samples)
    return StepMeasure(micro_batch=micro_batch, activation_checkpointing=draft.activation_checkpointing,
                       peak_bytes=total, peak_by_kind=peak_by_kind,
                       flops_target=target_flops_with_experts(target.model, target_flops, tokens),
                       flops_draft=draft_flops, fake=fake, wall_s=time.perf_counter() - t0)


def _tracked_step(recipe: Recipe, parts, samples, fake: bool, attention: str):
    """The micro-step itself (target features, the trainer's forward_batch, backward, clipping,
    AdamW) under MemTracker and two FLOP counters: (peak snapshot, the target's FlopCounterMode,
    the draft's FLOPs with the flex stand-in's)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    from dflash_lab.train import losses as L

    target, draft, params, optimizer = parts
    t = recipe.train
    use_bf16 = t.bf16 if t.bf16 is not None else True  # planned for a GPU
    forward_batch, fwd = _forward_kwargs(recipe, attention, torch.bfloat16 if use_bf16 else None)
    seeds = [1000 + i for i in range(len(samples))]
    tally = FlopTally()
    tracker = _tracker_class(MemTracker)()
    tracker.track_external(target.model, draft, optimizer)
    target_flops, draft_flops = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with tracker, _flex_replaced(tally):
        with target_flops, _real_indices(fake):
            feats = target_features(target, draft.config.target_layer_ids, samples)
        if not L.needs_target_logits(recipe.loss.name):
            feats = [(f, fin) for f, fin in feats]  # kept: the trainer's FeatureSource keeps both too
        with draft_flops, _real_indices(fake):
            loss_sum, _stats = forward_batch(draft, draft.config, target, feats, samples, seeds, **fwd)
            (loss_sum * (1.0 / len(samples))).backward()
            torch.nn.utils.clip_grad_norm_(params, t.clip if t.clip else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.get_tracker_snapshot("peak"), target_flops, int(draft_flops.get_total_flops()) + tally.flops


def _real_indices(fake: bool):
    return _real_indices_mode() if fake else contextlib.nullcontext()


def _step_parts(recipe: Recipe, cfg, tdtype, fake: bool, grads_present: bool):
    """(target, draft, its trainable parameters, AdamW with its state already made) for one step."""
    target = build_target(cfg, tdtype, recipe.target.name, fake)
    target.model.requires_grad_(False)
    draft = build_draft(recipe, target, fake)
    params = [p for p in draft.parameters() if p.requires_grad]
    t = recipe.train
    # foreach: the CUDA default (on CPU torch picks the per-tensor loop, which needs fewer temporaries)
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, foreach=True)
    for p in params:  # AdamW's state exists from the first step on: make it before measuring
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not grads_present)
    return target, draft, params, optimizer


def _peak_by_kind(snapshot) -> tuple[dict[str, int], int]:
    """MemTracker's peak snapshot -> (bytes by kind of KIND_ORDER, total bytes)."""
    peak_by_kind = {k: 0 for k in KIND_ORDER}
    total = 0
    for _dev, snap in snapshot.items():
        for key, value in snap.items():
            name = getattr(key, "value", str(key))
            if name in KINDS:
                peak_by_kind[KINDS[name]] += int(value)
            elif "Total" in name:
                total += int(value)
    return peak_by_kind, total or sum(peak_by_kind.values())
