"""The output-path rule every command follows, in one place.

An output path that exists and holds something this command did not write for this same job is
refused before any long work starts, with a message that names the path and the fix. `force=True`
(a command's `--force`) lets the command replace it, never silently. A file where a folder is
expected, or a folder where a file is expected, is refused even with force: neither is what the
user meant. And no output may be one of the command's own inputs.

    from dflash_lab.outputs import check_output_dir, check_output_file, check_not_input

    check_output_dir(args.out, command="draft init", force=args.force)
    check_output_file(args.out, command="eval", owned=is_results_json)
    check_not_input([out / "prompts.jsonl"], source_files, flag="--out")

`owned(path) -> bool` says "this command wrote this for this same job" (a run directory to resume,
a label directory with matching meta.json, a results file of a previous eval): such a path passes.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from dflash_lab.errors import DFlashLabError

Owned = Callable[[Path], bool]


def _first_file_ancestor(path: Path) -> Path | None:
    """The first existing parent of `path` that is not a directory (a file, where a folder must be)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _describe(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refusal(flag: str, path: Path, held: str, command: str, fix: str, force_flag: str | None) -> DFlashLabError:
    force = f", or pass {force_flag} to replace it" if force_flag else ""
    return DFlashLabError(f"{flag} {path} already holds {held}, which `dflash-lab {command}` did not write for this "
                          f"job; nothing was changed: {fix}{force}")


def _check_parents(path: Path, flag: str) -> None:
    blocker = _first_file_ancestor(path)
    if blocker is not None:
        raise DFlashLabError(f"{flag} {path}: {blocker} is a file, not a folder; choose a path under a folder")


def check_output_dir(path: str | os.PathLike, *, command: str, flag: str = "--out", owned: Owned | None = None,
                     force: bool = False, force_flag: str | None = "--force",
                     fix: str = "choose a new directory") -> Path:
    """Check a folder a command is about to write into. Passes when it does not exist, is empty,
    is `owned` by this job, or `force` is set; else raises DFlashLabError. `force_flag` names the
    command's force option in the message (None when the command has none)."""
    path = Path(path).expanduser()
    _check_parents(path, flag)
    if path.exists() and not path.is_dir():
        raise DFlashLabError(f"{flag} {path} is a file; `dflash-lab {command}` writes a folder there: "
                             "pass a folder path (new or empty)")
    if not path.exists() or not any(path.iterdir()):
        return path
    if owned is not None and owned(path):
        return path
    if force:
        return path
    raise _refusal(flag, path, _describe(path), command, fix, force_flag)


def check_output_file(path: str | os.PathLike, *, command: str, flag: str = "--out", owned: Owned | None = None,
                      force: bool = False, force_flag: str | None = "--force",
                      fix: str = "choose a new file name", example: str = "results.json") -> Path:
    """Check a file a command is about to write. Passes when it does not exist, is `owned` by this
    job, or `force` is set; a folder at the path is always refused (the file would go nowhere)."""
    path = Path(path).expanduser()
    _check_parents(path, flag)
    if path.is_dir():
        raise DFlashLabError(f"{flag} {path} is a directory; `dflash-lab {command}` writes a file there: "
                             f"pass a file path, e.g. {path / example}")
    if not path.exists():
        return path
    if owned is not None and owned(path):
        return path
    if force:
        return path
    raise _refusal(flag, path, "a file", command, fix, force_flag)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike], *,
                    flag: str = "--out") -> None:
    """Refuse when a file the command will write is one of its inputs (also through links): writing
    it would destroy the input before it is read. Not overridable by force."""
    outs = [Path(o).expanduser() for o in outputs]
    for inp in inputs:
        inp = Path(inp).expanduser()
        for out in outs:
            if _same(out, inp) or out.resolve() == inp.resolve():
                raise DFlashLabError(f"{flag}: the output file {out} is also an input ({inp}); writing it would "
                                     f"destroy the input: choose an {flag} folder that holds none of the inputs")


# -- declared outputs ------------------------------------------------------------------------------
# Every option through which a command writes a path is declared with `add_output` instead of
# `add_argument`. The declaration travels with the parsed arguments (a parser default), and
# `dflash_lab.cli.main` calls `check_declared_outputs(args)` before any handler runs, so a command
# cannot write a path this rule has not seen. tests/integration/test_output_rule.py walks the parser
# and fails for an output-looking option (--out, --output, --to-dir, ...) that is not declared.

