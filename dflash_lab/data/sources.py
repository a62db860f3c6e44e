"""Prompt sources: local jsonl/json/parquet files, Hugging Face datasets, Python code to shape.

Each source yields ``(text, tag, difficulty)``; malformed rows go to a ``RejectLog`` (counted,
written to rejects.jsonl; the first one is an error in strict mode). Presets spell out the
hub id and field mapping of the seed's sources; they need a reachable hub.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dflash_lab.errors import DFlashLabError

# NuminaMath-CoT `source` tags of competition-level problems (the seed's "HARD" subset).
NUMINA_HARD_TAGS = ["olympiads", "amc_aime", "aops_forum", "math"]

_NEMOTRON_V2 = "nvidia/Nemotron-Post-Training-Dataset-v2"

PRESETS: dict[str, dict] = {
    "numina-math-cot": {
        "hf": {"dataset": "AI-MO/NuminaMath-CoT", "split": "train"},
        "prompt_field": "problem", "tag_field": "source", "category": "math",
    },
    "numina-math-cot-hard": {
        "hf": {"dataset": "AI-MO/NuminaMath-CoT", "split": "train"},
        "prompt_field": "problem", "tag_field": "source", "category": "math",
        "filters": {"tags": NUMINA_HARD_TAGS},
    },
    "openmathinstruct-2": {
        "hf": {"dataset": "nvidia/OpenMathInstruct-2", "split": "train"},
        "prompt_field": "problem", "tag_field": "problem_source", "category": "math",
    },
    "openmathreasoning": {
        "hf": {"dataset": "nvidia/OpenMathReasoning", "split": "cot", "streaming": True},
        "prompt_field": "problem", "tag_field": "problem_type",
        "difficulty_field": "pass_rate_72b_tir", "category": "math",
    },
    "nemotron-v2-math": {
        "hf": {"dataset": _NEMOTRON_V2, "split": "math", "streaming": True},
        "messages_field": "messages", "category": "math",
    },
    "nemotron-v2-code": {
        "hf": {"dataset": _NEMOTRON_V2, "split": "code", "streaming": True},
        "messages_field": "messages", "category": "code",
    },
    "nemotron-v2-chat": {
        "hf": {"dataset": _NEMOTRON_V2, "split": "chat", "streaming": True},
        "messages_field": "messages", "category": "chat",
    },
    "open-code-instruct": {
        "hf": {"dataset": "nvidia/OpenCodeInstruct", "split": "train", "streaming": True},
        "prompt_field": "input", "tag_field": "domain", "difficulty_field": "average_test_score",
        "category": "code",
    },
    "evol-codealpaca": {
        "hf": {"dataset": "theblackcat102/evol-codealpaca-v1", "split": "train"},
        "prompt_field": "instruction", "category": "code",
    },
    "code-alpaca-20k": {
        "hf": {"dataset": "sahil2801/CodeAlpaca-20k", "split": "train"},
        "prompt_field": "instruction", "category": "code",
    },
    "code-exercises": {
        "hf": {"dataset": "jinaai/code_exercises", "split": "train"},
        "prompt_field": "problem", "category": "code",
    },
    "self-oss-instruct": {
        "hf": {"dataset": "bigcode/self-oss-instruct-sc2-exec-filter-50k", "split": "train"},
        "prompt_field": "instruction", "category": "code",
    },
    "codesearchnet-python": {
        "hf": {"dataset": "code-search-net/code_search_net", "config": "python", "split": "train"},
        "shape": "function-completion", "code_field": "whole_func_string", "category": "code",
    },
    "mbpp-train": {
        "hf": {"dataset": "google-research-datasets/mbpp", "config": "full", "split": "train"},
        "prompt_field": "text", "category": "code",
    },
}


class RowError(Exception):
    """A malformed row; the message is the reason written to rejects.jsonl."""


@dataclass
class RejectLog:
    strict: bool = False
    rows: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # source name -> count

    def add(self, source: str, file: str, line: int | None, reason: str) -> None:
        if self.strict:
            where = f"{file}:{line}" if line is not None else file
            raise DFlashLabError(
                f"{where}: {reason} (source {source!r}); fix or remove the row, or build without --strict "
                "to skip such rows and list them in rejects.jsonl"
            )
        self.rows.append({"source": source, "file": file, "line": line, "reason": reason})
        self.counts[source] = self.counts.get(source, 0) + 1


def _get_field(row, dotted: str):
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise RowError(f"missing field {dotted!r}")
    return cur


def _as_text(value, what: str) -> str:
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):  # content parts
        parts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            value = "\n".join(parts)
    if not isinstance(value, str):
        raise RowError(f"{what} is not text ({type(value).__name__})")
    if not value.strip():
        raise RowError(f"{what} is empty")
    return value


_USER_ROLES = {"user", "human"}


def first_user_turn(turns, field_name: str = "messages") -> str:
    """The first user turn of a messages list: {role, content} or ShareGPT {from, value} shape."""
    if not isinstance(turns, list):
        raise RowError(f"{field_name!r} is not a list of turns")
    for turn in turns:
        if not isinstance(turn, dict):
            raise RowError(f"{field_name!r} has a turn that is not an object")
        role = turn.get("role", turn.get("from"))
        if isinstance(role, str) and role.lower() in _USER_ROLES:
            content = turn["content"] if "content" in turn else turn.get("value")
            return _as_text(content, f"first user turn of {field_name!r}")
    raise RowError(f"{field_name!r} has no user turn")


class RowExtractor:
    """Maps a row (dict) to (prompt text, tag, difficulty) following a SourceSpec."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, row):
        spec = self.spec
        if not isinstance(row, dict):
            raise RowError("row is not a JSON object")
        if spec.prompt_field is not None:
            text = _as_text(_get_field(row, spec.prompt_field), f"field {spec.prompt_field!r}")
        else:
            text = first_user_turn(_get_field(row, spec.messages_field), spec.messages_field)
        tag = row.get(spec.tag_field) if spec.tag_field else None
        diff = row.get(spec.difficulty_field) if spec.difficulty_field else None
        return text, tag, diff


