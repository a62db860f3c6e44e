"""Where one training step spends its time, and how far it is from the matmul rate (issue 13).

    python bench/profile_step.py --max-slot 4                       # the demo's stage-1 step, synthetic text
    python bench/profile_step.py --labels DEMO_OUT/labels --max-slot 4 --loss survival-eal
    python bench/profile_step.py --max-slot 4 --table               # plus torch.profiler's op table
    python bench/profile_step.py --json OUT.json ...                # the figures, machine-readable
    python bench/profile_step.py --max-slot 4 --whole-run           # plus a whole `train` run's step

`--whole-run` (issue 23 item 6): the step users get. It runs the real `dflash-lab train` on the CPU
recipe (`--recipe`) with loss kd, max_slot, micro-batch 2, 48 anchors, one thread, over synthetic
chat labels: once to fill the feature cache, then 10 steps and 2 steps; (t10 - t2) / 8 is the
whole run's per-step wall time (data, logging, metrics, synchronisation and Python included), also
divided by the micro-batches per step to compare with the isolated step (one micro-batch). Both
are also given in CPU seconds (one thread), which a machine shared with other jobs disturbs less.

The step is the trainer's own code: `FeatureSource` (target forward), `forward_batch` (draft
forward, vocabulary stage, loss) and backward, then AdamW, for a 1-layer draft (`--layers`) on the
embedded target (`--target`) over `--seqs` sequences x `--anchors` anchors. Parts are timed by
wrapping the draft module and `losses.slot_statistics` (the names every version of the trainer
calls), so the same script measures an older checkout too (run it with PYTHONPATH pointing there).

Prints, as the median of `--steps` warm steps: target forward, draft forward, vocabulary stage,
the rest of forward_batch, backward, optimizer; the step with a warm feature cache (everything but
the target forward, what the demo's steps cost after the first epoch) and with the target; the
step's FLOPs (torch.utils.flop_counter.FlopCounterMode), the matmul rate measured in the same run
on the head's shape, and the ratio step time / (FLOPs / rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Accumulates wall seconds (`parts`) and this process's CPU seconds (`cpu`) per part for one
    step. CPU time survives a machine shared with other jobs better than wall time (one thread)."""

    def __init__(self, device):
        self.device, self.parts, self.cpu = device, {}, {}

    def timed(self, name, fn, *args, **kwargs):
        _sync(self.device)
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        _sync(self.device)
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return out


class _TimedDraft(torch.nn.Module):
    def __init__(self, draft, clock):
        super().__init__()
        self.inner, self.clock = draft, clock

    def forward(self, *args, **kwargs):
        return self.clock.timed("draft forward", self.inner, *args, **kwargs)


