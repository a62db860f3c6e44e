"""Benchmark the label backends (not a test). Results go in BENCHMARKS.md.

    python bench/bench_labels.py                      # both parts
    python bench/bench_labels.py --part hf --prompts 16 --new-tokens 64 --batch-sizes 1 8 16
    python bench/bench_labels.py --part openai --requests 3000 --concurrency 64
    python bench/bench_labels.py --part llamacpp --prompts 48 --new-tokens 96 [--demo-prompts DIR]

hf: tokens/s of the in-process backend on the embedded target (CPU), per batch size, and how many
records differ from the batch-size-1 run (batched padded attention may flip near-ties).
openai: requests/s the async client sustains against a loopback server (its own process) that answers
instantly, i.e. the client's own overhead (HTTP, JSON, journal writes, token counting, progress bar).
llamacpp: the demo's label step both ways, in one run: the first N prompts of the demo's prompt pack
(default preset sizes, seed 0, or a demo's own OUT/prompts), `hf` at the demo's batch size vs the
in-process `llamacpp` backend (F32 GGUF) at batch (parallel slots) 1 and the demo's, on one thread
and on two; tokens/s and how many texts differ from `hf`'s (near-ties of batched arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    ("math", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?"),
    ("math", "What is 17 * 23? Please reason step by step, and put your final answer within \\boxed{}."),
    ("math", "Solve for x: 3x + 7 = 22."),
    ("math", "A rectangle has a perimeter of 30 and a width of 5. What is its area?"),
    ("math", "Simplify (x^2 - 9) / (x - 3)."),
    ("math", "How many positive divisors does 36 have?"),
    ("code", "Write a Python function that checks whether a string is a palindrome."),
    ("code", "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
             "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n```"),
    ("code", "Write a function to find the maximum element of a list without using max()."),
    ("code", "Implement binary search in Python."),
    ("code", "Write a shell one-liner that counts lines in all .py files."),
    ("chat", "Explain why the sky is blue in simple words."),
    ("chat", "Write a short poem about autumn."),
    ("chat", "Give me three tips for better sleep."),
    ("chat", "What is the capital of Australia, and why is it not Sydney?"),
    ("chat", "Summarise the plot of Romeo and Juliet in two sentences."),
]


def write_prompts(path: Path, n: int) -> Path:
    from dflash_lab.testing import write_jsonl

    rows = [{"id": f"b{i:05d}", "category": PROMPTS[i % len(PROMPTS)][0], "source": "bench",
             "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)][1] + ("" if i < len(PROMPTS) else f" ({i})")}]}
            for i in range(n)]
    return write_jsonl(path, rows)


def bench_hf(args, tmp: Path) -> list[dict]:
    from dflash_lab.labels.runner import iter_records, run_labels
    from dflash_lab.models.target import load_target

    target = load_target(args.target)
    prompts = write_prompts(tmp / "hf.jsonl", args.prompts)
    results, reference = [], None
    for batch in args.batch_sizes:
        out = tmp / f"hf-b{batch}"
        stats = run_labels(prompts, target, out, backend="hf", max_new_tokens=args.new_tokens, batch_size=batch,
                           progress=True)
        texts = {r["id"]: r["messages"][-1]["content"] for r in iter_records(out)}
        reference = reference or texts
        differ = sum(texts[k] != reference[k] for k in reference)
        row = {"batch_size": batch, "prompts": stats.done, "tokens": stats.completion_tokens,
               "seconds": round(stats.seconds, 1), "tokens_per_s": round(stats.tokens_per_s, 1),
               "differ_from_batch1": differ}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def bench_openai(args, tmp: Path) -> dict:
    from dflash_lab.labels.runner import load_tokenizer_target, run_labels

    target = load_tokenizer_target(args.target)
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), "--model", target.name],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        prompts = write_prompts(tmp / "api.jsonl", args.requests)
        stats = run_labels(prompts, target, tmp / "api", backend="openai", servers=[url], max_new_tokens=64,
                           concurrency=args.concurrency, progress=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    row = {"requests": stats.done, "concurrency": args.concurrency, "seconds": round(stats.seconds, 2),
           "requests_per_s": round(stats.done / stats.seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def demo_prompt_rows(args, tmp: Path) -> list[dict]:
    from dflash_lab.data.demo_pack import build_demo_pack
    from dflash_lab.demo import PRESETS

    folder = Path(args.demo_prompts) if args.demo_prompts else None
    if folder is None:
        sizes = PRESETS["default"]
        folder = build_demo_pack(tmp / "demo-pack", sizes.n_math, sizes.n_code, sizes.n_chat, seed=0)
    with open(folder / "prompts.jsonl") as handle:
        return [json.loads(line) for line in handle][: args.prompts]


def bench_llamacpp(args, tmp: Path) -> list[dict]:
    from dflash_lab.demo import PRESETS
    from dflash_lab.labels.runner import iter_records, run_labels
    from dflash_lab.models.target import load_target
    from dflash_lab.testing import write_jsonl

    from dflash_lab.eval.llamacpp import target_gguf_for
    from dflash_lab.labels.backends import LlamaCppBackend

    batch = PRESETS["default"].label_batch_size
    prompts = write_jsonl(tmp / "demo.jsonl", demo_prompt_rows(args, tmp))
    target = load_target(args.target)
    gguf = target_gguf_for(args.target)
    results, reference = [], None
    # (backend, batch, llama.cpp threads): the backend's default is one thread; the last row is two
    for backend, size, threads in (("hf", batch, None), ("llamacpp", 1, 1), ("llamacpp", batch, 1),
                                   ("llamacpp", batch, 2)):
        out = tmp / f"{backend}-b{size}-t{threads}"
        engine = (LlamaCppBackend(gguf, args.new_tokens, threads=threads, parallel=size) if backend == "llamacpp"
                  else backend)
        stats = run_labels(prompts, target if backend == "hf" else args.target, out, backend=engine,
                           max_new_tokens=args.new_tokens, batch_size=size, progress=False)
        texts = {r["id"]: r["messages"][-1]["content"] for r in iter_records(out)}
        reference = reference or texts
        row = {"backend": backend, "batch_size": size, "threads": threads or torch_threads(),
               "prompts": stats.done, "tokens": stats.completion_tokens,
               "seconds": round(stats.seconds, 1), "tokens_per_s": round(stats.tokens_per_s, 1),
               "differ_from_hf": sum(texts[k] != reference[k] for k in reference)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["hf", "openai", "llamacpp", "all"], default="all")
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--demo-prompts", default=None, help="llamacpp part: a demo's OUT/prompts folder")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared box, 1 beats oversubscribed cores by ~4x)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}  "
          f"cpus {os.cpu_count()}  torch threads {torch.get_num_threads()}  python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("openai", "all"):
            bench_openai(args, Path(tmp))
        if args.part in ("hf", "all"):
            bench_hf(args, Path(tmp))
        if args.part in ("llamacpp", "all"):
            bench_llamacpp(args, Path(tmp))


if __name__ == "__main__":
    main()
