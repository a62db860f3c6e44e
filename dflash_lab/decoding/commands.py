"""`dflash-lab generate`: one response, plain or speculative (lossless), greedy or sampled."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generation, plain or speculative (lossless): greedy or sampled")
    gen.add_argument("--target", required=True)
    gen.add_argument("--draft", default=None, help="DFlash draft directory")
    gen.add_argument("--drafter", choices=["dflash", "prompt-lookup", "none"], default=None,
                     help="default: dflash with --draft, else none (plain greedy)")
    gen.add_argument("--prompt", required=True, help="the user message (rendered with the chat template, thinking off)")
    gen.add_argument("--raw", action="store_true", help="use --prompt as is, without the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--block-size", type=int, default=16, help="prompt-lookup block size")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy (default); > 0 samples (the draft proposes its argmax block, the target "
                     "verifies by speculative sampling: the output is distributed as plain sampling)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, printed with --json)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto = bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--device", default="auto", help="cpu or cuda[:i] (default: cuda when available)")
    gen.add_argument("--json", action="store_true", help="print a JSON object instead of the text")
    gen.set_defaults(handler=_generate)


def _generate(args) -> int:
    from dflash_lab.decoding.drafters import make_drafter
    from dflash_lab.decoding.sampling import SamplingParams
    from dflash_lab.decoding.speculative import speculative_generate
    from dflash_lab.errors import DFlashLabError
    from dflash_lab.models.checkpoint import load_draft
    from dflash_lab.models.target import load_target, resolve_placement

    kind = args.drafter or ("dflash" if args.draft else "none")
    if kind == "dflash" and not args.draft:
        raise DFlashLabError("--drafter dflash needs --draft DIR (a DFlash draft checkpoint)")
    if args.max_new_tokens < 1:
        raise DFlashLabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    device, dtype = resolve_placement(args.device, args.dtype)
    target = load_target(args.target, dtype=dtype, device=device)
    draft = load_draft(args.draft, target, device=target.device) if kind == "dflash" else None
    drafter = make_drafter(kind, target=target, draft=draft, block_size=args.block_size)
    prompt_ids = target.encode(args.prompt) if args.raw else target.encode_prompt([{"role": "user", "content": args.prompt}])
    result = speculative_generate(target, drafter, prompt_ids, args.max_new_tokens, target.stop_token_ids,
                                  sampling=sampling)
    if args.json:
        print(json.dumps({
            "text": target.decode(result.output_ids),
            "output_ids": result.output_ids,
            "cycle_acceptance": result.cycle_acceptance,
            "tau_pooled": result.tau,
            "wall_s": result.wall_s,
            "num_prompt_tokens": result.num_prompt_tokens,
            "finish_reason": result.finish_reason,
            "drafter": kind,
            "sampling": result.extra.get("sampling"),  # null = greedy; else temperature, top_p, top_k, seed
        }))
    else:
        print(target.decode(result.output_ids))
        print(f"[{len(result.output_ids)} tokens, {len(result.cycle_acceptance)} verify cycles, "
              f"tau {result.tau:.2f}, {result.wall_s:.2f} s]", file=sys.stderr)
    return 0
