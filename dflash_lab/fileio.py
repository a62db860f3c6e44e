"""File helpers every step of the pipeline uses: atomic text writes, file hashes, and reading a
user's text file with an error that names it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from dflash_lab.errors import DFlashLabError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), because
    `os.umask` can only be read by setting it, which races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by `tempfile` (0600, or 0700 for a directory) the mode any other new file
    gets, so a server or teammate running as another user can read checkpoints and labels."""
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~current_umask())


def follow_umask_tree(root: str | os.PathLike) -> None:
    """`follow_umask` for a folder and everything in it (safetensors writes its files 0600 too)."""
    root = Path(root)
    follow_umask(root, directory=True)
    for path in root.rglob("*"):
        follow_umask(path, directory=path.is_dir())


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the umask's permissions instead of 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    follow_umask(tmp, directory=True)
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see old or new, never half.
    The file gets the umask's permissions, like any other new file (not tempfile's 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The text of a file the user gave (a recipe, a prompts file, a dataset), as UTF-8. Every way
    it can be unreadable is an error naming `what` and the file: the one place the rule lives, so a
    new command reading a new kind of file gets the same message."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DFlashLabError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise DFlashLabError(f"{what} {path} is a directory; pass the file") from None
    except OSError as exc:
        raise DFlashLabError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    return decode_user_bytes(data, path, what)


def decode_user_bytes(data: bytes, path: str | os.PathLike, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DFlashLabError(
            f"{what} {path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} on line {line}); "
            "save it as UTF-8 and run again"
        ) from None


def not_utf8_error(path: str | os.PathLike, what: str, exc: UnicodeDecodeError) -> DFlashLabError:
    """The same message as `read_user_text` for a file read line by line."""
    return DFlashLabError(f"{what} {path}: not UTF-8 text (invalid byte at offset {exc.start} of a line); "
                          "save it as UTF-8 and run again")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_jsonl(path: str | os.PathLike, what: str, bad_json_fix: str | None = None):
    """The JSON values of a JSONL file, line by line (blank lines skipped; never the whole file in
    memory). Undecodable bytes are an error naming `what`, the file and the line. A line that is not
    JSON is one too, ending with `bad_json_fix`; with `bad_json_fix` None such lines are skipped
    (for readers that only peek, leaving the message to the reader that loads)."""
    import json

    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise not_utf8_error(f"{path}:{lineno}", what, exc) from None
            except ValueError as exc:
                if bad_json_fix is not None:
                    raise DFlashLabError(f"{what} {path}:{lineno}: not valid JSON ({exc}); {bad_json_fix}") from None


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict:
    """A JSON object file the tools wrote (meta.json, run.json): anything else is `what` damaged,
    with `fix`, never a traceback."""
    import json

    try:
        value = json.loads(read_user_text(path, what))
    except ValueError as exc:
        value = exc
    if not isinstance(value, dict):
        raise DFlashLabError(f"{what} {path} is damaged (not a JSON object: {value}); {fix}")
    return value


def _write_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if "StorageFull" in text or "No space left" in text:  # safetensors' wording of ENOSPC
        return "No space left on device"
    return text or type(exc).__name__


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike, what: str, fix: str = "free disk space or choose another path"):
    """Turn an OS error while writing `path` (a full disk, permissions, a vanished folder; also
    safetensors' SafetensorError, which wraps them) into one DFlashLabError naming `path`. The
    writer inside must already leave nothing partial behind (temp name, renamed when complete)."""
    from safetensors import SafetensorError

    try:
        yield
    except DFlashLabError:
        raise
    except (OSError, SafetensorError) as exc:
        raise DFlashLabError(f"{what} {path}: writing failed ({_write_failure_reason(exc)}); nothing was "
                             f"written there and any earlier copy is unchanged: {fix}") from None


def names_write_errors(what: str, fix: str = "free disk space or choose another path"):
    """Decorator: `named_write_errors` around a writer whose first argument is the path it writes."""
    import functools

    def wrap(writer):
        @functools.wraps(writer)
        def named(path, *args, **kwargs):
            with named_write_errors(path, what, fix):
                return writer(path, *args, **kwargs)
        return named
    return wrap
