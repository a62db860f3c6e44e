"""Training recipes: a typed config read from YAML, with dotted command-line overrides.

    recipe = load_recipe("recipes/smollm2-135m/cpu.yaml", ["train.lr=1e-3", "loss.name=ce"])

Every section forbids unknown keys, so a typo is an error that names the key. `resolve_batch`
checks the batch arithmetic (global = micro x world x accumulation) before any model loads.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dflash_lab.errors import DFlashLabError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetSection(_Section):
    name: str = "smollm2-135m-instruct"
    """Embedded name, local HF directory, .gguf file or hub id (see `load_target`)."""
    dtype: str = "auto"
    """Target weights: auto = bf16 on GPU, fp32 on CPU."""
    fsdp: bool = False
    """Shard the frozen target with FSDP2 (`fully_shard`) across ranks (GPU, large targets)."""


class DraftSection(_Section):
    num_layers: int = Field(1, ge=1)
    block_size: int = Field(16, ge=2)
    mask_token_id: int | None = None
    target_layer_ids: list[int] | None = None
    intermediate_size: int | None = None
    rope_theta: float | None = None
    sliding_window: int | None = Field(None, ge=2)
    """Sliding-window draft layers: a block slot at position t sees context positions > t - W (W counts
    the slot itself, as Hugging Face, vLLM and SGLang do). null = full attention. Scratch init only:
    a warm start keeps its parent's layout."""
    layer_types: list[Literal["sliding_attention", "full_attention"]] | None = None
    """Per draft layer; null with sliding_window = every layer slides."""
    init: str = "scratch"
    """`scratch`, a checkpoint directory, `best:RUN_DIR` (best held-out tau) or `epoch-E:RUN_DIR`
    (the checkpoint written at the end of epoch E). Weights only; the optimizer starts fresh."""
    init_from_target_layers: bool = False
    """Copy the target's last decoder layers into the draft (scratch init only)."""


class DataSection(_Section):
    max_length: int = Field(3072, ge=8)
    num_anchors: int = Field(512, ge=1)
    min_supervised: int = Field(2, ge=2)
    heldout: float = Field(0.02, ge=0)
    """Held-out split for simulated tau: a fraction (< 1) or a number of samples (>= 1)."""
    heldout_max: int = Field(64, ge=0)
    feature_cache: str | None = None
    """Directory of cached target features (and final hidden states for KD), one file per sample."""
    feature_cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    prompt_set: str | None = None
    """Informational: the prompt set the labels came from (e.g. `mix-m2`)."""


class LossSection(_Section):
    name: Literal["ce", "kd", "eal", "survival-eal"] = "kd"
    alpha: float = Field(0.0, ge=0, le=1)
    """kd: alpha * CE + (1 - alpha) * KL."""
    gamma: float | None = Field(7.0, gt=0)
    """Position decay w_k = exp(-(k-1)/gamma) for ce and kd; null = uniform."""
    eal_mode: Literal["greedy", "sampled"] = "greedy"
    """a_k = q_k(y_k) (greedy verify) or sum_v min(p_k(v), q_k(v)) (sampled verify)."""
    kl_weight: float = Field(1.0, ge=0)
    """eal / survival-eal: weight of the KL term beside -EAL."""
    chunk_slots: int = Field(1024, ge=1)
    """Slots per vocabulary-sized chunk; more than one chunk recomputes logits in backward."""
    max_slot: int | None = Field(None, ge=1)
    """Score only block slots 1..max_slot in training (null = all B-1). The frozen output head is
    most of a small draft's step; early in training acceptance rarely reaches deep slots, so the
    head's time is better spent on more anchors. Held-out simulated tau still scores every slot."""


class TrainSection(_Section):
    lr: float = Field(6e-4, gt=0)
    epochs: int = Field(6, ge=1)
    micro_batch: int = Field(8, ge=1)
    grad_accum: int | None = Field(None, ge=1)
    global_batch: int | None = Field(None, ge=1)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    clip: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    bf16: bool | None = None
    """bf16 autocast; null = on for GPU, off for CPU."""
    device: str = "auto"
    cpu_threads: int | None = Field(None, ge=1)
    """torch intra-op threads on CPU (null = torch's default). On a shared machine 1 can be
    much faster than spinning threads that compete for cores."""
    attention: Literal["auto", "flex", "chunked"] = "auto"
    anchor_chunk: int = Field(64, ge=1)
    """CPU attention: anchors per chunk (bounds the [chunk*B, S+B] score tensor)."""
    save_every: int = Field(0, ge=0)
    eval_interval: int = Field(0, ge=0)
    keep_last: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Length of the schedule: min(epochs * steps_per_epoch, max_steps)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Size the schedule to this much training time: the three steps after the first are timed and
    the schedule becomes budget / step time steps (never more than epochs/max_steps allow). The decided
    length is recorded in run.json and in every checkpoint, so a resumed run keeps it.
    Held-out evaluations at checkpoints come on top."""
    stop_after: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many steps without shortening the schedule, as an
    interruption would; `--resume` continues exactly."""
    log_every: int = Field(1, ge=1)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class RegistrySection(_Section):
    db: str | None = None


class Recipe(_Section):
    name: str | None = None
    description: str | None = None
    target: TargetSection = TargetSection()
    draft: DraftSection = DraftSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()
    registry: RegistrySection = RegistrySection()

    @model_validator(mode="after")
    def _batch_shape(self):
        t = self.train
        if t.global_batch is not None and t.grad_accum is not None:
            if t.global_batch % (t.micro_batch * t.grad_accum):
                raise ValueError(
                    f"train.global_batch {t.global_batch} is not divisible by micro_batch x grad_accum "
                    f"({t.micro_batch} x {t.grad_accum})"
                )
        elif t.global_batch is not None and t.global_batch % t.micro_batch:
            raise ValueError(f"train.global_batch {t.global_batch} is not divisible by train.micro_batch {t.micro_batch}")
        return self


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(recipe)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return f"recipe {source}: " + "; ".join(parts)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """`section.key=value` strings (values parsed as YAML) set into a nested dict."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise DFlashLabError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise DFlashLabError(f"override {item!r}: empty key")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DFlashLabError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def parse_recipe(raw: dict, source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(raw or {})
    except ValidationError as exc:
        raise DFlashLabError(_format_errors(exc, source)) from None


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when `path` is None) and apply dotted overrides."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DFlashLabError(f"recipe {path}: no such file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DFlashLabError(f"recipe {path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise DFlashLabError(f"recipe {path}: the top level must be a mapping of sections")
        source = str(path)
    return parse_recipe(apply_overrides(raw, overrides), source)


def resolve_batch(recipe: Recipe, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) for `world_size` ranks, or an error that says how
    to fix the recipe. Runs before any model loads."""
    t = recipe.train
    micro = t.micro_batch
    if t.global_batch is None:
        accum = t.grad_accum or 1
        return micro, accum, micro * world_size * accum
    per_step = micro * world_size
    if t.grad_accum is not None:
        if micro * world_size * t.grad_accum != t.global_batch:
            raise DFlashLabError(
                f"train.global_batch {t.global_batch} != micro_batch {micro} x world {world_size} x "
                f"grad_accum {t.grad_accum}; fix one of them (or drop grad_accum to derive it)"
            )
        return micro, t.grad_accum, t.global_batch
    if t.global_batch % per_step:
        raise DFlashLabError(
            f"train.global_batch {t.global_batch} is not divisible by micro_batch {micro} x world size "
            f"{world_size} = {per_step}; choose a global batch that is a multiple of {per_step}"
        )
    return micro, t.global_batch // per_step, t.global_batch


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
