"""How far apart vLLM's bf16 kernels put the same token's log-prob on a hybrid target (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/vllm_bf16_ties.py [--family qwen3_next] [--seeds 0,1]
        [--prompts 8] [--new-tokens 32] [--ssm-dtype auto|float32] [--json out.json]

The tolerance of `eval --backend vllm`'s lossless check in bf16 (`vllm_engine.VLLM_TIE_TOLERANCE`)
comes from here. Per seed: a tiny random target of the family (`tiny_target_dir`, hidden 128, 2
heads, as tests/integration/test_vllm_families.py), a random 1-layer draft (`draft init`), and two
vLLM servers in bf16 (its CPU Gated DeltaNet kernel runs only in bf16), with the draft and without.
Measured per prompt:
- plain decoding (a token per forward) with the top-2 log-probs of every step;
- the same tokens scored by the plain server's prefill (`prompt_logprobs`, top 2): two bf16 kernels
  computing the same logits. |decode margin - prefill margin| is the rounding noise on a top-2
  margin; a verify of a drafted block is a many-token forward like the prefill;
- the speculative output's first token that differs from plain decoding, plain's top-2 margin
  there, and the speculative token's rank among plain's best 20 and its gap to the first place
  (what the lossless check classifies).
Also: the share of all plain decoding steps whose margin is below each candidate tolerance (how
often a wrong runner-up would be waved through as a tie).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = dict(hidden=128, heads=2, kv_heads=1)
CANDIDATES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def prefill_top2(url: str, prompt: list[int], output: list[int]) -> list[list[tuple[int, float]]]:
    """Per output position, the prefill's two best (token, log-prob) and the given token's."""
    from dflash_lab.eval.backends import _post_json

    body = {"prompt": prompt + output, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    scored = _post_json(url.rstrip("/") + "/v1/completions", body, 600.0)["choices"][0]["prompt_logprobs"]
    rows = []
    for position in range(len(prompt), len(prompt) + len(output)):
        entries = scored[position]
        rows.append(sorted(((int(k), float(v["logprob"])) for k, v in entries.items()), key=lambda kv: -kv[1]))
    return rows


def one_seed(family: str, seed: int, prompts: list[list[int]], new_tokens: int, work: Path,
             extra: list[str]) -> dict:
    from dflash_lab.cli import main
    from dflash_lab.eval import vllm_engine as V
    from dflash_lab.eval.backends import first_difference
    from dflash_lab.testing import tiny_target_dir

    target_dir = tiny_target_dir(work / f"target-{seed}", kind=family, seed=seed, **SIZES)
    draft = work / f"draft-{seed}"
    assert main(["draft", "init", "--target", str(target_dir), "--num-layers", "1", "--out", str(draft)]) == 0
    common = dict(target=target_dir, dtype="bfloat16", max_model_len=512, extra_args=extra)
    with V.VllmServer(V.VllmServerConfig(draft=draft, num_speculative_tokens=15, **common), progress=False) as url:
        spec = [V.post_completion(url, ids, new_tokens)["output_ids"] for ids in prompts]
    noise, plain_margins, mismatches = [], [], []
    with V.VllmServer(V.VllmServerConfig(**common), progress=False) as url:
        for ids, spec_ids in zip(prompts, spec):
            plain_ids, top2 = V.plain_top2(url, ids, new_tokens, 20)
            prefill = prefill_top2(url, ids, plain_ids)
            for step, pre in zip(top2, prefill):
                if len(step) >= 2 and len(pre) >= 2:
                    decode_margin = step[0][1] - step[1][1]
                    plain_margins.append(decode_margin)
                    noise.append(abs(decode_margin - (pre[0][1] - pre[1][1])))
            index = first_difference(spec_ids, plain_ids)
            if index is not None and index < len(top2) and len(top2[index]) >= 2:
                step = top2[index]
                spec_lp = dict(step).get(spec_ids[index]) if index < len(spec_ids) else None
                mismatches.append({"index": index, "margin": round(step[0][1] - step[1][1], 4),
                                   "rank": [t for t, _ in step].index(spec_ids[index]) + 1 if spec_lp is not None
                                   else None,
                                   "gap": None if spec_lp is None else round(step[0][1] - spec_lp, 4)})
    return {"seed": seed, "noise": noise, "plain_margins": plain_margins, "mismatches": mismatches}


def summarise(runs: list[dict]) -> dict:
    noise = sorted(x for r in runs for x in r["noise"])
    margins = [x for r in runs for x in r["plain_margins"]]
    mismatches = [m for r in runs for m in r["mismatches"]]
    return {
        "positions": len(noise),
        "margin_noise": {"median": round(statistics.median(noise), 4),
                         "p99": round(noise[int(0.99 * (len(noise) - 1))], 4), "max": round(noise[-1], 4)},
        "mismatch_margins": sorted(m["margin"] for m in mismatches),
        "mismatch_spec_rank_gap": sorted((m["rank"], m["gap"]) for m in mismatches if m["gap"] is not None),
        "mismatch_spec_not_in_top20": sum(m["gap"] is None for m in mismatches),
        "responses_differing": len(mismatches),
        "plain_margin_share_below": {str(t): round(sum(m <= t for m in margins) / len(margins), 4)
                                     for t in CANDIDATES},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_next")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--ssm-dtype", default="auto", help="vLLM --mamba-ssm-cache-dtype (auto: the model's dtype)")
    args = ap.parse_args()
    from dflash_lab.eval.draft_check import CHECK_PROMPTS
    from dflash_lab.models.target import load_target

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            from dflash_lab.testing import tiny_target_dir

            probe = load_target(str(tiny_target_dir(Path(tmp) / f"probe-{seed}", kind=args.family, seed=seed,
                                                    **SIZES)))
            prompts = [probe.encode_prompt([{"role": "user", "content": t}]) for t in CHECK_PROMPTS[:args.prompts]]
            extra = [] if args.ssm_dtype == "auto" else ["--mamba-ssm-cache-dtype", args.ssm_dtype]
            runs.append(one_seed(args.family, seed, prompts, args.new_tokens, Path(tmp), extra))
            print(json.dumps({"seed": seed, **summarise(runs[-1:])}), flush=True)
    summary = {"family": args.family, "seeds": args.seeds, "ssm_dtype": args.ssm_dtype, **summarise(runs)}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
