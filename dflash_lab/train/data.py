"""Training data: labelled records -> token ids + loss masks (SPEC section 3), and the feature cache.

A training sequence is rendered exactly as the server sees it:

    text = target.render_prompt(messages[:-1]) + response + end_of_turn_token

(no end-of-turn token when the response was cut off by the length cap, `finish_reason: "length"`:
the target did not end its turn there, and a false end of turn would be taught) and tokenised once with `return_offsets_mapping=True`. A token is supervised when its first
character lies at or after the end of the rendered prompt (the response and the end-of-turn token);
a token that straddles the boundary is not. No per-tokenizer offsets are hand-tuned.

Large datasets go through the token store (`store.py`), which runs `tokenize_record` once per
record in parallel and memory-maps the result; `tokenize_records` is the in-memory path for small
data and the reference the store is tested against.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dflash_lab.errors import DFlashLabError


@dataclass
class Sample:
    id: str
    category: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 = supervised (response or end-of-turn)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TokenizeStats:
    records: int = 0
    kept: int = 0
    skipped_few_supervised: int = 0
    skipped_bad_record: int = 0
    truncated: int = 0
    supervised_tokens: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["reasons"] = self.reasons[:5]
        return d


# -- reading ---------------------------------------------------------------------------------------
def data_files(path: str | os.PathLike) -> list[Path]:
    """The files of a labelled dataset: a directory of `shard-*.jsonl` (failed.jsonl is ignored),
    a .jsonl file, or a .parquet file."""
    path = Path(path)
    if not path.exists():
        raise DFlashLabError(f"data {path}: no such file or directory; pass the output of `dflash-lab label`")
    if path.is_dir():
        files = sorted(path.glob("shard-*.jsonl"))
        if not files:
            hint = (" it holds prompts.jsonl, a prompt set: run `dflash-lab label` on it first to get the "
                    "target's responses" if (path / "prompts.jsonl").is_file() else
                    " is this a labelled dataset directory (the output of `dflash-lab label`)?")
            raise DFlashLabError(f"data {path}: no shard-*.jsonl files;{hint}")
        return files
    return [path]


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a labelled dataset (see `data_files`) in memory: small data and tests; the
    trainer streams through the token store instead."""
    path = Path(path)
    files = data_files(path)
    records: list[dict] = []
    for file in files:
        if file.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover
                from datasets import Dataset

                records.extend(Dataset.from_parquet(str(file)).to_list())
                continue
            try:
                records.extend(pq.read_table(file).to_pylist())
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise DFlashLabError(f"data {file}: not a readable parquet file ({exc}); export it again") from None
            continue
        with open(file, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    records.append(json.loads(raw.decode("utf-8")))
                except UnicodeDecodeError as exc:
                    raise DFlashLabError(f"data {file}:{lineno}: not UTF-8 text (invalid byte at offset {exc.start}); "
                                         "save it as UTF-8 and run again") from None
                except json.JSONDecodeError as exc:
                    raise DFlashLabError(f"data {file}:{lineno}: not valid JSON ({exc})") from None
    if not records:
        raise DFlashLabError(f"data {path}: no records")
    return records


def manifest_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of the dataset's meta.json (or a manifest.json beside it), else None."""
    path = Path(path)
    base = path if path.is_dir() else path.parent
    for name in ("meta.json", "manifest.json"):
        file = base / name
        if file.is_file():
            return hashlib.sha256(file.read_bytes()).hexdigest()
    return None


# -- tokenising ------------------------------------------------------------------------------------
def tokenize_record(target, record: dict, max_length: int) -> tuple[Sample, bool]:
    """(sample, truncated). The loss mask comes from the rendered text's character offsets."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError("messages must end with the assistant response")
    prompt_text = target.render_prompt(messages[:-1])
    # a response cut off by the length cap did not end its turn: no end-of-turn token after it
    eot = "" if record.get("finish_reason") == "length" else (target.end_of_turn_token or "")
    text = prompt_text + str(messages[-1].get("content", "")) + eot
    enc = target.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    boundary = len(prompt_text)
    mask = [1 if (start >= boundary and end > start) else 0 for start, end in enc["offset_mapping"]]
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    sample = Sample(id=str(record.get("id", "")), category=str(record.get("category", "")), input_ids=ids, loss_mask=mask)
    return sample, truncated


@dataclass
class TokenizedRecord:
    """What became of one record: a kept `sample`, or why not (`error`, or too few supervised)."""

    record: object
    sample: Sample | None = None
    truncated: bool = False
    error: Exception | None = None
    few_supervised: bool = False


def tokenize_one(target, record, index: int, max_length: int, min_supervised: int) -> TokenizedRecord:
    """The rules both tokenisers (this module's in-memory one and the token store's) apply to a
    record: a record that fails to render or tokenise is skipped with its error, one with fewer
    than `min_supervised` response tokens is skipped, and a sample without an id is named `#index`."""
    try:
        if not isinstance(record, dict):
            raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
        sample, truncated = tokenize_record(target, record, max_length)
    except Exception as exc:  # noqa: BLE001 - any render/tokenise failure (e.g. jinja2 on a missing role) is this record's
        return TokenizedRecord(record, error=exc)
    if not sample.id:
        sample.id = f"#{index}"
    if sample.num_supervised < min_supervised:
        return TokenizedRecord(record, truncated=truncated, few_supervised=True)
    return TokenizedRecord(record, sample=sample, truncated=truncated)


def tokenize_records(target, records: list[dict], max_length: int, min_supervised: int = 2) -> tuple[list[Sample], TokenizeStats]:
    stats = TokenizeStats(records=len(records))
    samples = []
    for i, record in enumerate(records):
        out = tokenize_one(target, record, i, max_length, min_supervised)
        stats.truncated += int(out.truncated)
        if out.error is not None:
            stats.skipped_bad_record += 1
            stats.reasons.append(f"record {record.get('id', i) if isinstance(record, dict) else i}: "
                                 f"{type(out.error).__name__}: {out.error}")
        elif out.few_supervised:
            stats.skipped_few_supervised += 1
        else:
            samples.append(out.sample)
            stats.supervised_tokens += out.sample.num_supervised
    stats.kept = len(samples)
    return samples, stats


def split_heldout_indices(n: int, heldout: float, heldout_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), each ascending int64 arrays, of `n` samples: a seeded
    permutation; `heldout` < 1 is a fraction, >= 1 a count. The token store's samples split by
    index this way (arrays, not lists: 8 bytes a sample, not 36)."""
    count = int(round(n * heldout)) if heldout < 1 else int(heldout)
    count = min(count, heldout_max, n - 1) if n > 1 else 0
    if heldout > 0 and count == 0 and n >= 4:
        count = 1
    gen = torch.Generator().manual_seed(seed + 7919)
    held = np.sort(torch.randperm(n, generator=gen)[:count].numpy())
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep), held


