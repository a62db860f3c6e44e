"""The recipe's models for the plan, from configs alone: the target (hub ids of the shipped recipes
from a built-in table, no network), the draft, synthetic full-length samples, and what a MoE or
hybrid target's layers are (all experts in memory, the active ones in the FLOPs)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.train.recipe import Recipe

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
