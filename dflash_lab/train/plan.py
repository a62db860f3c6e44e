"""`dflash-lab plan`: the memory and cost of a recipe's training step, worked out without a GPU.

    dflash-lab plan --config recipes/qwen3-4b/m1.yaml --gpus 8 --gpu-memory 80GB

The recipe's target and draft are built with fake tensors (`FakeTensorMode`: shapes and dtypes,
no storage), and ONE training micro-step of the trainer's own code runs on them: the target's
batched forward (the GPU path of `FeatureSource`), `trainer.forward_batch` (anchors, blocks, the
draft, the loss stage), backward, gradient clipping and the AdamW step. `MemTracker` records the
peak by kind (weights, gradients, optimizer state, activations, temporaries) and `FlopCounterMode`
counts the FLOPs. Sequences are at `data.max_length` (the worst case a batch can hold).

Three things make the trainer's code run on fake tensors (SPEC section 9):
- Batch building is data-dependent (anchor sampling, boolean masks over valid slots). `_RealIndices`
  runs every op whose inputs are all real for real (token ids, anchors, labels, masks: small), turns a
  real boolean mask that indexes a fake tensor into real integer indices, and reads 1 for a scalar of
  a fake tensor (the logged statistics, AdamW's step count).
- Flex attention does not run under fake tensors on this build: `_FlexStandIn` allocates what flex
  keeps for backward (its bf16 q, k, v, the output and the [N, H, Q] logsumexp) and counts the FLOPs
  of the visible (query, key) pairs.
- Fake CUDA tensors fail on small factory calls, so everything is fake CPU with CPU autocast (bf16).
  CUDA's autocast casts a few ops differently from CPU's; the plan says so beside its figures.

Not in the tracked step, added by arithmetic: DDP's gradient buckets (one fp32 copy of the draft's
gradients when --gpus > 1) and, with `target.fsdp`, the sharding of the target's decoder layers.
Not counted at all: the CUDA context and the caching allocator's fragmentation (keep a margin; the
qwen3-4b recipes are sized to at most 72 GB of an 80 GB GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.target import check_recipe_target
from dflash_lab.train.recipe import Recipe, resolve_batch

GIB = 1024**3
GB = 1000**3

# Config shapes of the hub targets the shipped recipes use (no network is needed to plan for them).
KNOWN_TARGETS: dict[str, dict] = {
    "Qwen/Qwen3-4B": dict(
        model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
    ),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=False, rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
    ),
    # Qwen3.5-4B's text model (the checkpoint is Qwen3_5ForConditionalGeneration): 3 Gated DeltaNet
    # layers to 1 gated full-attention layer. Its config.json `text_config` as published: 16 query / 4
    # KV heads of 256, 32 layers, hidden 2560, MLP 9216, vocabulary 248320, tied, RoPE 1e7 on a quarter
    # of each head, DeltaNet 16 key / 32 value heads of 128 with a 4-tap conv (checked 2026-12-08
    # against three public copies of it; the same DeltaNet heads as Qwen3-Next and Qwen3.5-9B).
    "Qwen/Qwen3.5-4B": dict(
        model_type="qwen3_5_text", hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, vocab_size=248320,
        tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(32)],
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
    ),
}
KNOWN_MASK_TOKEN = {"Qwen/Qwen3-4B": 151669, "Qwen/Qwen3-8B": 151669}

# MemTracker's reference types -> the kinds the plan reports
KINDS = {"Parameter": "weights", "Buffer": "other", "Gradient": "gradients", "Optstate": "optimizer_state",
         "Activation": "activations", "Temp": "temporaries", "Other": "other"}
KIND_ORDER = ["weights", "gradients", "optimizer_state", "activations", "temporaries", "other"]


# -- inputs ----------------------------------------------------------------------------------------
def parse_memory(text: str | int | float) -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2**30, a bare number is GB (as GPUs are sold)."""
    if isinstance(text, (int, float)):
        return int(text * GB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|tb)?\s*", str(text).lower())
    if not m:
        raise DFlashLabError(f"--gpu-memory {text!r}: expected a size like 80GB, 141GB or 80GiB")
    value, unit = float(m.group(1)), m.group(2) or "gb"
    scale = {"gib": GIB, "gb": GB, "g": GB, "mib": 1024**2, "mb": 1000**2, "tb": 1000**4}[unit]
    return int(value * scale)


