"""The DFlash trainer: one process or `torchrun`, CPU or GPU.

    dflash-lab train --config recipes/smollm2-135m/cpu.yaml --data labels/ --out runs/cpu
    torchrun --nproc-per-node 8 -m dflash_lab train --config recipes/qwen3-4b/m1.yaml --data labels/ --out runs/m1

Each optimizer step takes `global_batch` sequences (micro_batch per rank x world x grad_accum):
the frozen target gives the features (online, or from the feature cache), every sequence gets
`num_anchors` fresh anchors, all its blocks go through the draft in one forward with the block
attention of `blocks.py`, and the loss of `losses.py` is a token-level mean over every slot of
the global batch (its denominators are all-reduced over micro-steps and ranks); `step.py` holds
that math. The run's stateful parts are small components (`loader.py`, `components.py`);
`Trainer` builds them from the recipe and runs the loop, `train()` is the entry point.
Everything random is a pure function of (seed, epoch, step, slot in the batch): the epoch order,
the anchors, the held-out anchors. With the optimizer state restored, a resumed run therefore
repeats the interrupted one exactly, and the batch layout over ranks does not change the result.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train import state as S
from dflash_lab.train.checkpointer import CheckpointConfig, Checkpointer, RngState
from dflash_lab.train.components import (HELDOUT_KEYS, DraftParts, EvalConfig, Evaluator, Metrics, MetricsConfig,
                                         OptimConfig, Progress, RunRecord, TimeBudget, cosine_lr, now_iso,
                                         truncate_metrics, warn)
from dflash_lab.train.data import FeatureCache, manifest_sha256
from dflash_lab.train.loader import LoaderConfig, SubsetSource, TrainLoader, split_indices
from dflash_lab.train.recipe import Recipe, load_recipe, parse_recipe, recipe_to_yaml, resolve_batch
# The step's math lives in step.py; dflash_lab.plan, the bench scripts and tests import it from here too.
from dflash_lab.train.step import (FeatureSource, StepConfig, accumulate_gradients, build_micro_blocks,  # noqa: F401
                                   forward_batch, heldout_metrics)

__all__ = ["train", "Trainer", "RunOptions", "forward_batch", "build_micro_blocks", "accumulate_gradients",
           "heldout_metrics", "FeatureSource", "init_from_target_layers", "cosine_lr"]


# -- the entry point -------------------------------------------------------------------------------
@dataclass
class RunOptions:
    """What the caller chose beyond the recipe."""

    data_path: str | os.PathLike
    out_dir: Path
    recipe_path: str | None = None
    """Recorded in run.json (a resumed run keeps the first one)."""
    resume: bool = False
    resume_from: Path | None = None
    """The checkpoint every part continues from; None = a fresh start."""
    progress: bool = True
    """The progress bar (rank 0), also while the token store is built."""
    db: str | None = None
    """The run registry the finished run is recorded in (None: the recipe's `registry.db`)."""


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
    recipe = _with_run_control(_as_recipe(config), max_steps=max_steps, stop_after=stop_after)
    world = D.env_world_size()
    _check_recipe(recipe, world)
    resume_from = _resume_point(out_dir, resume)
    if resume_from is not None and resume_from.name == "final":
        return resume_from  # already finished
    run = RunOptions(data_path=data_path, out_dir=out_dir, resume=resume, resume_from=resume_from, progress=progress,
                     db=db, recipe_path=recipe_path or (str(config) if isinstance(config, (str, os.PathLike)) else None))
    device = _pick_device(recipe.train.device, D.DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world))
    info = D.init_distributed(device.type)
    # The group is closed only after a run that ended well: closing it while another rank still
    # waits in a collective (this rank failed) can hang that rank instead of letting torchrun stop it.
    final = Trainer(recipe, run, device, info, target).train()
    D.shutdown(info)
    return final


def _with_run_control(recipe: Recipe, **control) -> Recipe:
    """The recipe with train.max_steps / train.stop_after replaced where given."""
    updates = {k: v for k, v in control.items() if v is not None}
    if not updates:
        return recipe
    return parse_recipe({**recipe.model_dump(mode="json"), "train": {**recipe.train.model_dump(mode="json"), **updates}})


