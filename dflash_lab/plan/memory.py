"""The plan of a recipe: its measured micro-step plus what one process cannot see (DDP buckets,
FSDP's sharding of the target), sized against a GPU's memory, with the largest micro-batch that
fits, FLOPs per step and the feature cache's size."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.target import check_recipe_target
from dflash_lab.plan.fake_step import StepMeasure, measure_step
from dflash_lab.plan.models import GB, _target_dtype, build_draft, build_target, target_config, target_layer_kinds
from dflash_lab.train.recipe import Recipe, resolve_batch

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
    per_rank = global_batch // gpus if global_batch % gpus == 0 else None
    # --no-search: unknown (the recipe's micro-batch is not a search result); the search goes no
    # further than one GPU's share of the global batch
    largest = _largest_micro_batch(recipe, cfg, step if accum > 1 else None, micro, total, limit,
                                   per_rank or SEARCH_CAP) if search else None
    dividing = None if largest is None else \
        max((m for m in range(1, largest + 1) if per_rank and per_rank % m == 0), default=None)
    per_gpu = (step.flops_target + step.flops_draft) * accum
    peak = dict(step.peak_by_kind)
    peak["weights"] -= fsdp
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
        feature_cache=feature_cache_size(recipe, sizes), plan_seconds=time.perf_counter() - t0,
        notes=_notes(recipe, cfg),
    )


def _notes(recipe: Recipe, cfg) -> list[str]:
    """What the figures do not show: how they were made and what they leave out."""
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
    return notes


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
