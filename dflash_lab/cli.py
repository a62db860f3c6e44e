"""The `dflash-lab` command. Subcommands are thin: each module below registers its own parsers
and calls into its package. A handler returns an exit status (or None for 0)."""

from __future__ import annotations

import argparse
import importlib
import sys

from dflash_lab import __version__
from dflash_lab.errors import DFlashLabError
from dflash_lab.outputs import check_declared_outputs
from dflash_lab.validate import check_common_args

# Each module has `register(subparsers)`; order is the order `--help` lists them.
COMMAND_MODULES = [
    "dflash_lab.models.commands",  # models fetch, draft init|export
    "dflash_lab.decoding.commands",  # generate
    "dflash_lab.data.commands",  # prompts build|stats
    "dflash_lab.labels.commands",  # label, labels audit, serve-cmd
    "dflash_lab.train.commands",  # train
    "dflash_lab.plan.commands",  # plan
    "dflash_lab.eval.commands",  # eval, eval-run, runs
    "dflash_lab.report_commands",  # report
    "dflash_lab.demo",  # demo
    "dflash_lab.engines.commands",  # engines install|status
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-lab",
        description="Train, evaluate and track DFlash draft models for lossless speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"dflash-lab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that dotted overrides (`section.key=value`) may stand anywhere on the
    line, also between options: argparse takes the positional list only once."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):
        overrides = [x for x in extra if not x.startswith("-") and "=" in x and "." in x.split("=", 1)[0]]
        others = [x for x in extra if x not in overrides]
        args.overrides = list(args.overrides or []) + overrides
        extra = others
    if extra:
        hint = (" (overrides are section.key=value, e.g. train.lr=1e-3)"
                if hasattr(args, "overrides") else "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        check_declared_outputs(args)  # the output rule, before any work (dflash_lab/outputs.py)
        check_common_args(args)  # --device names, --server URL syntax (dflash_lab/validate.py)
        status = args.handler(args)
    except DFlashLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The machine said no (permissions, a full disk, a vanished path): name the path, no
        # traceback. An OSError without a path is not about an input and keeps its traceback.
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}; check the path, its permissions and the free "
              "disk space", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
