"""Canonical prompt records, the id hash, and small file helpers (atomic writes, sha256).

A record is ``{"id", "category", "source", "messages": [{"role": "user", "content": ...}]}``.
``id`` is the first 20 hex digits of sha256 over the *normalised* prompt text (Unicode case-folded,
runs of whitespace collapsed to one space, stripped), so the same prompt from two sources, or with
different spacing or capitalisation, has one id.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import os
import tempfile
from pathlib import Path
from typing import Iterable

from dflash_lab.fileio import current_umask
from dflash_lab.fileio import sha256_file  # noqa: F401  (re-exported for data/)

CATEGORIES = ("math", "code", "chat")
ID_HEX = 20


def normalize_text(text: str) -> str:
    """Case-fold and collapse whitespace: the form ids and exact-match decontamination use."""
    return " ".join(text.casefold().split())


def prompt_id(text: str) -> str:
    """Stable id of a prompt: sha256 of its normalised text, first 20 hex digits (80 bits)."""
    return hashlib.sha256(normalize_text(text).encode("utf-8", "surrogatepass")).hexdigest()[:ID_HEX]


def make_record(text: str, category: str, source: str, pid: str | None = None) -> dict:
    return {
        "id": pid or prompt_id(text),
        "category": category,
        "source": source,
        "messages": [{"role": "user", "content": text}],
    }


def record_line(record: dict) -> str:
    """One jsonl line (no newline). Fixed key order and separators, so output bytes are stable."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


_enc = json.encoder.encode_basestring  # the C encoder json.dumps(ensure_ascii=False) uses


def canonical_line(pid: str, category: str, source: str, text: str) -> str:
    """``record_line(make_record(text, category, source, pid))``, built faster; same bytes."""
    return (
        f'{{"id":"{pid}","category":"{category}","source":{_enc(source)},'
        f'"messages":[{{"role":"user","content":{_enc(text)}}}]}}'
    )


def record_text(record: dict) -> str:
    """The user prompt of a canonical record."""
    return record["messages"][0]["content"]


class AtomicWriter:
    """Write to a temp file in the target's folder; ``os.replace`` it into place on success."""

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        self.path = Path(path)
        self.mode = mode
        self._fh = None
        self._tmp = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # like any new file, not tempfile's 0600
        if "b" in self.mode:
            self._fh = os.fdopen(fd, self.mode)
        else:
            self._fh = os.fdopen(fd, self.mode, encoding="utf-8", newline="\n")
        return self._fh

    def __exit__(self, exc_type, exc, tb):
        self._fh.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
        return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with AtomicWriter(path) as fh:
        fh.write(text)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with AtomicWriter(path) as fh:
        for rec in records:
            fh.write(record_line(rec))
            fh.write("\n")
            n += 1
    return n


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Read a prompts.jsonl (or .parquet) written by ``prompts build`` / the demo pack."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [
            {"id": r["id"], "category": r["category"], "source": r["source"], "messages": r["messages"]}
            for r in rows
        ]
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
