"""llama.cpp vs our builtin loop on the same prompts and draft, and label throughput hf vs llama.cpp.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_llamacpp.py --draft RUN/checkpoints/final \
        [--prompts 6] [--max-new-tokens 64] [--json out.json]

Rows (one run, same machine): builtin (fp32 HF target), llama.cpp F32 GGUF, llama.cpp Q4_1 GGUF,
each with the DFlash draft and with prompt-lookup (llama.cpp: its n-gram drafter): tau pooled,
tokens/s with the drafter, greedy tokens/s in the same engine, speed vs greedy, lossless. Then the
label throughput of the same prompts: `hf` (batch 1) vs the in-process `llamacpp` backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_lab.eval.benchmarks import Benchmark, Sample  # noqa: E402
from dflash_lab.eval.harness import evaluate  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "Explain why the sky is blue in two sentences.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 7? Explain your steps.",
    "Write a Python function that reverses a string.",
]


def row(name, results):
    b = next(iter(results["benchmarks"].values()))
    return {"row": name, "tau_pooled": b["tau_pooled"], "tokens_per_s": b["tokens_per_s"],
            "greedy_tokens_per_s": b.get("greedy_tokens_per_s"), "speedup": b.get("speedup"),
            "lossless": b["lossless"], "generated_tokens": b["generated_tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", required=True)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    from dflash_lab.labels.runner import run_labels
    from dflash_lab.models.target import load_target
    from dflash_lab.testing import write_jsonl

    target = load_target(args.target)
    texts = PROMPTS[: args.prompts]
    bench = Benchmark(name="bench", samples=[Sample(id=str(i), index=i, turns=(t,)) for i, t in enumerate(texts)],
                      source="bench_llamacpp", selection="first", selected=True)
    rows = []
    for drafter in (args.draft, "prompt-lookup"):
        label = "dflash" if drafter == args.draft else "prompt-lookup"
        rows.append(row(f"builtin fp32 HF, {label}",
                        evaluate(target, drafter, [bench], max_new_tokens=args.max_new_tokens, progress=False)))
        for gguf in ("f32", "q4_1"):
            rows.append(row(f"llama.cpp {gguf} GGUF, {label}",
                            evaluate(target, drafter, [bench], max_new_tokens=args.max_new_tokens, progress=False,
                                     backend="llamacpp", gguf=gguf)))
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_jsonl(Path(tmp) / "p.jsonl", [
            {"id": f"q{i}", "category": "chat", "source": "bench", "messages": [{"role": "user", "content": t}]}
            for i, t in enumerate(texts)])
        for backend in ("hf", "llamacpp"):
            started = time.perf_counter()
            stats = run_labels(prompts, target if backend == "hf" else args.target, Path(tmp) / backend,
                               backend=backend, max_new_tokens=args.max_new_tokens, batch_size=1, progress=False)
            rows.append({"row": f"labels {backend}", "tokens_per_s": stats.tokens_per_s,
                         "wall_s": time.perf_counter() - started, "completion_tokens": stats.completion_tokens})
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
