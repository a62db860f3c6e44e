"""A plan as the command prints it: a table for people, JSON for tools."""

from __future__ import annotations

import json

from dflash_lab.plan.fake_step import KIND_ORDER
from dflash_lab.plan.memory import Plan
from dflash_lab.plan.models import GB, GIB

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
