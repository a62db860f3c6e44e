"""The DFlash trainer: one process or `torchrun`, CPU or GPU.

    dflash-lab train --config recipes/smollm2-135m/cpu.yaml --data labels/ --out runs/cpu
    torchrun --nproc-per-node 8 -m dflash_lab train --config recipes/qwen3-4b/m1.yaml --data labels/ --out runs/m1

Each optimizer step takes `global_batch` sequences (micro_batch per rank x world x grad_accum):
the frozen target gives the features (online, or from the feature cache), every sequence gets
`num_anchors` fresh anchors, all its blocks go through the draft in one forward with the block
attention of `blocks.py`, and the loss of `losses.py` is averaged over the sequences of the
global batch. Everything random is a pure function of (seed, epoch, step, slot in the batch):
the epoch order, the anchors, the held-out anchors. With the optimizer state restored, a resumed
run therefore repeats the interrupted one exactly, and the batch layout over ranks does not
change the result.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text
from dflash_lab.train import blocks as B
from dflash_lab.train import distributed as D
from dflash_lab.train import losses as L
from dflash_lab.train import state as S
from dflash_lab.train.data import FeatureCache, Sample, manifest_sha256, read_records, split_heldout, tokenize_records
from dflash_lab.train.recipe import Recipe, load_recipe, parse_recipe, recipe_to_yaml, resolve_batch


# -- schedule --------------------------------------------------------------------------------------
def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = math.ceil(total_steps * warmup_ratio)
    min_lr = base_lr * min_lr_ratio
    if step < warmup:  # 1) linear warmup from base_lr/warmup up to base_lr
        return base_lr * (step + 1) / warmup
    if step >= total_steps:  # 3) past the end: the floor
        return min_lr
    # 2) cosine decay from base_lr (first step after warmup) towards min_lr (at total_steps)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mix_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


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
class FeatureSource:
    """Target features [S, n*H] and, when the loss needs p_k, the final hidden states [S, H]
    (after the target's final norm; lm_head of it = the target's logits), per sample."""

    def __init__(self, target, layer_ids, need_final: bool, cache: FeatureCache | None, device):
        self.target, self.layer_ids, self.need_final, self.cache, self.device = target, layer_ids, need_final, cache, device

    @torch.no_grad()
    def _run(self, samples: list[Sample]):
        model = self.target.model
        if self.device.type == "cuda" and len(samples) > 1:  # batched, right-padded (causal: exact)
            ids = B.pad_sequences([torch.tensor(s.input_ids) for s in samples]).to(self.device)
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
            final = out.hidden_states[-1]
            return [(feats[j, : len(s.input_ids)], final[j, : len(s.input_ids)]) for j, s in enumerate(samples)]
        result = []
        for s in samples:
            ids = torch.tensor([s.input_ids], device=self.device)
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
            result.append((feats[0], out.hidden_states[-1][0]))
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
def forward_batch(draft_module, draft_cfg, target, features, samples, anchor_seeds, *, num_anchors, loss_cfg,
                  attention="auto", anchor_chunk=64, chunk_slots=1024, device=torch.device("cpu"),
                  autocast_dtype=None, max_slot=None):
    """Loss summed over the sequences (each sequence's own normalised loss) and metric sums.
    `max_slot`: score only slots 1..max_slot (the others count as invalid)."""
    bsz = draft_cfg.block_size
    items = []
    for s, seed in zip(samples, anchor_seeds):
        ids = torch.tensor(s.input_ids)
        mask = torch.tensor(s.loss_mask)
        gen = torch.Generator().manual_seed(seed)
        anchors = B.sample_anchors(mask, num_anchors, gen)
        block_ids, positions, labels, valid = B.build_blocks(ids, mask, anchors, bsz, draft_cfg.mask_token_id)
        items.append({"anchors": anchors, "block_ids": block_ids, "positions": positions, "labels": labels, "valid": valid})
    batch = {k: v.to(device) for k, v in B.collate_blocks(items, pad_id=draft_cfg.mask_token_id).items()}
    n, a = batch["anchors"].shape
    ctx = B.pad_sequences([f for f, _ in features])  # [N, S, n*H]
    s_max = ctx.shape[1]
    ctx_pos = torch.arange(s_max, device=device)[None].expand(n, s_max)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        with torch.no_grad():
            # fp32 like the draft's master weights: RoPE and norms in fp32, autocast runs the linears in bf16
            noise = target.embed(batch["block_ids"].view(n, a * bsz)).float()
        attn = B.make_attention(attention, batch["anchors"], bsz, anchor_chunk)
        hidden = draft_module(noise, batch["positions"].view(n, a * bsz), ctx, ctx_pos, attention=attn)
        hidden = hidden.view(n, a, bsz, -1)
        valid = batch["valid"]
        if max_slot is not None and max_slot < bsz - 1:
            valid = valid & (torch.arange(bsz, device=device) <= max_slot)
        h_sel = hidden[valid]  # only valid slots reach the (large) lm_head
        labels = batch["labels"][valid]
        t_rows = t_index = None
        if L.needs_target_logits(loss_cfg.name):
            final = B.pad_sequences([fin for _, fin in features])  # [N, S, H]
            seq_idx = torch.arange(n, device=device)[:, None, None].expand_as(valid)[valid]
            # flat index of position p+k-1 in [N*S]: slot k's target distribution lives there
            t_index = seq_idx * final.shape[1] + batch["positions"][valid] - 1
            t_rows = final.reshape(-1, final.shape[-1]).to(h_sel.dtype)
        ce, kl, overlap, correct = L.slot_statistics(h_sel, labels, target.lm_head, t_rows, chunk_slots,
                                                     target_index=t_index)
    ce_b, kl_b, ov_b, cor_b = (L.scatter_slots(x, valid) for x in (ce, kl, overlap, correct))
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    for i in range(n):
        rows = valid[i].any(dim=1)
        loss_sum = loss_sum + L.combine(loss_cfg, ce_b[i][rows], kl_b[i][rows], ov_b[i][rows], valid[i][rows])
    with torch.no_grad():
        has = valid.any(dim=2)
        taus = L.simulated_tau(cor_b.view(n * a, bsz), valid.view(n * a, bsz))[has.view(-1)]
        stats = {
            "correct_per_slot": (cor_b * valid).sum(dim=(0, 1)).double().cpu(),
            "valid_per_slot": valid.sum(dim=(0, 1)).double().cpu(),
            "tau_sum": float(taus.sum()), "blocks": float(taus.numel()),
            "kl_sum": float((kl_b * valid).sum()), "ce_sum": float((ce_b * valid).sum()),
            "block_tokens": float(n * a * bsz), "valid_slots": float(valid.sum()),
        }
    return loss_sum, stats


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
    updates = {}
    if max_steps is not None:
        updates["max_steps"] = max_steps
    if stop_after is not None:
        updates["stop_after"] = stop_after
    if updates:
        recipe = parse_recipe({**recipe.model_dump(mode="json"), "train": {**recipe.train.model_dump(mode="json"), **updates}})
    tcfg, dcfg, lcfg = recipe.train, recipe.data, recipe.loss
    world = D.env_world_size()
    micro, accum, global_batch = resolve_batch(recipe, world)

    if (out_dir / "run.json").exists() and not resume:
        if S.list_checkpoints(out_dir):
            raise DFlashLabError(f"--out {out_dir} already holds a run with checkpoints; pass --resume to continue it "
                                 "or choose a new directory")
    resume_from = S.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None and not (out_dir / "run.json").exists():
        raise DFlashLabError(f"--resume: no run in {out_dir} (no run.json, no checkpoints)")
    if resume_from is not None and resume_from.name == "final":
        return resume_from  # already finished

    info = D.DistInfo()
    device = _pick_device(tcfg.device, D.DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world))
    info = D.init_distributed(device.type)
    use_bf16 = tcfg.bf16 if tcfg.bf16 is not None else device.type == "cuda"
    autocast_dtype = torch.bfloat16 if use_bf16 else None

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
    records = read_records(data_path)
    samples, tok_stats = tokenize_records(target, records, dcfg.max_length, dcfg.min_supervised)
    train_set, heldout = split_heldout(samples, dcfg.heldout, dcfg.heldout_max, tcfg.seed)
    if len(train_set) < global_batch:
        raise DFlashLabError(
            f"data {data_path}: {len(train_set)} usable training sequences (of {len(records)} records; "
            f"{tok_stats.skipped_few_supervised} skipped with < {dcfg.min_supervised} supervised tokens) is fewer than "
            f"one global batch ({global_batch}); lower train.global_batch/micro_batch or add data"
        )
    steps_per_epoch = len(train_set) // global_batch
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)

    # draft
    from dflash_lab.models.checkpoint import load_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    parent = S.resolve_init(recipe.draft.init)
    if parent is not None:
        draft = load_draft(parent, target, dtype=torch.float32)
    else:
        cfg = build_draft_config(
            target, num_layers=recipe.draft.num_layers, block_size=recipe.draft.block_size,
            mask_token_id=recipe.draft.mask_token_id, target_layer_ids=recipe.draft.target_layer_ids,
            intermediate_size=recipe.draft.intermediate_size, rope_theta=recipe.draft.rope_theta,
            sliding_window=recipe.draft.sliding_window, layer_types=recipe.draft.layer_types,
        )
        draft = DFlashDraftModel(cfg).init_weights(tcfg.seed)
        if recipe.draft.init_from_target_layers:
            init_from_target_layers(draft, target)
    draft = draft.to(device=device, dtype=torch.float32).train()
    dcfg_draft = draft.config
    optimizer = torch.optim.AdamW(draft.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)

    step, epoch, epoch_step = 0, 0, 0
    best_tau = None
    budget_fixed = not tcfg.time_budget_s  # True once the schedule's length is decided
    if resume_from is not None:
        from safetensors.torch import load_file

        from dflash_lab.models.checkpoint import read_draft_config, read_tensors

        tensors = read_tensors(resume_from, read_draft_config(resume_from))
        draft.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        S.load_optimizer(optimizer, resume_from)
        st = S.read_trainer_state(resume_from)
        step, epoch, epoch_step = st["step"], st["data_position"]["epoch"], st["data_position"]["step_in_epoch"]
        best_tau = st.get("best_heldout_tau")
        if tcfg.time_budget_s and st.get("budget_fixed"):
            total_steps, budget_fixed = st["total_steps"], True
        S.set_rng_state(json.loads((resume_from / "rng.json").read_text()), load_file(str(resume_from / "rng.safetensors")))
    if epoch_step >= steps_per_epoch:
        epoch, epoch_step = epoch + 1, 0

    model = D.wrap_draft(draft, info, str(device))
    need_final = L.needs_target_logits(lcfg.name)
    cache = None
    if dcfg.feature_cache:
        cache = FeatureCache(dcfg.feature_cache, target.fingerprint, dcfg_draft.target_layer_ids, dcfg.feature_cache_dtype)
    features = FeatureSource(target, dcfg_draft.target_layer_ids, need_final, cache, device)
    loss_cfg = L.LossConfig(name=lcfg.name, alpha=lcfg.alpha, gamma=lcfg.gamma, eal_mode=lcfg.eal_mode, kl_weight=lcfg.kl_weight)
    fwd = dict(num_anchors=dcfg.num_anchors, loss_cfg=loss_cfg, attention=tcfg.attention, anchor_chunk=tcfg.anchor_chunk,
               chunk_slots=lcfg.chunk_slots, device=device, autocast_dtype=autocast_dtype)

    # run directory
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # stop_after is run control, not recipe: a resumed run must not stop again at the same step
        saved_recipe = parse_recipe({**recipe.model_dump(mode="json"),
                                     "train": {**recipe.train.model_dump(mode="json"), "stop_after": None}})
        atomic_write_text(out_dir / "config.yaml", recipe_to_yaml(saved_recipe))
        run = {
            "name": recipe.name or out_dir.name,
            "run_dir": str(out_dir),
            "recipe": saved_recipe.model_dump(mode="json"),
            "recipe_path": recipe_path or (str(config) if isinstance(config, (str, os.PathLike)) else None),
            "parent": str(parent.resolve()) if parent is not None else None,
            "data": {"path": str(Path(data_path).resolve()), "manifest_sha256": manifest_sha256(data_path),
                     "records": len(records), "train_sequences": len(train_set), "heldout_sequences": len(heldout),
                     "tokenize": tok_stats.as_dict()},
            "loss": recipe.loss.model_dump(mode="json"),
            "schedule": {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs": tcfg.epochs,
                         "global_batch": global_batch, "micro_batch": micro, "grad_accum": accum, "world_size": info.world_size,
                         "lr": tcfg.lr, "warmup_ratio": tcfg.warmup_ratio, "min_lr_ratio": tcfg.min_lr_ratio,
                         "time_budget_s": tcfg.time_budget_s},
            "target": target.describe(),
            "draft": dcfg_draft.to_json_dict(),
            "device": str(device), "bf16": use_bf16,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "status": "running",
        }
        if resume and (out_dir / "run.json").exists():
            old = json.loads((out_dir / "run.json").read_text())
            run["created"] = old.get("created", run["created"])
            run["parent"] = old.get("parent", run["parent"])
            run["recipe_path"] = old.get("recipe_path", run["recipe_path"])
            run["resumed_from"] = str(resume_from) if resume_from is not None else None
        atomic_write_text(out_dir / "run.json", json.dumps(run, indent=2) + "\n")
        _truncate_metrics(out_dir / "metrics.jsonl", step)
    D.barrier(info)
    if info.is_main and tok_stats.skipped_few_supervised and progress:
        print(f"[train] skipped {tok_stats.skipped_few_supervised} of {len(records)} records with fewer than "
              f"{dcfg.min_supervised} supervised tokens", file=sys.stderr)

    writer = None
    if info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=step if step else None)
        except Exception:  # tensorboard missing: metrics.jsonl still has everything
            writer = None

    def evaluate() -> float | None:
        """Simulated tau on the held-out split (fixed anchors), over all ranks."""
        if not heldout:
            return None
        model.eval()
        tau_sum, blocks = 0.0, 0.0
        with torch.no_grad():
            for j in range(info.rank, len(heldout), info.world_size):
                s = heldout[j]
                feats = features.get([s])
                _, st = forward_batch(draft, dcfg_draft, target, feats, [s], [_mix_seed(tcfg.seed, 424242, j)], **fwd)
                tau_sum += st["tau_sum"]
                blocks += st["blocks"]
        model.train()
        totals = D.all_reduce_sum(torch.tensor([tau_sum, blocks], dtype=torch.float64), info)
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def checkpoint(name: str, metrics: dict, epoch_end: bool) -> Path | None:
        nonlocal best_tau
        # `metrics` are the last step's: a held-out tau in them was measured on these very weights
        tau = metrics["heldout_tau"] if "heldout_tau" in metrics else evaluate()
        if tau is not None:
            metrics = {**metrics, "heldout_tau": tau}
            best_tau = tau if best_tau is None else max(best_tau, tau)
        path = out_dir / "checkpoints" / name
        if info.is_main:
            state = {"step": step, "epoch": epoch + 1, "epoch_end": epoch_end,
                     "total_steps": total_steps, "budget_fixed": budget_fixed, "data_position": {"epoch": epoch, "step_in_epoch": epoch_step},
                     "best_heldout_tau": best_tau, "metrics": metrics, "seed": tcfg.seed}
            S.save_checkpoint(path, draft, optimizer, state)
            if writer is not None and tau is not None:
                writer.add_scalar("eval/heldout_tau", tau, step)
            _append_metrics(out_dir / "metrics.jsonl", {"step": step, "event": "checkpoint", "name": name, **metrics})
            if name != "final":
                try:
                    best = S.best_checkpoint(out_dir)
                except DFlashLabError:
                    best = None
                S.prune_checkpoints(out_dir, tcfg.keep_last, protect=best)
        D.barrier(info)
        return path

    params = [p for p in draft.parameters() if p.requires_grad]
    last_metrics: dict = {}
    bar = None
    if info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    stop_at = tcfg.stop_after
    stopped_early = False
    budget_mark = None  # (time, step) where the step timing for train.time_budget_s starts
    while step < total_steps:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(_mix_seed(tcfg.seed, 17, epoch))).tolist()
        while epoch_step < steps_per_epoch and step < total_steps:
            t0 = time.perf_counter()
            lr = cosine_lr(step, total_steps, tcfg.lr, tcfg.warmup_ratio, tcfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch_idx = order[epoch_step * global_batch:(epoch_step + 1) * global_batch]
            agg = None
            loss_total = 0.0
            for acc_i in range(accum):
                first = (acc_i * info.world_size + info.rank) * micro
                slots = list(range(first, first + micro))
                micro_samples = [train_set[batch_idx[k]] for k in slots]
                seeds = [_mix_seed(tcfg.seed, step, k) for k in slots]
                feats = features.get(micro_samples)
                sync = contextlib.nullcontext() if (acc_i == accum - 1 or not info.enabled) else model.no_sync()
                with sync:
                    loss_sum, st = forward_batch(model, dcfg_draft, target, feats, micro_samples, seeds,
                                                 max_slot=lcfg.max_slot, **fwd)
                    (loss_sum * (info.world_size / global_batch)).backward()
                loss_total += float(loss_sum.detach())
                agg = st if agg is None else {k: agg[k] + st[k] for k in agg}
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.clip if tcfg.clip else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_step += 1
            if not budget_fixed and budget_mark is None:
                budget_mark = (time.perf_counter(), step)  # the first step pays warm-up costs: not timed
            elif not budget_fixed and step - budget_mark[1] >= 3:
                # the next three steps, averaged over ranks so that every rank decides the same length
                per_step = D.all_reduce_sum(torch.tensor([(time.perf_counter() - budget_mark[0]) / (step - budget_mark[1])],
                                                         dtype=torch.float64), info) / max(info.world_size, 1)
                total_steps = min(total_steps, max(step, int(tcfg.time_budget_s / float(per_step[0]))))
                budget_fixed = True
                if info.is_main:
                    run_json = json.loads((out_dir / "run.json").read_text())
                    run_json["schedule"]["total_steps"] = total_steps
                    atomic_write_text(out_dir / "run.json", json.dumps(run_json, indent=2) + "\n")
                if bar is not None:
                    bar.total = total_steps
                    bar.refresh()
            # metrics over all ranks
            vec = torch.cat([torch.tensor([loss_total, agg["tau_sum"], agg["blocks"], agg["block_tokens"], agg["valid_slots"],
                                           agg["kl_sum"], agg["ce_sum"]], dtype=torch.float64),
                             agg["correct_per_slot"], agg["valid_per_slot"]])
            vec = D.all_reduce_sum(vec, info)
            bsz = dcfg_draft.block_size
            correct, counts = vec[7:7 + bsz], vec[7 + bsz:]
            dt = time.perf_counter() - t0
            acc = (correct / counts.clamp_min(1)).tolist()
            last_metrics = {
                "loss": float(vec[0] / global_batch), "train_tau": float(vec[1] / max(vec[2], 1)),
                "ce": float(vec[6] / max(vec[4], 1)), "kl": float(vec[5] / max(vec[4], 1)),
                "lr": lr, "grad_norm": float(grad_norm), "step_s": dt,
                "sequences_per_s": global_batch / dt, "block_tokens_per_s": float(vec[3]) / dt,
                "acc_per_slot": [round(x, 5) for x in acc[1:]], "epoch": epoch + epoch_step / steps_per_epoch,
            }
            do_eval = tcfg.eval_interval and step % tcfg.eval_interval == 0
            if do_eval:
                tau = evaluate()
                if tau is not None:
                    last_metrics["heldout_tau"] = tau
            if info.is_main:
                if step % tcfg.log_every == 0 or do_eval:
                    _append_metrics(out_dir / "metrics.jsonl", {"step": step, **last_metrics})
                    if writer is not None:
                        for key in ("loss", "train_tau", "ce", "kl", "lr", "grad_norm", "sequences_per_s", "block_tokens_per_s", "heldout_tau"):
                            if key in last_metrics:
                                writer.add_scalar(("eval/" if key == "heldout_tau" else "train/") + key, last_metrics[key], step)
                        for k, a in enumerate(acc[1:], 1):
                            writer.add_scalar(f"acc/slot_{k:02d}", a, step)
                if bar is not None:
                    post = {"loss": f"{last_metrics['loss']:.3f}", "tau": f"{last_metrics['train_tau']:.2f}", "lr": f"{lr:.1e}"}
                    if "heldout_tau" in last_metrics:
                        post["eval_tau"] = f"{last_metrics['heldout_tau']:.2f}"
                    bar.set_postfix(post)
                    bar.update(1)
            saved = False
            if epoch_step == steps_per_epoch or step == total_steps:
                pass  # the epoch-end checkpoint is written below (after the position moves on)
            elif tcfg.save_every and step % tcfg.save_every == 0:
                checkpoint(f"step-{step}", dict(last_metrics), epoch_end=False)
                saved = True
            if epoch_step == steps_per_epoch and step < total_steps:
                checkpoint(f"step-{step}", dict(last_metrics), epoch_end=True)
                saved = True
            if stop_at is not None and step >= stop_at and step < total_steps:
                if not saved:
                    checkpoint(f"step-{step}", dict(last_metrics), epoch_end=epoch_step == steps_per_epoch)
                stopped_early = True
                break
        if stopped_early:
            break
        if epoch_step >= steps_per_epoch:
            epoch, epoch_step = epoch + 1, 0
    if bar is not None:
        bar.close()

    if stopped_early:
        result = S.latest_checkpoint(out_dir)
    else:
        epoch_end = epoch_step == 0 or epoch_step == steps_per_epoch
        if epoch_step == 0 and epoch > 0:
            epoch, epoch_step = epoch - 1, steps_per_epoch
        result = checkpoint("final", dict(last_metrics), epoch_end=epoch_end)
        if info.is_main:
            run = json.loads((out_dir / "run.json").read_text())
            run["status"] = "finished"
            run["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            run["best_checkpoint"] = str(S.best_checkpoint(out_dir))
            if cache is not None:
                run["feature_cache"] = {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses}
            atomic_write_text(out_dir / "run.json", json.dumps(run, indent=2) + "\n")
            db = db or recipe.registry.db
            if db:
                try:
                    from dflash_lab.registry import register_run
                except ImportError:
                    print("[train] dflash_lab.registry is not available; run not registered", file=sys.stderr)
                else:
                    register_run(out_dir, db=db)
    if writer is not None:
        writer.close()
    D.barrier(info)
    return result


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they are about to be recomputed)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))
