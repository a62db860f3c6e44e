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

import os
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