OUTPUTS_ATTR = "_declared_outputs"
OwnedBy = Callable[[Path, "argparse.Namespace"], bool]


@dataclass(frozen=True)
class OutputSpec:
    """One path a command writes. `kind` "dir" or "file"; `owned(path, args)` says the path holds
    this command's own earlier output for this job (resume, rerun); `force_dest` names the args
    attribute of the command's --force (None: no force); `inputs` the args attributes holding the
    command's input paths, which the output must not be nor (for a folder it may replace) contain."""
    dest: str
    flag: str
    kind: str
    command: str
    owned: OwnedBy | None = None
    force_dest: str | None = None
    inputs: tuple[str, ...] = ()
    fix: str = ""
    example: str = "results.json"


def add_output(parser: "argparse.ArgumentParser", flag: str, *, kind: str, command: str,
               owned: OwnedBy | None = None, force: str | None = None, inputs: tuple[str, ...] = (),
               fix: str | None = None, example: str = "results.json", **argparse_kwargs) -> "argparse.Action":
    """`parser.add_argument(flag, **argparse_kwargs)`, declaring the option as a path the command
    writes (a folder or a file) so the shared check runs on it before the command starts."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    action = parser.add_argument(flag, **argparse_kwargs)
    spec = OutputSpec(dest=action.dest, flag=flag, kind=kind, command=command, owned=owned,
                      force_dest=force and force.lstrip("-").replace("-", "_"), inputs=tuple(inputs),
                      fix=fix or ("choose a new directory" if kind == "dir" else "choose a new file name"),
                      example=example)
    action.output_spec = spec  # what the parser walk in the tests reads
    parser.set_defaults(**{OUTPUTS_ATTR: (*(parser.get_default(OUTPUTS_ATTR) or ()), spec)})
    return action


def _input_paths(spec: OutputSpec, args) -> list[Path]:
    paths = []
    for dest in spec.inputs:
        value = getattr(args, dest, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, os.PathLike)) and str(item) and Path(item).expanduser().exists():
                paths.append(Path(item).expanduser())
    return paths


def _inside(child: Path, folder: Path) -> bool:
    try:
        child.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output_inputs(spec: OutputSpec, path: Path, inputs: list[Path], owned: bool) -> None:
    """The output is not one of the inputs; a folder the command may replace holds none of them."""
    check_not_input([path], inputs, flag=spec.flag)
    if spec.kind != "dir" or owned or not path.is_dir():
        return
    for inp in inputs:
        if _inside(inp, path):
            raise DFlashLabError(f"{spec.flag} {path} holds the input {inp}; writing the folder would destroy it: "
                                 f"choose an {spec.flag} folder that holds none of the inputs")


def check_declared_output(spec: OutputSpec, args) -> Path | None:
    """Apply the output rule to one declared option of parsed `args` (None when it is not given)."""
    value = getattr(args, spec.dest, None)
    if value is None or value == "":
        return None
    path = Path(value).expanduser()
    force = bool(getattr(args, spec.force_dest, False)) if spec.force_dest else False
    force_flag = "--" + spec.force_dest.replace("_", "-") if spec.force_dest else None
    owned = None if spec.owned is None else (lambda p: spec.owned(p, args))
    is_owned = path.is_dir() and spec.kind == "dir" and owned is not None and owned(path)
    _check_parents(path, spec.flag)
    check_output_inputs(spec, path, _input_paths(spec, args), is_owned)
    if spec.kind == "dir":
        return check_output_dir(path, command=spec.command, flag=spec.flag, owned=owned, force=force,
                                force_flag=force_flag, fix=spec.fix)
    return check_output_file(path, command=spec.command, flag=spec.flag, owned=owned, force=force,
                             force_flag=force_flag, fix=spec.fix, example=spec.example)


def check_declared_outputs(args) -> None:
    """Every output the parsed command declared, checked before the command does any work."""
    for spec in getattr(args, OUTPUTS_ATTR, None) or ():
        check_declared_output(spec, args)