def synthetic_samples(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    from dflash_lab.train.data import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(100, vocab, (prompt + response,), generator=g).tolist()
        out.append(Sample(id=f"syn{i}", category="chat", input_ids=ids, loss_mask=[0] * prompt + [1] * response))
    return out


def matmul_rate(m: int, k: int, n: int, device, dtype=torch.float32, reps: int = 5) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul (best of `reps`)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def whole_run(recipe: str, max_slot, anchors: int, records: int = 48) -> dict:
    """Per-step wall time of a whole `dflash-lab train` run with a warm feature cache (see the docstring)."""
    import random
    import tempfile
    from pathlib import Path

    from dflash_lab.cli import main as cli
    from dflash_lab.testing import write_jsonl

    words = "the quick brown fox jumps over lazy dog add return step answer boxed sky blue river stone".split()
    rng = random.Random(0)
    rows = [{"id": f"s{i}", "category": "chat", "source": "bench",
             "messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(40))},
                          {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(90))}],
             "response_tokens": 96, "finish_reason": "stop"} for i in range(records)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jsonl(root / "labels" / "shard-00000.jsonl", rows)
        (root / "labels" / "meta.json").write_text('{"kind": "labels"}')

        def run(name: str, steps: int) -> tuple[float, float]:
            argv = ["train", "--config", recipe, "--data", str(root / "labels"), "--out", str(root / name),
                    "--no-progress", "loss.name=kd", f"loss.max_slot={max_slot or 'null'}", "train.micro_batch=2",
                    f"data.num_anchors={anchors}", "train.cpu_threads=1", f"data.feature_cache={root}/cache",
                    "data.heldout=0", "train.eval_interval=0", "train.save_every=0", f"train.max_steps={steps}",
                    "registry.db=null"]
            t0, c0 = time.perf_counter(), time.process_time()
            if cli(argv) != 0:
                raise SystemExit(f"train failed: {argv}")
            return time.perf_counter() - t0, time.process_time() - c0

        run("warm", 10)  # fills the feature cache
        (t10, c10), (t2, c2) = run("r10", 10), run("r2", 2)
        schedule = json.loads((root / "r10" / "run.json").read_text())["schedule"]
    per_step, cpu_per_step = (t10 - t2) / 8, (c10 - c2) / 8
    micro_steps = schedule["grad_accum"]
    return {"step_s": per_step, "micro_batches_per_step": micro_steps, "per_micro_batch_s": per_step / micro_steps,
            "step_cpu_s": cpu_per_step, "per_micro_batch_cpu_s": cpu_per_step / micro_steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", default=None, help="a labelled dataset (default: synthetic sequences)")
    parser.add_argument("--prompt-tokens", type=int, default=80, help="synthetic: prompt length")
    parser.add_argument("--response-tokens", type=int, default=96, help="synthetic: response length (the demo's cap)")
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--max-slot", type=int, default=None)
    parser.add_argument("--loss", default="kd")
    parser.add_argument("--eal-mode", default="greedy")
    parser.add_argument("--anchors", type=int, default=48)
    parser.add_argument("--seqs", type=int, default=2)
    parser.add_argument("--chunk-slots", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--table", action="store_true", help="also print torch.profiler's op table")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--whole-run", action="store_true", help="also time a whole `train` run's step")
    parser.add_argument("--recipe", default="recipes/smollm2-135m/cpu.yaml", help="--whole-run: the recipe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target
    from dflash_lab.train import losses as L
    from dflash_lab.train.trainer import FeatureSource, forward_batch

    target = load_target(args.target, dtype="float32")
    if device.type != "cpu":
        target.model.to(device)
    if args.labels:
        from dflash_lab.train.data import read_records, tokenize_records

        samples, _ = tokenize_records(target, read_records(args.labels), 384, 2)
    else:
        samples = synthetic_samples(args.seqs, args.prompt_tokens, args.response_tokens, target.vocab_size)
    batch = samples[:args.seqs]
    cfg = build_draft_config(target, num_layers=args.layers, block_size=16, mask_token_id=16)
    draft = DFlashDraftModel(cfg).init_weights(0).to(device)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    clock = _Clock(device)
    timed_draft = _TimedDraft(draft, clock)
    original_stats = L.slot_statistics

    def timed_stats(*a, **k):
        return clock.timed("vocabulary stage", original_stats, *a, **k)

    L.slot_statistics = timed_stats  # forward_batch calls L.slot_statistics
    loss_cfg = L.LossConfig(name=args.loss, gamma=7.0, eal_mode=args.eal_mode)
    kw = dict(num_anchors=args.anchors, loss_cfg=loss_cfg, chunk_slots=args.chunk_slots, max_slot=args.max_slot,
              device=device)
    source = FeatureSource(target, cfg.target_layer_ids, True, None, device)

    def step(seed: int):
        feats = clock.timed("target forward", source.get, batch)
        loss, stats = clock.timed("forward_batch", forward_batch, timed_draft, cfg, target, feats, batch,
                                  [seed + i * 100 for i in range(len(batch))], **kw)
        clock.timed("backward", loss.backward)
        clock.timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        return stats

    stats = step(0)  # warm-up
    rows, cpu_rows = [], []
    for i in range(args.steps):
        clock.parts, clock.cpu = {}, {}
        step(i + 1)
        for out, timed in ((rows, clock.parts), (cpu_rows, clock.cpu)):
            p = dict(timed)
            p["rest of forward_batch"] = p.pop("forward_batch") - p["draft forward"] - p["vocabulary stage"]
            out.append(p)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    warm = sum(v for k, v in med.items() if k != "target forward")
    full = warm + med["target forward"]
    warm_cpu = statistics.median(sum(v for k, v in r.items() if k != "target forward") for r in cpu_rows)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(99)
    flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter_t:
        source.get(batch)
    flops_target = counter_t.get_total_flops()
    scored = int(stats["valid_slots"])
    rate = matmul_rate(max(scored, 64), cfg.hidden_size, target.vocab_size, device)
    ideal_warm, ideal_full = (flops - flops_target) / rate, flops / rate

    print(f"{args.seqs} sequences x {args.anchors} anchors, max_slot {args.max_slot}, loss {args.loss}, "
          f"{scored} scored slots, {args.threads} thread(s), device {device}; median of {args.steps} steps")
    order = ["target forward", "draft forward", "vocabulary stage", "rest of forward_batch", "backward", "optimizer"]
    for k in order:
        print(f"  {k:24s} {med[k]:7.3f} s  {100 * med[k] / full:5.1f}% of the step with target, "
              f"{'' if k == 'target forward' else f'{100 * med[k] / warm:5.1f}% with a warm cache'}")
    print(f"  step, feature cache warm {warm:7.3f} s   FLOPs {(flops - flops_target) / 1e9:.2f} G   "
          f"CPU {warm_cpu:.3f} s")
    print(f"  step with target forward {full:7.3f} s   FLOPs {flops / 1e9:.2f} G")
    print(f"  matmul rate ([{max(scored, 64)}, {cfg.hidden_size}] x [{cfg.hidden_size}, {target.vocab_size}] fp32) "
          f"{rate / 1e9:.1f} GFLOP/s")
    print(f"  step time / (FLOPs / rate): {warm / ideal_warm:.2f} (cache warm), {full / ideal_full:.2f} (with target)")
    whole = whole_run(args.recipe, args.max_slot, args.anchors) if args.whole_run else None
    if whole:
        print(f"  whole train run: {whole['step_s']:.3f} s per step of {whole['micro_batches_per_step']} micro-batches, "
              f"{whole['per_micro_batch_s']:.3f} s per micro-batch ({whole['per_micro_batch_s'] / warm:.2f}x the "
              f"isolated warm step); CPU {whole['per_micro_batch_cpu_s']:.3f} s per micro-batch "
              f"({whole['per_micro_batch_cpu_s'] / warm_cpu:.2f}x the isolated step's CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parts_s": med, "step_warm_s": warm, "step_warm_cpu_s": warm_cpu, "step_full_s": full, "flops_warm": flops - flops_target,
                       "flops_full": flops, "matmul_flops_per_s": rate, "ratio_warm": warm / ideal_warm,
                       "ratio_full": full / ideal_full, "scored_slots": scored, "whole_run": whole,
                       "args": vars(args)}, f, indent=2)
    if args.table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(7)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=16,
                                                                max_name_column_width=24, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
