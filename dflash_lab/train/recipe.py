"""Training recipes: a typed config read from YAML, with dotted command-line overrides.

    recipe = load_recipe("recipes/smollm2-135m/cpu.yaml", ["train.lr=1e-3", "loss.name=ce"])

Every section forbids unknown keys, so a typo is an error that names the key. `resolve_batch`
checks the batch arithmetic (global = micro x world x accumulation) before any model loads.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import read_user_text
from dflash_lab.train.objectives import LOSS_NAMES

# What torch.device accepts that the trainer can run on; anything else used to pass --dry-run and
# crash after the target had loaded.
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetSection(_Section):
    name: str = "smollm2-135m-instruct"
    """Embedded name, local HF directory, .gguf file or hub id (see `load_target`)."""
    dtype: str = "auto"
    """Target weights: auto = bf16 on GPU, fp32 on CPU."""
    fsdp: bool = False
    """Shard the frozen target with FSDP2 (`fully_shard`) across ranks (GPU, large targets)."""
    family: str | None = None
    """The target's `model_type` the recipe was written for (qwen3, qwen3_5, gemma3_text, ...): checked
    when the target loads (train) or its config is read (plan); None = not checked."""
    num_layers: int | None = Field(None, ge=1)
    """The target's decoder layer count the recipe's layer ids assume; checked like `family`."""


class DraftSection(_Section):
    arch: Literal["dflash", "dflash2"] = "dflash"
    """`dflash` (v1) or `dflash2` (conv + candidate selector, SPEC section 10; see docs/dflash2.md)."""
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
    token_store: str | None = None
    """Root of the tokenised, memory-mapped data stores (train/store.py); None = the cache
    (`$DFLASH_LAB_HOME/token-store`, else `~/.cache/dflash-lab/token-store`). Built once per key."""
    prompt_set: str | None = None
    """Informational: the prompt set the labels came from (e.g. `mix-m2`)."""
    group_by_length: bool = True
    """Length-grouped batches: within windows of `group_window` global batches, sequences are
    sorted by anchor count and length, cut into global batches, and the batches shuffled, so a
    micro-batch pads little. The order stays a pure function of (seed, epoch). false = plain
    random order."""
    group_window: int = Field(8, ge=1)
    """Global batches per sorting window of `group_by_length`."""


class LossSection(_Section):
    name: Literal[LOSS_NAMES] = "kd"  # type: ignore[valid-type]
    """The training objective: one class in `train/objectives/` per name."""
    alpha: float = Field(0.0, ge=0, le=1)
    """kd: alpha * CE + (1 - alpha) * KL."""
    gamma: float | None = Field(7.0, gt=0)
    """Position decay w_k = exp(-(k-1)/gamma) for ce and kd; null = uniform."""
    eal_mode: Literal["greedy", "sampled"] = "greedy"
    """a_k = q_k(y_k) (greedy verify) or sum_v min(p_k(v), q_k(v)) (sampled verify)."""
    kl_weight: float | None = Field(None, ge=0)
    """eal / survival-eal / dpace: weight of the KL term (for dpace a survival-weighted KD term);
    null = the loss's default: 1 for eal and survival-eal, 0 for dpace (pure D-PACE)."""
    dpace_alpha: float = Field(0.5, ge=0, le=1)
    """dpace: q~_i = dpace_alpha + (1 - dpace_alpha) q_i(y_i) in the position weights
    w_k = sum_{j>=k} prod_{i<=j} q~_i (0 = greedy EAL's gradient; 1 = the sum of the remaining
    slots). Separate from `alpha`, which is kd's CE/KL mix."""
    normalize: Literal["weights", "anchors"] = "anchors"
    """dpace: divide the weighted CE by the number of valid anchors of the optimizer step
    (`anchors`, SpecForge #828) or by sum(w v) (`weights`, which cancels the credit mass)."""
    chunk_slots: int = Field(1024, ge=1)
    """Slots per vocabulary-sized chunk: bounds the transient [slots, V] tensors (nothing is
    recomputed in backward, whatever the number of chunks)."""
    max_slot: int | None = Field(None, ge=1)
    """Score only block slots 1..max_slot in training (null = all B-1). The frozen output head is
    most of a small draft's step; early in training acceptance rarely reaches deep slots, so the
    head's time is better spent on more anchors. Held-out simulated tau still scores every slot."""
    selector_alpha: float = Field(1.0, ge=0)
    """DFlash2 drafts only: loss = base + selector_alpha * the 16-way selector CE (teacher-forced
    predecessor, the base loss's decay weights; docs/dflash2.md). 0 = the base loss alone (the
    selector is then frozen; its metrics are still logged). Ignored for v1 drafts."""
    selector_gold: Literal["replace", "exclude"] = "replace"
    """DFlash2: a gold token outside the unary top-16 replaces the last candidate (`replace`,
    speculators) or leaves the selector loss (`exclude`, SpecForge / NeMo Automodel). `replace`
    measured better on the demo's labels at equal compute in both seeds, by about the noise
    (held-out tau +0.034 / +0.014; BENCHMARKS.md section 8), and trains every slot."""


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
    """bf16 autocast; null = on for a GPU or a bf16/fp16 target, off otherwise (false with such a target is refused)."""
    device: str = "auto"
    cpu_threads: int | None = Field(None, ge=1)
    """torch intra-op threads on CPU (null = torch's default). On a shared machine 1 can be
    much faster than spinning threads that compete for cores."""
    attention: Literal["auto", "flex", "chunked"] = "auto"
    activation_checkpointing: bool = False
    """Recompute each draft layer in backward instead of keeping its activations (torch.utils.checkpoint,
    non-reentrant): about a third more draft compute for a fraction of the activation memory. `dflash-lab
    plan` says which micro-batch fits with and without it."""
    anchor_chunk: int = Field(64, ge=1)
    """CPU attention: anchors per chunk (bounds the [chunk*B, S+B] score tensor)."""
    save_every: int = Field(0, ge=0)
    eval_interval: int = Field(0, ge=0)
    keep_last: int | None = Field(None, ge=1)
    keep_epoch_ends: bool = True
    """keep_last never prunes an epoch-end checkpoint (a later stage's `init: epoch-E:RUN` may name
    it); false prunes them like any step checkpoint (many short epochs, e.g. a memorisation test)."""
    max_steps: int | None = Field(None, ge=1)
    """Length of the schedule: min(epochs * steps_per_epoch, max_steps)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Size the schedule to this much training time: the three steps after the first are timed and
    the schedule becomes budget / step time steps (never more than epochs/max_steps allow). The decided
    length is recorded in run.json and in every checkpoint, so a resumed run keeps it.
    Held-out evaluations at checkpoints come on top."""
    min_steps: int | None = Field(None, ge=1)
    """With `time_budget_s`: the budget never cuts the schedule below this many steps (epochs and
    max_steps still cap it), so a busy machine takes longer instead of training a draft that has
    learned nothing."""
    stop_after: int | None = Field(None, ge=1)
    """Stop (with a checkpoint) after this many steps without shortening the schedule, as an
    interruption would; `--resume` continues exactly."""
    log_every: int = Field(1, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not _DEVICE_RE.match(v):
            raise ValueError("choose auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class RegistrySection(_Section):
    db: str | None = None


# DFlash2's published block size, and the decay SPEC 3 pairs with it (gamma 4 for B = 8)
DFLASH2_DEFAULTS = {"block_size": 8, "gamma": 4.0}


class Recipe(_Section):
    name: str | None = None
    description: str | None = None
    target: TargetSection = TargetSection()
    draft: DraftSection = DraftSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()
    registry: RegistrySection = RegistrySection()

    @model_validator(mode="before")
    @classmethod
    def _dflash2_defaults(cls, raw):
        """`draft.arch: dflash2` without a block size / loss gamma gets DFlash2's (8 / 4.0)."""
        if isinstance(raw, dict) and isinstance(raw.get("draft"), dict) and raw["draft"].get("arch") == "dflash2":
            raw = {**raw, "draft": {"block_size": DFLASH2_DEFAULTS["block_size"], **raw["draft"]}}
            loss = raw.get("loss") if isinstance(raw.get("loss"), dict) else {}
            if "loss" not in raw or isinstance(raw.get("loss"), dict):
                raw["loss"] = {"gamma": DFLASH2_DEFAULTS["gamma"], **loss}
        return raw

    @model_validator(mode="after")
    def _draft_window(self):
        """The window checks the draft config makes after the target loads, made here so --dry-run
        makes them too; and a warm start never drops a window silently (it keeps its parent's layout)."""
        d = self.draft
        if d.init != "scratch" and (d.sliding_window is not None or d.layer_types is not None):
            given = ", ".join(f"draft.{k}" for k in ("sliding_window", "layer_types") if getattr(d, k) is not None)
            raise ValueError(f"{given} with draft.init {d.init}: a warm start keeps its parent's attention layout, "
                             f"so the window would not be applied; drop {given} to keep the parent's, or start "
                             "from scratch (draft.init=scratch)")
        if d.layer_types is not None and len(d.layer_types) != d.num_layers:
            raise ValueError(f"draft.layer_types has {len(d.layer_types)} entries for draft.num_layers "
                             f"{d.num_layers}: give one per layer")
        sliding = d.sliding_window is not None and (d.layer_types is None or "sliding_attention" in d.layer_types)
        if d.layer_types is not None and "sliding_attention" in d.layer_types and d.sliding_window is None:
            raise ValueError("draft.layer_types has sliding_attention layers but draft.sliding_window is not set: "
                             "set draft.sliding_window (>= draft.block_size), or make every layer full_attention")
        if sliding and d.sliding_window < d.block_size:
            raise ValueError(f"draft.sliding_window {d.sliding_window} < draft.block_size {d.block_size}: a block "
                             f"must see all of itself; set draft.sliding_window >= {d.block_size}")
        return self

    @model_validator(mode="after")
    def _batch_shape(self):
        t = self.train
        per_step = t.micro_batch * (t.grad_accum or 1)
        if t.global_batch is not None and t.global_batch % per_step:
            what = (f"micro_batch x grad_accum = {t.micro_batch} x {t.grad_accum} = {per_step}"
                    if t.grad_accum is not None else f"micro_batch {t.micro_batch}")
            raise ValueError(f"train.global_batch {t.global_batch} is not divisible by {what}; set "
                             f"train.global_batch to a multiple of {per_step} (e.g. {_multiple_near(t.global_batch, per_step)})")
        return self


def _multiple_near(value: int, step: int) -> int:
    return max(step, round(value / step) * step)


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif not loc:  # a check across sections: its message is the fact and the fix; the input is the whole recipe
            parts.append(str(err["msg"]).removeprefix("Value error, "))
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
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise DFlashLabError(f"override {item!r}: the value is not valid YAML ({problem}); write it as YAML, "
                                 "e.g. train.betas=[0.9,0.95], and quote it for the shell") from None
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
        if not path.exists():
            raise DFlashLabError(f"recipe {path}: no such file")
        try:
            raw = yaml.safe_load(read_user_text(path, "recipe"))
        except yaml.YAMLError as exc:
            raise DFlashLabError(f"recipe {path}: not valid YAML ({exc})") from None
        if not raw:  # the defaults are Qwen3-scale settings: an empty file is a mistake, not a choice
            raise DFlashLabError(f"recipe {path} is empty; write the sections you need (target, draft, data, "
                                 "loss, train), e.g. start from recipes/smollm2-135m/cpu.yaml")
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
