"""CLI: `dflash-lab prompts build --config MIX.yaml --out DIR [--strict] [--dry-run]` and `prompts stats DIR`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.outputs import add_output


def _is_prompt_set(folder: Path) -> bool:
    """A folder `prompts build` wrote (its manifest.json): rebuilding replaces that prompt set."""
    return (folder / "manifest.json").is_file()


def _build(args) -> int:
    from dflash_lab.data.mix import build_mix
    from dflash_lab.data.recipe import load_recipe
    recipe = load_recipe(args.config)
    if args.dry_run:
        cats = sorted({s.category for s in recipe.sources})
        print(f"recipe {args.config}: valid ({len(recipe.sources)} sources; categories {', '.join(cats)})")
        return 0
    if not args.out:
        raise DFlashLabError("prompts build needs --out DIR (the folder for prompts.jsonl and manifest.json)")
    t0 = time.perf_counter()
    man = build_mix(Path(args.config), Path(args.out), strict=args.strict)
    dt = time.perf_counter() - t0
    c = man["counts"]
    print(
        f"wrote {man['output']['rows']} prompts to {Path(args.out) / man['output']['path']} "
        f"(read {c['read']}, removed {sum(c['removed'].values())}: "
        + ", ".join(f"{k} {v}" for k, v in c["removed"].items() if v)
        + f") in {dt:.1f}s"
    )
    if man["rejects"]["rows"]:
        print(f"{man['rejects']['rows']} malformed rows listed in {Path(args.out) / man['rejects']['path']}")
    for s in man["shortfalls"]:
        print(f"shortfall: {s['quota']} asked {s['asked']}, got {s['got']}", file=sys.stderr)
    return 0


def _stats(args) -> int:
    from dflash_lab.data.manifest import format_stats, load_manifest

    man = load_manifest(args.dir)
    if args.json:
        print(json.dumps(man["counts"], indent=2))
    else:
        sys.stdout.write(format_stats(man))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prompts", help="build and inspect prompt mixes")
    sub = p.add_subparsers(dest="prompts_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build", help="build a prompt set from a mix recipe (YAML)")
    b.add_argument("--config", required=True, help="mix recipe YAML (see docs/prompts.md)")
    add_output(b, "--out", kind="dir", command="prompts build", owned=lambda path, args: _is_prompt_set(path),
               force="--force", inputs=("config",), fix="choose a new --out folder",
               help="output folder: prompts.jsonl, manifest.json, ids.txt, rejects.jsonl")
    b.add_argument("--strict", action="store_true", help="stop at the first malformed row (names file and line)")
    b.add_argument("--dry-run", action="store_true", help="only parse and validate the recipe; read no data")
    b.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds other files (they stay; the set's own files are replaced)")
    b.set_defaults(handler=_build)

    s = sub.add_parser("stats", help="print a prompt set's manifest as a table")
    s.add_argument("dir", help="a prompt set folder (or its manifest.json)")
    s.add_argument("--json", action="store_true", help="print the counts as JSON")
    s.set_defaults(handler=_stats)