def target_config(name: str):
    """The transformers config of a recipe's target, without loading weights: the built-in table
    for known hub ids, config.json for a local directory, the embedded target's cached directory."""
    from transformers import AutoConfig

    if name in KNOWN_TARGETS:
        raw = dict(KNOWN_TARGETS[name])
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    path = Path(name).expanduser()
    from dflash_lab.models import embedded

    if name in embedded.EMBEDDED_TARGETS:
        path = embedded.cache_root() / "models" / name
        if not (path / "config.json").is_file():
            raise DFlashLabError(f"target {name}: not fetched yet; run `dflash-lab models fetch {name}` first")
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path))
    known = ", ".join(KNOWN_TARGETS)
    raise DFlashLabError(f"target {name}: plan needs its config; use a local Hugging Face directory with a "
                         f"config.json or one of the built-in hub ids ({known})")


# -- the models ------------------------------------------------------------------------------------
def build_target(config, dtype: torch.dtype, name: str, fake: bool):
    """A TargetModel from a config. Fake: built on meta, then storage-less fake CPU tensors."""
    from transformers import AutoModelForCausalLM

    from dflash_lab.models.target import wrap_target

    # under FakeTensorMode the initialisation only computes shapes (fake CPU tensors, no storage);
    # a multimodal checkpoint's config plans its text model, the part training runs (load_target)
    model = AutoModelForCausalLM.from_config(config.get_text_config(), dtype=dtype)
    mask = KNOWN_MASK_TOKEN.get(name)
    if mask is None or mask >= int(config.get_text_config().vocab_size):  # no tokenizer here: the last row stands in
        mask = int(config.get_text_config().vocab_size) - 1
    return wrap_target(model, name=name, mask_token_id=mask)


def build_draft(recipe: Recipe, target, fake: bool):
    from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    d = recipe.draft
    dflash2 = d.arch == "dflash2"  # the conv in every layer and the selector: their memory and FLOPs count too
    cfg = (build_dflash2_config if dflash2 else build_draft_config)(
        target, num_layers=d.num_layers, block_size=d.block_size, mask_token_id=d.mask_token_id,
        target_layer_ids=d.target_layer_ids, intermediate_size=d.intermediate_size, rope_theta=d.rope_theta,
        sliding_window=d.sliding_window, layer_types=d.layer_types)
    draft = (DFlash2DraftModel if dflash2 else DFlashDraftModel)(cfg)  # fake: shapes only
    if dflash2 and recipe.loss.selector_alpha == 0:
        draft.candidate_selector.requires_grad_(False)  # as the trainer: no gradient, no optimizer state
    if not fake:
        draft.init_weights(recipe.train.seed)
    draft.train()  # fp32 master weights, as the trainer keeps them (nn.Linear's default dtype)
    draft.activation_checkpointing = bool(getattr(recipe.train, "activation_checkpointing", False))
    return draft


