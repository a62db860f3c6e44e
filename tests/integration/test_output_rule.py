"""Issue 24 item 1: the output rule by construction.

This walks the real CLI parser. Every option that looks like an output (--out, --output, --to-dir,
...) must be declared with `dflash_lab.outputs.add_output`; every declared output is then run through
the real `main` and must refuse (exit 2, one `error:` line naming the path, nothing changed) an
existing foreign file or folder, a file/folder mix-up, and one of the command's own inputs. A new
command or a new output option is covered without anyone adding a case here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from dflash_lab.cli import build_parser, main

OUTPUT_LOOKING = re.compile(r"^--(out|output|outdir|out-dir|output-dir|to-dir|save-to|save-dir|dest|write-to)$")


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(path of names, parser) for every leaf subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _subcommands(sub, prefix + (name,))


COMMANDS = list(_subcommands(build_parser()))
DECLARED = [(names, parser, action) for names, parser in COMMANDS for action in parser._actions
            if getattr(action, "output_spec", None) is not None]


def _ident(case) -> str:
    names, _, action = case
    return " ".join(names) + " " + action.option_strings[0]


def _undeclared(commands) -> list[str]:
    return [" ".join(names) + " " + flag for names, parser in commands for action in parser._actions
            for flag in action.option_strings
            if OUTPUT_LOOKING.match(flag) and getattr(action, "output_spec", None) is None]


def test_a_new_command_with_a_plain_out_is_caught():
    """The walk itself: a command added with add_argument("--out") is reported, add_output is not."""
    from dflash_lab.outputs import add_output

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sub.add_parser("newcmd").add_argument("--out")
    add_output(sub.add_parser("good"), "--out", kind="dir", command="good")
    assert _undeclared(list(_subcommands(parser))) == ["newcmd --out"]


def test_every_output_looking_option_is_declared():
    undeclared = _undeclared(COMMANDS)
    assert not undeclared, f"outputs not declared with dflash_lab.outputs.add_output: {undeclared}"
    # the walk sees the commands that write (a walk that finds nothing would prove nothing)
    found = {" ".join(names) for names, _, _ in DECLARED}
    assert {"draft init", "draft export", "train", "eval", "eval-run", "label", "prompts build", "report",
            "demo"} <= found, found


def _base_argv(names, parser, skip: set[str], root: Path) -> list[str]:
    """The shortest command line that parses: a placeholder for every required option/positional."""
    argv = list(names)
    placeholder = str(root / "placeholder-does-not-exist")
    for action in parser._actions:
        if action.dest in skip or isinstance(action, argparse._HelpAction):
            continue
        if not action.required and action.option_strings:
            continue
        if not action.option_strings and action.nargs in ("*", "?"):
            continue
        value = (str(next(iter(action.choices))) if action.choices else
                 "1" if action.type in (int, float) else placeholder)
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    groups = getattr(parser, "_mutually_exclusive_groups", [])
    for group in groups:
        if group.required and not any(a.dest in skip for a in group._group_actions):
            action = group._group_actions[0]
            argv += [action.option_strings[0], str(root / "placeholder-does-not-exist")]
    return argv


def _set(argv: list[str], parser, dest: str, value: str) -> list[str]:
    action = next(a for a in parser._actions if a.dest == dest)
    if action.option_strings:
        return argv + [action.option_strings[0], value]
    # a positional: replace the placeholder at its position among the positionals
    return argv + [value] if value not in argv else argv


def _refused(capsys, argv, needle: Path) -> str:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert code == 2, (argv, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(needle) in lines[0], err
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _argv_with_output(names, parser, action, root: Path, out: Path, extra_inputs: dict[str, str] | None = None):
    spec = action.output_spec
    extra_inputs = extra_inputs or {}
    argv = _base_argv(names, parser, {spec.dest, *extra_inputs}, root)
    for dest, value in extra_inputs.items():
        target = next(a for a in parser._actions if a.dest == dest)
        if target.option_strings:
            argv += [target.option_strings[0], value]
        else:  # a positional: it goes where the command's positionals go, after the names
            argv.insert(len(names), value)
    argv += [action.option_strings[0], str(out)]
    return argv


@pytest.mark.parametrize("case", DECLARED, ids=_ident)
def test_refuses_a_foreign_existing_output(case, tmp_path, capsys):
    names, parser, action = case
    spec = action.output_spec
    if spec.kind == "dir":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "thesis.tex").write_text("years of work\n")
    else:
        out = tmp_path / "victim.jsonl"
        out.write_text('{"precious": true}\n')
    before = _snapshot(tmp_path)
    _refused(capsys, _argv_with_output(names, parser, action, tmp_path, out), out)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", DECLARED, ids=_ident)
def test_refuses_a_file_folder_mix_up(case, tmp_path, capsys):
    names, parser, action = case
    spec = action.output_spec
    if spec.kind == "dir":
        out = tmp_path / "notes.txt"
        out.write_text("my notes\n")
    else:
        out = tmp_path / "existing-folder"
        out.mkdir()
        (out / "keep.txt").write_text("keep\n")
    before = _snapshot(tmp_path)
    argv = _argv_with_output(names, parser, action, tmp_path, out)
    if spec.force_dest:  # even --force does not turn a file into a folder
        argv.append("--" + spec.force_dest.replace("_", "-"))
    last = _refused(capsys, argv, out)
    assert ("is a file" in last) if spec.kind == "dir" else ("is a directory" in last), last
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", [c for c in DECLARED if c[2].output_spec.inputs], ids=_ident)
def test_refuses_one_of_its_own_inputs(case, tmp_path, capsys):
    names, parser, action = case
    spec = action.output_spec
    dest = spec.inputs[0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    inp = folder / "input.gguf"
    inp.write_bytes(b"the only copy of an input")
    # a file output that is the input; a folder output that holds the input (even --force may not
    # replace it: the input would be gone)
    out = inp if spec.kind == "file" else folder
    argv = _argv_with_output(names, parser, action, tmp_path, out, {dest: str(inp)})
    if spec.force_dest:
        argv.append("--" + spec.force_dest.replace("_", "-"))
    before = _snapshot(tmp_path)
    last = _refused(capsys, argv, out)
    assert "input" in last, last
    assert _snapshot(tmp_path) == before


def test_draft_export_refuses_an_existing_directory_up_front(tmp_path, capsys, monkeypatch):
    """Issue 24: `draft export --out EXISTING_DIR` failed after the whole export, naming a temp file."""
    import dflash_lab.models.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "export_draft_gguf", lambda *a, **k: pytest.fail("the export started"))
    out = tmp_path / "exports"
    out.mkdir()
    last = _refused(capsys, ["draft", "export", str(tmp_path), "--to", "gguf", "--target", "x.gguf",
                             "--out", str(out)], out)
    assert "is a directory" in last and ".tmp" not in last
    assert list(out.iterdir()) == []


DEVICE_COMMANDS = [(names, parser) for names, parser in COMMANDS
                   if any(a.dest == "device" and a.option_strings for a in parser._actions)]


def test_the_walk_finds_the_device_options():
    assert {"eval", "eval-run", "generate", "label", "demo"} <= {" ".join(n) for n, _ in DEVICE_COMMANDS}


@pytest.mark.parametrize("case", DEVICE_COMMANDS, ids=lambda c: " ".join(c[0]))
def test_every_device_option_refuses_an_unknown_device(case, tmp_path, capsys, monkeypatch):
    """Issue 24: `--device tpu` reached torch as a traceback in eval and generate. The check is in
    cli.main for every command with a --device, so a new one is covered without a case here."""
    names, parser = case
    monkeypatch.chdir(tmp_path)  # a default --out (demo-out) lands here, never in the checkout
    argv = _base_argv(names, parser, {"device"}, tmp_path) + ["--device", "tpu"]
    _refused(capsys, argv, "tpu")
    assert list(tmp_path.iterdir()) == []