# ------------------------------------------------------------------------------------------
# raw row readers: yield (line_or_row_number, row_dict) and report malformed rows


def _progress(total, desc, unit="B"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None, leave=False)


def iter_jsonl(path: Path, on_error) -> Iterator[tuple[int, dict]]:
    """Plain-Python jsonl reader; invalid UTF-8 / JSON lines go to ``on_error(line, reason)``."""
    size = path.stat().st_size
    loads = json.loads
    with open(path, "rb") as fh, _progress(size, path.name) as bar:
        pending = 0
        for lineno, raw in enumerate(fh, 1):
            pending += len(raw)
            if pending > (8 << 20):
                bar.update(pending)
                pending = 0
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                on_error(lineno, f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                row = loads(text)
            except ValueError as exc:
                on_error(lineno, f"bad JSON ({exc.msg})")
                continue
            yield lineno, row
        bar.update(pending)


def iter_json(path: Path, on_error) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DFlashLabError(f"{path}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8") from None
    except ValueError as exc:
        raise DFlashLabError(f"{path}: not valid JSON ({exc}); use a JSON list of objects or jsonl") from None
    if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DFlashLabError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DFlashLabError(f"{path}: expected a JSON list of objects")
    for i, row in enumerate(data, 1):
        yield i, row


def iter_parquet(path: Path, on_error, columns=None) -> Iterator[tuple[int, dict]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_parquet(str(path), columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow and datasets raise many types for a damaged file
        raise DFlashLabError(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]}); "
                             "export it again, or convert it to jsonl") from None
    for i, row in enumerate(ds, 1):
        yield i, row


def iter_hf(hf, columns=None) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(
            hf.dataset, hf.config, split=hf.split, revision=hf.revision,
            data_files=hf.data_files, streaming=hf.streaming,
        )
    except Exception as exc:  # hub unreachable, gated, unknown split ...
        raise DFlashLabError(
            f"could not load Hugging Face dataset {hf.dataset!r} (config {hf.config!r}, split {hf.split!r}, "
            f"revision {hf.revision!r}): {type(exc).__name__}: {exc}. This needs a reachable hub (or a local "
            "copy: use `path:` with a jsonl/parquet file instead of `hf:`)"
        ) from None
    if columns:
        try:
            ds = ds.select_columns([c for c in columns if c in (ds.column_names or columns)])
        except Exception:
            pass
    for i, row in enumerate(ds, 1):
        yield i, row


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"), (".json", "json")):
        if name.endswith(suffix):
            return fmt
    raise DFlashLabError(f"{path}: cannot tell the format from the name; set `format: jsonl|json|parquet` on the source")


def iter_rows(spec, path: Path | None, on_error) -> Iterator[tuple[int, dict]]:
    columns = [c.split(".")[0] for c in (spec.prompt_field, spec.messages_field, spec.tag_field,
                                           spec.difficulty_field, spec.code_field) if c]
    if spec.hf is not None:
        yield from iter_hf(spec.hf, columns)
        return
    fmt = detect_format(path, spec.format)
    if fmt == "jsonl":
        yield from iter_jsonl(path, on_error)
    elif fmt == "json":
        yield from iter_json(path, on_error)
    else:
        yield from iter_parquet(path, on_error, columns)


# ------------------------------------------------------------------------------------------
# fingerprints


def fingerprint_path(path: Path) -> dict:
    """path + size + sha256 of a file; for a folder, of its .py files (sorted relative paths)."""
    if path.is_dir():
        digest = hashlib.sha256()
        size = 0
        files = sorted(p for p in path.rglob("*.py") if p.is_file())
        from dflash_lab.data.records import sha256_file

        for p in files:
            rel = p.relative_to(path).as_posix()
            digest.update(f"{rel}\0{sha256_file(p)}\n".encode())
            size += p.stat().st_size
        return {"path": str(path), "kind": "folder", "files": len(files), "size": size, "sha256": digest.hexdigest()}
    from dflash_lab.data.records import sha256_file

    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint_hf(hf) -> dict:
    fp = {"hf": hf.dataset, "config": hf.config, "split": hf.split, "revision": hf.revision}
    if hf.revision is None:
        fp["note"] = "revision not pinned: the hub's current version was read"
    return fp


def require_exists(path: Path, source: str) -> None:
    if not path.exists():
        raise DFlashLabError(
            f"source {source!r}: {path} not found; fix `path:` in the recipe (relative paths are relative "
            "to the recipe's folder)"
        )


__all__ = [
    "PRESETS", "NUMINA_HARD_TAGS", "RejectLog", "RowError", "RowExtractor", "first_user_turn",
    "iter_rows", "iter_jsonl", "fingerprint_path", "fingerprint_hf", "require_exists",
]