def _check_recipe(recipe: Recipe, world: int) -> None:
    """What cannot run, refused before any model loads."""
    if recipe.target.fsdp and recipe.data.feature_cache:
        raise DFlashLabError("target.fsdp with data.feature_cache: cache hits differ between ranks, which FSDP's "
                             "per-layer gathers cannot follow; drop one of them")
    resolve_batch(recipe, world)  # an indivisible batch layout is an error


def _autocast_on(requested: bool | None, device: torch.device, target_dtype: torch.dtype) -> bool:
    """bf16 autocast: train.bf16 when set, else on for a GPU or a half-precision target, whose head
    the fp32 draft's hidden states meet in the vocabulary stage only under autocast."""
    half_target = target_dtype in (torch.bfloat16, torch.float16)
    if requested is False and half_target:
        raise DFlashLabError(f"train.bf16=false with a {target_dtype} target (target.dtype): the fp32 draft reads the "
                             "target's head only under bf16 autocast; set train.bf16=true (or leave it unset), or "
                             "target.dtype=float32")
    return requested if requested is not None else (device.type == "cuda" or half_target)


def _resume_point(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to start over a run with checkpoints."""
    if (out_dir / "run.json").exists() and not resume:
        if S.list_checkpoints(out_dir):
            raise DFlashLabError(f"--out {out_dir} already holds a run with checkpoints; pass --resume to continue it "
                                 "or choose a new directory")
    resume_from = S.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None and not (out_dir / "run.json").exists():
        raise DFlashLabError(f"--resume: no run in {out_dir} (no run.json, no checkpoints)")
    return resume_from


# -- the run ---------------------------------------------------------------------------------------
class Trainer:
    """One training run. `__init__` builds the components from the recipe (resumed from
    `run.resume_from` when given) and starts the run directory; `train()` runs the loop."""

    def __init__(self, recipe: Recipe, run: RunOptions, device: torch.device, info: D.DistInfo, target=None):
        self.recipe, self.run, self.device, self.info = recipe, run, device, info
        tcfg = recipe.train
        self.micro, self.accum, self.global_batch = resolve_batch(recipe, info.world_size)
        _seed_everything(tcfg.seed, tcfg.cpu_threads if device.type == "cpu" else None)
        self.target = target if target is not None else _load_target(recipe, device)
        self.bf16 = _autocast_on(tcfg.bf16, device, self.target.dtype)
        if recipe.target.fsdp:
            D.shard_target(self.target, info)
        self._build_data()
        self.progress = Progress(total_steps=min(tcfg.epochs * self.loader.steps_per_epoch, tcfg.max_steps or 1 << 62),
                                 budget_fixed=not tcfg.time_budget_s)
        self.budget = TimeBudget(tcfg.time_budget_s, tcfg.min_steps or 0)
        self.draft, self.parent = _build_draft(recipe, self.target, tcfg.seed, device)
        self.parts = DraftParts(self.draft, OptimConfig(
            lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay, warmup_ratio=tcfg.warmup_ratio,
            min_lr_ratio=tcfg.min_lr_ratio, clip=tcfg.clip))
        self._build_step()
        self.evaluator = Evaluator(EvalConfig(seed=tcfg.seed, every=tcfg.eval_interval, lockstep=recipe.target.fsdp),
                                   self.draft, self.target, self.features, self.heldout, self.fwd, info)
        self.metrics = Metrics(MetricsConfig(
            out_dir=run.out_dir, block_size=self.draft.config.block_size, global_batch=self.global_batch,
            log_every=tcfg.log_every, progress=run.progress), info)
        self.checkpointer = Checkpointer(CheckpointConfig(
            out_dir=run.out_dir, seed=tcfg.seed, save_every=tcfg.save_every, keep_last=tcfg.keep_last,
            keep_epoch_ends=tcfg.keep_epoch_ends, dtype=self.target.dtype), info,
            {"draft": self.parts, "progress": self.progress, "loader": self.loader, "metrics": self.metrics,
             "rng": RngState()})
        if run.resume_from is not None:
            self.checkpointer.load(run.resume_from)
        self.model = D.wrap_draft(self.draft, info, str(device))
        self.record = RunRecord(run.out_dir / "run.json")
        self._start_run_dir()
        self.metrics.open(self.progress.step, self.progress.total_steps)
        self.last_metrics: dict = {}  # the last logged row: checkpoints record it
        self.tau_step: int | None = None  # the step whose weights the last held-out tau measured
        self.lr = 0.0

    def _build_data(self) -> None:
        """The token store, the held-out split and this rank's loader."""
        dcfg, tcfg, info = self.recipe.data, self.recipe.train, self.info
        source, self.tok_stats = _load_source(self.target, self.run.data_path, dcfg, info, self.run.progress)
        train_idx, held_idx = split_indices(len(source), dcfg.heldout, dcfg.heldout_max, tcfg.seed)
        self.train_set, self.heldout = SubsetSource(source, train_idx), SubsetSource(source, held_idx)
        if len(self.train_set) < self.global_batch:
            raise DFlashLabError(
                f"data {self.run.data_path}: {len(self.train_set)} usable training sequences (of "
                f"{self.tok_stats['records']} records; {self.tok_stats['skipped_few_supervised']} skipped with < "
                f"{dcfg.min_supervised} supervised tokens) is fewer than one global batch ({self.global_batch}); "
                "lower train.global_batch/micro_batch or add data")
        self.loader = TrainLoader(self.train_set, LoaderConfig(
            seed=tcfg.seed, global_batch=self.global_batch, micro_batch=self.micro, grad_accum=self.accum,
            world_size=info.world_size, rank=info.rank, num_anchors=dcfg.num_anchors,
            group_by_length=dcfg.group_by_length, group_window=dcfg.group_window))

    def _build_step(self) -> None:
        """The loss, the target's features (through the feature cache when there is one) and the
        forward's settings (`fwd`, the run's frozen `StepConfig`)."""
        recipe, tcfg, dcfg = self.recipe, self.recipe.train, self.recipe.data
        self.loss_cfg = _loss_config(recipe.loss)
        need_final = self.loss_cfg.objective.needs_target_logits()
        layer_ids = self.draft.config.target_layer_ids
        self.cache = (FeatureCache(dcfg.feature_cache, self.target.fingerprint, layer_ids, dcfg.feature_cache_dtype)
                      if dcfg.feature_cache else None)
        self.features = FeatureSource(self.target, layer_ids, need_final, self.cache, self.device,
                                      stop_early=not recipe.target.fsdp)
        self.fwd = StepConfig(num_anchors=dcfg.num_anchors, loss_cfg=self.loss_cfg, attention=tcfg.attention,
                              anchor_chunk=tcfg.anchor_chunk, chunk_slots=recipe.loss.chunk_slots, device=self.device,
                              autocast_dtype=torch.bfloat16 if self.bf16 else None, max_slot=recipe.loss.max_slot)

    def _start_run_dir(self) -> None:
        """config.yaml and run.json (rank 0); metrics.jsonl rows past a resumed checkpoint are dropped."""
        out_dir = self.run.out_dir
        if self.info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            # stop_after is run control, not recipe: a resumed run must not stop again at the same step
            saved_recipe = parse_recipe({**self.recipe.model_dump(mode="json"),
                                         "train": {**self.recipe.train.model_dump(mode="json"), "stop_after": None}})
            atomic_write_text(out_dir / "config.yaml", recipe_to_yaml(saved_recipe))
            self.record.write(self._run_json(saved_recipe), self.run.resume_from, self.run.resume)
            truncate_metrics(out_dir / "metrics.jsonl", self.progress.step)
        D.barrier(self.info)

    def _run_json(self, saved_recipe: Recipe) -> dict:
        recipe, tcfg, dcfg, run = self.recipe, self.recipe.train, self.recipe.data, self.run
        return {
            "name": recipe.name or run.out_dir.name,
            "run_dir": str(run.out_dir),
            "recipe": saved_recipe.model_dump(mode="json"),
            "recipe_path": run.recipe_path,
            "parent": str(self.parent.resolve()) if self.parent is not None else None,
            "data": {"path": str(Path(run.data_path).resolve()), "manifest_sha256": manifest_sha256(run.data_path),
                     "records": self.tok_stats["records"], "train_sequences": len(self.train_set),
                     "heldout_sequences": len(self.heldout), "tokenize": self.tok_stats},
            "loss": recipe.loss.model_dump(mode="json"),
            "schedule": {"total_steps": self.progress.total_steps, "steps_per_epoch": self.loader.steps_per_epoch,
                         "epochs": tcfg.epochs, "global_batch": self.global_batch, "micro_batch": self.micro,
                         "grad_accum": self.accum, "world_size": self.info.world_size, "lr": tcfg.lr,
                         "warmup_ratio": tcfg.warmup_ratio, "min_lr_ratio": tcfg.min_lr_ratio,
                         "time_budget_s": tcfg.time_budget_s, "group_by_length": dcfg.group_by_length},
            "target": self.target.describe(),
            "draft": self.draft.config.to_json_dict(),
            "device": str(self.device), "bf16": self.bf16,
            "created": now_iso(),
            "status": "running",
        }

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> Path:
        """Every step of the schedule, then the final checkpoint (returned). train.stop_after stops
        early, after a checkpoint of that step (returned)."""
        progress, loader = self.progress, self.loader
        while progress.step < progress.total_steps:
            while not loader.epoch_done and progress.step < progress.total_steps:
                self.train_step()
                self.log()
                stopping = self._stop_requested()
                self.checkpoint_if_due(stopping)
                if stopping:
                    self.metrics.close()
                    return S.latest_checkpoint(self.run.out_dir)
            if loader.epoch_done:
                loader.next_epoch()
        try:
            return self.finish()
        finally:  # after the final checkpoint's event: closing first left a second, unclosed events file
            self.metrics.close()

    def train_step(self) -> None:
        """One optimizer step: every micro-batch of this rank, then clip, AdamW and the schedule."""
        started = time.perf_counter()
        progress = self.progress
        self.lr = self.parts.set_lr(progress.step, progress.total_steps)
        loss, stats = accumulate_gradients(self.model, self.draft, self.draft.config, self.target, self.features,
                                           self.loader.micro_batches(progress.step), self.fwd, self.info)
        grad_norm = self.parts.step()
        progress.step += 1
        self.loader.advance()
        if self.budget.observe(progress, self.info):
            if self.info.is_main:
                self.record.update(schedule={"total_steps": progress.total_steps})
            self.metrics.set_total(progress.total_steps)
        self.metrics.add_step(loss, stats, grad_norm, time.perf_counter() - started)

    def log(self) -> None:
        """At a log step the interval's metrics, at an eval step the held-out tau with them; the bar."""
        step, loader = self.progress.step, self.loader
        evaluate = self.evaluator.due(step)
        row = None
        if self.metrics.due(step) or evaluate:
            epoch = loader.epoch + loader.step_in_epoch / loader.steps_per_epoch
            row = self.last_metrics = self.metrics.read(self.lr, epoch)
            if evaluate:
                held = self.evaluator.evaluate()
                if held:
                    row.update(held)
                    self.tau_step = step
            self.metrics.write(step, row)
        self.metrics.tick(row)

    def _stop_requested(self) -> bool:
        """train.stop_after (run control, e.g. to test resume) reached before the schedule's end."""
        stop_after, progress = self.recipe.train.stop_after, self.progress
        return stop_after is not None and stop_after <= progress.step < progress.total_steps

    def checkpoint_if_due(self, stopping: bool) -> None:
        epoch_end = self.loader.epoch_done
        if self.checkpointer.due(self.progress.step, self.progress.total_steps, epoch_end, stopping):
            self.checkpoint(f"step-{self.progress.step}", epoch_end)

    def checkpoint(self, name: str, epoch_end: bool) -> Path:
        """Checkpoint `name` with the last logged metrics and a held-out tau (reused when the last
        log measured these very weights, else measured now: a tau from an earlier step would let
        `best` pick a checkpoint by another one's score) and a checkpoint event in metrics.jsonl."""
        metrics = dict(self.last_metrics)
        if self.tau_step != self.progress.step:
            for key in HELDOUT_KEYS:
                metrics.pop(key, None)
            held = self.evaluator.evaluate()
            if held:
                metrics.update(held)
                self.tau_step = self.progress.step
        path = self.checkpointer.save(name, metrics, epoch_end)
        self.metrics.write_event(self.progress.step, {"event": "checkpoint", "name": name, **metrics})
        return path

    def finish(self) -> Path:
        """The final checkpoint; run.json says finished; the run goes into the registry."""
        epoch_end = self.loader.finish_position()
        result = self.checkpoint("final", epoch_end)
        if self.info.is_main:
            changes = {"status": "finished", "finished": now_iso(),
                       "best_checkpoint": str(S.best_checkpoint(self.run.out_dir))}
            if self.cache is not None:
                changes["feature_cache"] = {"dir": str(self.cache.root), "hits": self.cache.hits,
                                            "misses": self.cache.misses}
            self.record.update(**changes)
            _register(self.run.out_dir, self.run.db or self.recipe.registry.db)
        D.barrier(self.info)
        return result


# -- the parts the Trainer builds ------------------------------------------------------------------
def _seed_everything(seed: int, cpu_threads: int | None) -> None:
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _load_target(recipe: Recipe, device: torch.device):
    from dflash_lab.models.target import check_recipe_target, load_target

    target = load_target(recipe.target.name, dtype=recipe.target.dtype, device=str(device))
    check_recipe_target(target.config, recipe.target.family, recipe.target.num_layers, recipe.target.name)
    return target


def _register(out_dir: Path, db: str | None) -> None:
    """Record the finished run in the run registry, when one is named."""
    if not db:
        return
    try:
        from dflash_lab.registry import register_run
    except ImportError:
        warn("[train] dflash_lab.registry is not available; run not registered")
    else:
        register_run(out_dir, db=db)


# -- draft initialisation ------------------------------------------------------------------------
def init_from_target_layers(draft, target) -> list[str]:
    """Copy the target's last full-attention decoder layers (attention, MLP, norms) and final norm
    into the draft where shapes match; q_norm/k_norm stay ones when the target has none; fc becomes
    the identity on the last feature layer's slice (zeros elsewhere), and when that feature is the
    first copied layer's input (target_layer_ids[-1] == that layer's index - 1) hidden_norm takes
    that layer's input norm. Returns the copied tensor names.

    Hybrid and sliding-window targets (Qwen3.5, Gemma, gpt-oss): only full-attention layers are a
    draft layer's kind, so the last n of those are copied (whatever lies between them); a target
    whose attention projections do not fit a draft layer (Qwen3.5/Qwen3-Next gate their queries)
    is refused with the reason. Norms are copied by their effective scale, so zero-centred RMSNorms
    (Gemma 3, Qwen3.5: `x * (1 + w)`) land right in the draft's `x * w`."""
    from dflash_lab.models.target import full_attention_layers

    body = getattr(target.model, "model", target.model)
    layers = list(body.layers)
    n = len(draft.layers)
    sources = full_attention_layers(target.config)[-n:]
    if len(sources) < n:
        raise DFlashLabError(
            f"draft.init_from_target_layers: the draft has {n} layers but the target has only {len(sources)} "
            f"full-attention layers to copy ({target.config.model_type}); use fewer draft layers or set "
            "draft.init_from_target_layers: false")
    copied = []
    with torch.no_grad():
        for i, (layer, index) in enumerate(zip(draft.layers, sources)):
            source = _copyable_tensors(layers[index])
            _check_attention_fits(layer, source, index, target)
            for name, param in layer.named_parameters():
                if name in source and tuple(source[name].shape) == tuple(param.shape):
                    param.copy_(_whole(source[name]).to(param.dtype))
                    copied.append(f"layers.{i}.{name}")
                elif name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.fill_(1.0)
        if hasattr(body, "norm") and body.norm.weight.shape == draft.norm.weight.shape:
            draft.norm.weight.copy_(_norm_scale(body.norm).to(draft.norm.weight.dtype))
            copied.append("norm.weight")
        copied.extend(_init_feature_input(draft, layers[sources[0]], sources[0]))
    return copied


def _init_feature_input(draft, first, first_index: int) -> list[str]:
    """fc: the identity on the last feature's slice; hidden_norm: the input norm of `first` (the
    first copied target layer) when the last feature is exactly that layer's input, else ones."""
    h = draft.config.hidden_size
    nfeat = len(draft.config.target_layer_ids)
    draft.fc.weight.zero_()
    draft.fc.weight[:, (nfeat - 1) * h:].copy_(torch.eye(h, dtype=draft.fc.weight.dtype))
    if draft.config.target_layer_ids[-1] == first_index - 1 and hasattr(first, "input_layernorm"):
        # c = hidden_norm(h) then gives that layer's own normalised input, so its K/V over the
        # context start as the target's
        draft.hidden_norm.weight.copy_(_norm_scale(first.input_layernorm).to(draft.hidden_norm.weight.dtype))
        return ["fc.weight(identity)", "hidden_norm.weight"]
    draft.hidden_norm.weight.fill_(1.0)
    return ["fc.weight(identity)"]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a target parameter: with `target.fsdp` the decoder layers' parameters are
    DTensor shards, which cannot be copied into the draft's plain tensors. `full_tensor()` is a
    collective; every rank initialises the draft with the same calls in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# A Gemma 3/4 layer norms the MLP input with `pre_feedforward_layernorm`; its
# `post_attention_layernorm` scales the attention output instead, which a draft layer does not have.
_GEMMA_NORMS = {"pre_feedforward_layernorm.weight": "post_attention_layernorm.weight"}
_ATTENTION = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")


def _norm_scale(norm) -> torch.Tensor:
    """An RMSNorm's effective per-channel scale: `w` for a plain RMSNorm, `1 + w` for a zero-centred
    one (Gemma 3, Qwen3.5). Told apart by the norm's own output for an all-ones input (RMS 1); the
    weight itself is returned, so a copy stays bit-exact in any dtype."""
    eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 0.0)
    whole = _whole(norm.weight).detach()  # FSDP: the norm runs here on the full weight, not its shard
    probe_norm = copy.copy(norm)  # a shallow copy with its own parameter dict; the target is untouched
    probe_norm._parameters = dict(norm._parameters, weight=torch.nn.Parameter(whole, requires_grad=False))
    weight = whole.float()
    ones = torch.ones(1, weight.shape[0], dtype=whole.dtype, device=weight.device)
    probe = probe_norm(ones).float()[0] * (1.0 + eps) ** 0.5
    if torch.allclose(probe, weight, rtol=1e-2, atol=1e-2):
        return whole
    if torch.allclose(probe, 1.0 + weight, rtol=1e-2, atol=1e-2):
        return 1.0 + weight
    return probe


