"""One writer per run directory.

A job that writes a run directory (`train`) holds `RUN_DIR/.writer.lock` while it writes. The file
is created with O_EXCL (atomic, also on network filesystems where flock is node-local) and holds the
holder's pid, host and start time, so a second writer is refused with a message naming them. A lock
left by a process that died (same host, pid gone) is taken over with a note on stderr; a lock held
from another host cannot be checked from here and is refused with the fix (delete the file once that
job is gone).

Under torchrun only global rank 0 takes the lock: the other ranks of the same job write nothing
that could interleave (rank 0 writes run.json, metrics and checkpoints).

    with RunDirLock(out, command="train"):
        ...write the run...
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path

from dflash_lab.errors import DFlashLabError

LOCK_NAME = ".writer.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    """The lock's content; None when it vanished; {} when it is unreadable (being written, damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_stale(holder: dict) -> bool:
    """The holder died: same host, its pid is gone. A lock from another host is never judged stale."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


class RunDirLock:
    """Hold `run_dir/.writer.lock` for this process (see the module docstring). `rank` defaults to
    the RANK environment variable; a rank other than 0 holds nothing."""

    def __init__(self, run_dir: str | os.PathLike, *, command: str = "train", rank: int | None = None):
        self.run_dir = Path(run_dir).expanduser()
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.held = False
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                   "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.me) + "\n")
        return True

    def _refusal(self, holder: dict) -> DFlashLabError:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "a process whose lock "
               "file is unreadable")
        since = f" (since {holder['started']})" if holder.get("started") else ""
        return DFlashLabError(
            f"--out {self.run_dir} is being written by `dflash-lab {holder.get('command') or self.command}`, "
            f"{who}{since}; two writers would interleave its metrics and checkpoints: wait for it to finish or "
            f"choose another --out (if that process is gone, delete {self.path})")

    def _remove_stale(self, stale: dict) -> None:
        """Move the stale lock aside. Of two takers, one may move the lock the other has just
        created: what was moved is read back, and a live holder's lock is put back and obeyed."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read_holder(aside) or {}
        if moved != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise self._refusal(moved)
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunDirLock":
        if self.rank != 0:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a vanished or stale lock is retried; two takers race through O_EXCL
            if self._create():
                self.held = True
                return self
            holder = _read_holder(self.path)
            if holder is None:
                continue
            if not _is_stale(holder):
                raise self._refusal(holder)
            print(f"[{self.command}] {self.path}: the writer that held it (pid {holder['pid']} on "
                  f"{holder['host']}) is gone; taking the run directory over", file=sys.stderr)
            self._remove_stale(holder)
        raise self._refusal(_read_holder(self.path) or {})

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.path)
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
