"""Where llama.cpp's greedy labels differ from our fp32 model's, and by how much (not a test).

    PYTHONPATH=. python bench/label_near_ties.py --prompts DEMO_OUT/prompts --n 48 --new-tokens 96 [--f32-kv]

Generates with the in-process llama.cpp server (F32 GGUF, one request at a time), then runs our fp32
target once per prompt, teacher-forced on llama.cpp's tokens, and prints the first position where
our argmax differs, with the logit gap between our top token and llama.cpp's. Small gaps are
near-ties of floating-point arithmetic, not a wrong engine. `--f32-kv` gives llama.cpp an F32 KV
cache (its default is F16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True, help="a prompt-set folder (prompts.jsonl)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--f32-kv", action="store_true")
    args = ap.parse_args()
    import torch

    from dflash_lab.eval import llamacpp as L
    from dflash_lab.models import embedded
    from dflash_lab.models.target import load_target

    with open(Path(args.prompts) / "prompts.jsonl") as handle:
        rows = [json.loads(line) for line in handle][: args.n]
    target = load_target(args.target)
    if args.f32_kv:
        make_params = L._params

        def f32_kv_params(cfg, port):
            params = make_params(cfg, port)
            kv = L.require_xllamacpp().ggml_type.GGML_TYPE_F32
            params.cache_type_k, params.cache_type_v = kv, kv
            return params

        L._params = f32_kv_params
    generated = []
    with L.LlamaServer(L.EngineConfig(model=embedded.gguf_path(args.target, "f32"))) as url:
        for row in rows:
            ids = target.encode_prompt(row["messages"])
            generated.append((ids, L.post_completion(url, ids, args.new_tokens)["output_ids"]))
    diverging = 0
    for k, (ids, gen) in enumerate(generated):
        with torch.no_grad():
            logits = target.model(torch.tensor([ids + gen])).logits[0, len(ids) - 1: len(ids) - 1 + len(gen)]
        ours = logits.argmax(-1)
        for j, token in enumerate(gen):
            if int(ours[j]) != token:
                gap = float(logits[j, ours[j]] - logits[j, token])
                print(json.dumps({"prompt": k, "token": j, "ours": int(ours[j]), "llamacpp": token, "logit_gap": gap}))
                diverging += 1
                break
    print(f"{diverging} of {len(generated)} prompts diverge")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