def synthetic_samples(count: int, length: int, prompt_tokens: int, vocab: int, seed: int = 0):
    """`count` sequences of exactly `length` tokens: a prompt, then a response that is supervised."""
    from dflash_lab.train.data import Sample

    rng = random.Random(seed)  # plain Python: this may run under FakeTensorMode
    prompt = min(prompt_tokens, max(1, length // 4))
    out = []
    for i in range(count):
        ids = [rng.randrange(min(vocab, 30000)) for _ in range(length)]
        out.append(Sample(id=f"plan-{i}", category="plan", input_ids=ids, loss_mask=[0] * prompt + [1] * (length - prompt)))
    return out


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
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    from dflash_lab.train import losses as L

    if activation_checkpointing is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.train.activation_checkpointing = activation_checkpointing
    cfg = target_cfg if target_cfg is not None else target_config(recipe.target.name)
    tdtype = _target_dtype(recipe.target.dtype)
    use_bf16 = recipe.train.bf16 if recipe.train.bf16 is not None else True  # planned for a GPU
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    attention = attention or recipe.train.attention
    t0 = time.perf_counter()
    tally = FlopTally()
    stack = contextlib.ExitStack()
    with stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        target, draft, params, optimizer = _step_parts(recipe, cfg, tdtype, fake, grads_present)
        t = recipe.train
        samples = synthetic_samples(micro_batch, recipe.data.max_length, prompt_tokens,
                                    int(cfg.get_text_config().vocab_size), seed=t.seed)
        forward_batch, fwd = _forward_kwargs(recipe, attention, autocast_dtype)
        layer_ids = draft.config.target_layer_ids
        seeds = [1000 + i for i in range(micro_batch)]
        tracker = _tracker_class(MemTracker)()
        tracker.track_external(target.model, draft, optimizer)
        target_flops = FlopCounterMode(display=False)
        draft_flops = FlopCounterMode(display=False)
        with tracker, _flex_replaced(tally):
            real_ints = _real_indices_mode() if fake else contextlib.nullcontext()
            with target_flops, real_ints:
                feats = target_features(target, layer_ids, samples)
            if not L.needs_target_logits(recipe.loss.name):
                feats = [(f, fin) for f, fin in feats]  # kept: the trainer's FeatureSource keeps both too
            with draft_flops, (_real_indices_mode() if fake else contextlib.nullcontext()):
                loss_sum, _stats = forward_batch(draft, draft.config, target, feats, samples, seeds, **fwd)
                (loss_sum * (1.0 / micro_batch)).backward()
                torch.nn.utils.clip_grad_norm_(params, t.clip if t.clip else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        snapshot = tracker.get_tracker_snapshot("peak")
    peak_by_kind, total = _peak_by_kind(snapshot)
    return StepMeasure(micro_batch=micro_batch, activation_checkpointing=draft.activation_checkpointing,
                       peak_bytes=total, peak_by_kind=peak_by_kind,
                       flops_target=target_flops_with_experts(target.model, target_flops,
                                                              micro_batch * max(len(x.input_ids) for x in samples)),
                       flops_draft=int(draft_flops.get_total_flops()) + tally.flops,
                       fake=fake, wall_s=time.perf_counter() - t0)


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


# -- MoE and hybrid targets (issue 22) ----------------------------------------------------------------
def _expert_blocks(model) -> list:
    """The routed-experts modules of a MoE target (Qwen3-MoE, Qwen3-Next, gpt-oss: `mlp.experts`,
    their weights stacked [num_experts, ...]). Shared experts are plain MLPs and count as such."""
    return [(name, module) for name, module in model.named_modules() if name.split(".")[-1] == "experts"]


def target_flops_with_experts(model, counter, tokens: int) -> int:
    """The target forward's FLOPs with its routed experts counted as they run: each token through
    `num_experts_per_tok` experts (2 FLOPs per weight of one expert). The FLOP counter cannot see
    them (the fused expert kernels are not among its ops, and under fake tensors the routing has no
    data), while the memory plan holds every expert's weights as it should."""
    total = int(counter.get_total_flops())
    blocks = _expert_blocks(model)
    if not blocks:
        return total
    top_k = int(getattr(model.config.get_text_config(), "num_experts_per_tok", 0) or 0)
    counted = counter.get_flop_counts()
    for name, module in blocks:
        total -= sum(sum(ops.values()) for key, ops in counted.items() if key.endswith("." + name))
        params = [p for p in module.parameters()]
        experts = int(params[0].shape[0]) if params else 0
        if experts and top_k:
            total += 2 * tokens * top_k * sum(p.numel() for p in params) // experts
    return total


def target_layer_kinds(cfg) -> dict:
    """What the plan says about the target's layers: their kinds, and for MoE targets the expert
    counts (memory holds all experts, FLOPs the active ones)."""
    text = cfg.get_text_config()
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * int(text.num_hidden_layers))
    out = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    if experts:
        out["experts"] = {"total": int(experts), "active_per_token": int(getattr(text, "num_experts_per_tok", 0) or 0)}
    return out


def _target_dtype(name: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16  # auto = bf16 on a GPU
    from dflash_lab.models.target import _pick_dtype

    return _pick_dtype(name, "cuda")


# -- the plan --------------------------------------------------------------------------------------
@dataclass
class Plan:
    recipe: str
    target: str
    gpus: int
    gpu_memory_bytes: int
    memory_limit_bytes: int  # what a step may use: GPU memory less the margin
    micro_batch: int
    grad_accum: int
    global_batch: int
    sequence_length: int
    num_anchors: int
    block_size: int
    loss: str
    attention: str
    activation_checkpointing: bool
    peak_by_kind: dict[str, int]
    peak_bytes: int
    weights_split: dict[str, int]  # target / draft
    ddp_buckets_bytes: int
    fsdp_saving_bytes: int
    fits: bool
    largest_micro_batch: int | None  # searched up to one GPU's share of the global batch; None: not searched
    largest_micro_batch_dividing: int | None  # the largest that also divides the per-rank batch
    flops_target_per_micro: int
    flops_draft_per_micro: int
    flops_per_step_per_gpu: int
    flops_per_step_total: int
    mfu: float
    gpu_tflops: float
    step_time_s: float
    feature_cache: dict | None
    plan_seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _param_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _model_bytes(recipe: Recipe, cfg) -> dict[str, int]:
    """Parameter bytes of the target (whole, and one decoder layer) and the fp32 draft, from fake models."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        target = build_target(cfg, _target_dtype(recipe.target.dtype), recipe.target.name, True)
        draft = build_draft(recipe, target, True)
        body = getattr(target.model, "model", target.model)
        layers = list(getattr(body, "layers", []))
        return {"target": _param_bytes(target.model), "target_layer": _param_bytes(layers[0]) if layers else 0,
                "target_layers": sum(_param_bytes(x) for x in layers), "draft": _param_bytes(draft),
                "n_features": len(draft.config.target_layer_ids), "hidden": draft.config.hidden_size}


def _extras(recipe: Recipe, gpus: int, sizes: dict) -> tuple[int, int]:
    """(DDP gradient buckets, bytes FSDP saves on the target) per GPU: not in the one-process step."""
    ddp = sizes["draft"] if gpus > 1 else 0  # DDP keeps one fp32 bucket copy of the gradients
    fsdp = 0
    if recipe.target.fsdp and gpus > 1:
        # each rank keeps 1/gpus of the decoder layers; one layer is gathered and the next prefetched
        fsdp = int(sizes["target_layers"] * (1 - 1 / gpus)) - 2 * sizes["target_layer"]
        fsdp = max(fsdp, 0)
    return ddp, fsdp


def feature_cache_size(recipe: Recipe, sizes: dict) -> dict | None:
    """Bytes on disk per token and per full-length sample of `data.feature_cache` (features of the
    draft's target layers and the final hidden states, in `feature_cache_dtype`)."""
    if not recipe.data.feature_cache:
        return None
    item = torch.empty((), dtype=getattr(torch, recipe.data.feature_cache_dtype)).element_size()
    per_token = (sizes["n_features"] + 1) * sizes["hidden"] * item
    return {"dir": recipe.data.feature_cache, "dtype": recipe.data.feature_cache_dtype, "bytes_per_token": per_token,
            "bytes_per_max_length_sample": per_token * recipe.data.max_length,
            "bytes_per_billion_tokens": per_token * 10**9}


def make_plan(recipe: Recipe, *, gpus: int = 1, gpu_memory: int = 80 * GB, margin: float = 0.1, mfu: float = 0.4,
              gpu_tflops: float = 989.0, recipe_name: str = "<recipe>", search: bool = True,
              target_cfg=None) -> Plan:
    """Measure the recipe's micro-step (fake tensors), add what one process cannot see, and size it
    against `gpu_memory` less `margin` (CUDA context, allocator fragmentation)."""
    if gpus < 1:
        raise DFlashLabError(f"--gpus {gpus}: must be at least 1")
    if not 0 < mfu <= 1:
        raise DFlashLabError(f"--mfu {mfu}: must be in (0, 1]")
    t0 = time.perf_counter()
    micro, accum, global_batch = resolve_batch(recipe, gpus)
    cfg = target_cfg if target_cfg is not None else target_config(recipe.target.name)
    check_recipe_target(cfg, recipe.target.family, recipe.target.num_layers, recipe.target.name)
    sizes = _model_bytes(recipe, cfg)
    ddp, fsdp = _extras(recipe, gpus, sizes)
    limit = int(gpu_memory * (1 - margin))

    def total(m: StepMeasure) -> int:
        return m.peak_bytes + ddp - fsdp

    # a later micro-step of gradient accumulation starts with the gradients already there
    step = measure_step(recipe, micro, grads_present=accum > 1, target_cfg=cfg)
    largest = None  # --no-search: unknown (the recipe's micro-batch is not a search result)
    per_rank = global_batch // gpus if global_batch % gpus == 0 else None
    if search:
        # no use looking past one GPU's share of the global batch
        cap = per_rank or SEARCH_CAP
        largest = _largest_micro_batch(recipe, cfg, step if accum > 1 else None, micro, total, limit, cap)
    dividing = None if largest is None else \
        max((m for m in range(1, largest + 1) if per_rank and per_rank % m == 0), default=None)
    flops_micro = step.flops_target + step.flops_draft
    per_gpu = flops_micro * accum
    peak = dict(step.peak_by_kind)
    peak["weights"] -= fsdp
    notes = [
        "fake tensors on CPU with CPU autocast (bf16): CUDA's autocast casts a few ops differently",
        "flex attention is a stand-in that keeps what flex saves for backward (q, k, v, output, logsumexp); "
        "its FLOPs are the visible (query, key) pairs, not the 128x128 tiles the kernel computes",
        f"sequences at data.max_length ({recipe.data.max_length}) with a 256-token prompt: the worst case a batch holds",
        "not counted: the CUDA context and allocator fragmentation (the margin is for them)",
    ]
    notes.extend(_family_notes(cfg))
    if recipe.draft.init != "scratch":
        notes.append(f"draft.init {recipe.draft.init}: planned with the recipe's draft shape (num_layers "
                     f"{recipe.draft.num_layers}); a parent with another shape changes the figures")
    return Plan(
        recipe=recipe_name, target=recipe.target.name, gpus=gpus, gpu_memory_bytes=int(gpu_memory), memory_limit_bytes=limit,
        micro_batch=micro, grad_accum=accum, global_batch=global_batch, sequence_length=recipe.data.max_length,
        num_anchors=recipe.data.num_anchors, block_size=recipe.draft.block_size, loss=recipe.loss.name,
        attention=("flex (stand-in)" if recipe.train.attention in ("auto", "flex") else recipe.train.attention),
        activation_checkpointing=step.activation_checkpointing, peak_by_kind=peak, peak_bytes=total(step),
        weights_split={"target": sizes["target"] - fsdp, "draft": sizes["draft"]}, ddp_buckets_bytes=ddp,
        fsdp_saving_bytes=fsdp, fits=total(step) <= limit, largest_micro_batch=largest,
        largest_micro_batch_dividing=dividing, flops_target_per_micro=step.flops_target,
        flops_draft_per_micro=step.flops_draft, flops_per_step_per_gpu=per_gpu, flops_per_step_total=per_gpu * gpus,
        mfu=mfu, gpu_tflops=gpu_tflops, step_time_s=per_gpu / (mfu * gpu_tflops * 1e12),
        feature_cache=feature_cache_size(recipe, sizes), plan_seconds=time.perf_counter() - t0, notes=notes,
    )


SEARCH_CAP = 64


def _family_notes(cfg) -> list[str]:
    kinds = target_layer_kinds(cfg)
    notes = []
    if set(kinds) - {"full_attention", "experts"}:
        layers = ", ".join(f"{n} {k}" for k, n in kinds.items() if k != "experts")
        notes.append(f"target layers: {layers}; linear-attention layers counted as transformers' chunked "
                     "Gated DeltaNet (the fla kernels do the same matmuls)")
    if "experts" in kinds:
        e = kinds["experts"]
        notes.append(f"MoE target: weights of all {e['total']} experts per layer, FLOPs of the "
                     f"{e['active_per_token']} active per token")
    return notes


def _largest_micro_batch(recipe: Recipe, cfg, step: StepMeasure | None, m0: int, total, limit: int, cap: int) -> int:
    """Peak memory is affine in the micro-batch: fit it through two measurements, then confirm the
    candidate with a measurement of its own (and step down while it does not fit). Measured with the
    gradients present (any accumulation), so the answer holds for every grad_accum.
    `step`: the recipe's own micro-step when it was already measured that way."""
    other = measure_step(recipe, m0 + 1 if m0 == 1 else 1, grads_present=True, target_cfg=cfg)
    base = step or measure_step(recipe, m0, grads_present=True, target_cfg=cfg)
    per_seq = (total(other) - total(base)) / (other.micro_batch - base.micro_batch)
    fixed = total(base) - per_seq * base.micro_batch
    if per_seq <= 0:
        return m0
    candidate = min(cap, max(0, int((limit - fixed) // per_seq)))
    measured = {base.micro_batch: base, other.micro_batch: other}
    while candidate >= 1:
        m = measured.get(candidate) or measure_step(recipe, candidate, grads_present=True, target_cfg=cfg)
        if total(m) <= limit:
            return candidate
        candidate -= 1
    return 0


# -- output ----------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def format_plan(plan: Plan) -> str:
    g = plan.gpu_memory_bytes / GB
    lines = [
        f"plan: {plan.recipe}  (target {plan.target}, {plan.gpus} GPU(s) x {g:g} GB)",
        f"  batch: micro {plan.micro_batch} x grad_accum {plan.grad_accum} x {plan.gpus} GPU(s) = global {plan.global_batch}; "
        f"sequences of {plan.sequence_length} tokens, {plan.num_anchors} anchors x {plan.block_size} slots; "
        f"loss {plan.loss}; attention {plan.attention}; activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}",
        "  peak memory per GPU (one micro-step):",
    ]
    labels = {"weights": "weights", "gradients": "gradients", "optimizer_state": "optimizer state",
              "activations": "activations", "temporaries": "temporaries", "other": "other"}
    for kind in KIND_ORDER:
        extra = ""
        if kind == "weights":
            extra = f"   (target {plan.weights_split['target'] / GIB:.2f}, draft {plan.weights_split['draft'] / GIB:.2f})"
        if plan.peak_by_kind.get(kind, 0) >= 2**20 or kind != "other":
            lines.append(f"    {labels[kind]:<18}{_gib(plan.peak_by_kind.get(kind, 0))}{extra}")
    if plan.ddp_buckets_bytes:
        lines.append(f"    {'DDP buckets':<18}{_gib(plan.ddp_buckets_bytes)}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"    {'total':<18}{_gib(plan.peak_bytes)} = {plan.peak_bytes / GB:.1f} GB   {verdict} "
                 f"(limit {plan.memory_limit_bytes / GB:.1f} GB of {g:g} GB)")
    div = "" if plan.largest_micro_batch_dividing is None else \
        f"; the largest dividing the per-GPU batch {plan.global_batch // plan.gpus}: {plan.largest_micro_batch_dividing}"
    if plan.largest_micro_batch is None:
        lines.append(f"  largest micro-batch that fits: not searched (--no-search); the recipe's "
                     f"{plan.micro_batch} {'fits' if plan.fits else 'does not fit'}")
    else:
        lines.append(f"  largest micro-batch that fits: {plan.largest_micro_batch}{div}")
    lines.append(f"  FLOPs per micro-step: target forward {plan.flops_target_per_micro / 1e12:.1f} TFLOP, "
                 f"draft + loss (fwd+bwd) {plan.flops_draft_per_micro / 1e12:.1f} TFLOP")
    lines.append(f"  FLOPs per optimizer step: {plan.flops_per_step_per_gpu / 1e12:.1f} TFLOP per GPU, "
                 f"{plan.flops_per_step_total / 1e15:.2f} PFLOP in all")
    lines.append(f"  step time at MFU {plan.mfu:g} of {plan.gpu_tflops:g} TFLOP/s: {plan.step_time_s:.2f} s")
    if plan.feature_cache:
        fc = plan.feature_cache
        lines.append(f"  feature cache ({fc['dtype']}): {fc['bytes_per_token'] / 1024:.1f} KiB per token, "
                     f"{fc['bytes_per_max_length_sample'] / 1024**2:.1f} MiB per {plan.sequence_length}-token sample, "
                     f"{fc['bytes_per_billion_tokens'] / 1000**4:.1f} TB per billion tokens")
    else:
        lines.append("  feature cache: off (data.feature_cache unset)")
    lines.append(f"  planned in {plan.plan_seconds:.0f} s. Notes:")
    lines.extend(f"    - {note}" for note in plan.notes)
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)


__all__ = ["KNOWN_TARGETS", "Plan", "StepMeasure", "make_plan", "measure_step", "format_plan", "plan_json",
           "parse_memory", "target_config", "feature_cache_size"]