def _copyable_tensors(layer) -> dict[str, torch.Tensor]:
    """A target layer's tensors under the draft layer's names; norms as their effective scale."""
    gemma = hasattr(layer, "pre_feedforward_layernorm")
    norms = {f"{name}.weight": module for name, module in layer.named_modules()
             if name.endswith("norm") and getattr(module, "weight", None) is not None}
    tensors = {}
    for name, param in layer.named_parameters():
        if gemma and name == "post_attention_layernorm.weight":
            continue  # scales the attention output, not the MLP input
        tensors[_GEMMA_NORMS.get(name, name) if gemma else name] = _norm_scale(norms[name]) if name in norms else param
    return tensors


def _check_attention_fits(draft_layer, source: dict, index: int, target) -> None:
    params = dict(draft_layer.named_parameters())
    misfits = [f"{name} {tuple(source[name].shape) if name in source else 'missing'} vs draft {tuple(params[name].shape)}"
               for name in _ATTENTION if name not in source or tuple(source[name].shape) != tuple(params[name].shape)]
    if misfits:
        raise DFlashLabError(
            f"draft.init_from_target_layers: target layer {index} ({target.config.model_type}, the last full-attention "
            f"layers) does not fit a draft layer: {'; '.join(misfits)} (e.g. Qwen3.5/Qwen3-Next gate their queries, "
            "so q_proj is twice as wide); set draft.init_from_target_layers: false")


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
    """The recipe's loss section as the objectives read it (every LossConfig field by its name)."""
    from dataclasses import fields

    return L.LossConfig(**{f.name: getattr(lcfg, f.name) for f in fields(L.LossConfig)})


def _load_source(target, data_path, dcfg, info: D.DistInfo, progress: bool = True):
    """The sample source: the token store of this data (built once per node, by local rank 0,
    memory-mapped, so a rank's memory does not grow with the dataset). Returns (store, stats)."""
    from dflash_lab.train.store import TokenStore

    store = TokenStore.open_or_build(data_path, target, dcfg.max_length, dcfg.min_supervised,
                                     root=dcfg.token_store, local_rank=info.local_rank,
                                     progress=progress and info.local_rank == 0)
    return store, store.stats