def split_heldout(samples: list[Sample], heldout: float, heldout_max: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split of in-memory samples (see `split_heldout_indices`)."""
    train, held = split_heldout_indices(len(samples), heldout, heldout_max, seed)
    return [samples[int(i)] for i in train], [samples[int(i)] for i in held]


# -- feature cache ---------------------------------------------------------------------------------
class FeatureCache:
    """Target features per sample on disk (safetensors), keyed by sample id + token ids + target
    fingerprint + layer ids, so a changed target, layer choice or tokenisation never hits a stale
    entry. Each file holds `features` [S, n*H] and `final` [S, H] (the target's last hidden state
    after its final norm: KD recomputes the target's exact logits from it with the frozen lm_head,
    so no top-k approximation is needed). Values are stored in `dtype` (bf16 by default), so
    training from the cache sees features rounded to bf16."""

    def __init__(self, root: str | os.PathLike, fingerprint: str | None, layer_ids: list[int], dtype: str = "bfloat16"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{fingerprint or 'nofp'}|{','.join(map(str, layer_ids))}"
        self.dtype = getattr(torch, dtype)
        self.hits = 0
        self.misses = 0

    def _path(self, sample: Sample) -> Path:
        digest = hashlib.sha256(f"{self.prefix}|{sample.id}|{sample.input_ids}".encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, sample: Sample):
        from safetensors.torch import load_file

        path = self._path(sample)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a torn or foreign file: recompute
            self.misses += 1
            return None
        self.hits += 1
        return tensors["features"], tensors["final"]

    def put(self, sample: Sample, features: torch.Tensor, final: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": features.to(self.dtype).contiguous().cpu(), "final": final.to(self.dtype).contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)
