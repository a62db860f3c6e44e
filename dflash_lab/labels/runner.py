"""Turn a prompt set into the labelled dataset the trainer reads: shards, resume, accounting.

Output directory layout:

    meta.json             target id + fingerprint, sampling, thinking flag, max_new_tokens, backend, counts
    shard-00000.jsonl     {"id", "category", "source", "messages" (+ assistant reply), "response_tokens",
    shard-00001.jsonl      "finish_reason"}; each shard is written whole to a temp name, then os.replace'd
    journal.jsonl         records finished since the last shard (appended one line at a time)
    failed.jsonl          {"id", "reason", ...}: not training data; `--retry-failed` re-attempts them

Crash safety: every finished record is appended to the journal at once, and every `shard_size`
records (or `flush_seconds`) the journal becomes a shard. A rerun first turns a leftover journal into a
shard (dropping ids a shard already holds, and a torn last line), so `kill -9` at any moment loses at
most the requests in flight, and no id is ever written twice.

Accounting, per run: done + failed + skipped == input rows, where skipped counts ids labelled (or
failed) in an earlier run and duplicate ids within the input.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text as atomic_write
from dflash_lab.fileio import iter_jsonl, not_utf8_error, read_json_object
from dflash_lab.labels.backends import HFBackend, Job, OpenAIBackend, Outcome, VLLMBackend
from dflash_lab.outputs import check_output_dir

FORMAT = "dflash-lab-labels/1"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.jsonl$")
DEFAULT_MAX_NEW_TOKENS = 3072
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "greedy": True}
# Settings that change the answers: a rerun into the same directory must match them exactly.
# (The backend is not among them: every backend must give the same greedy answer.)
GENERATION_SETTINGS = ("target", "target_fingerprint", "chat_template_sha256", "template_kwargs", "thinking",
                       "temperature", "max_new_tokens")


# -- small file helpers ----------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """Rows of an append-only log; a torn (unterminated or unparsable) line is dropped."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # torn last line of a killed writer
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def shard_paths(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).iterdir() if SHARD_RE.match(p.name))


def iter_records(out_dir: str | os.PathLike):
    """Every labelled record of a dataset directory, shard by shard (what the trainer reads)."""
    for path in shard_paths(Path(out_dir)):
        yield from iter_jsonl(path, "labels", "the shard was edited or damaged: restore it or label again "
                                              "into a new --out")


def read_label_meta(out_dir: Path) -> dict | None:
    """The meta.json of a label directory (None when there is none); a damaged one is an error that
    names it, never a traceback."""
    meta_path = Path(out_dir) / "meta.json"
    if not meta_path.exists():
        return None
    return read_json_object(meta_path, "labels meta", "it records the settings the labels were made with: "
                            "restore it from a backup, or label into a new --out")


# What `label` writes before meta.json exists (its lock, its logs): a folder holding only these is its own.
_LABEL_SCRATCH = {".lock", "journal.jsonl", "failed.jsonl"}


def is_label_dir(out_dir: Path) -> bool:
    """The output rule's test for `label --out`: a directory this command wrote (its meta.json,
    or only its lock and logs), which a rerun resumes. A damaged meta.json is reported by read_label_meta."""
    out_dir = Path(out_dir)
    return (out_dir / "meta.json").is_file() or all(p.name in _LABEL_SCRATCH for p in out_dir.iterdir())


# -- prompts -----------------------------------------------------------------------------------------
@dataclass
class PromptRow:
    line: int
    record: dict | None  # {"id", "category", "source", "messages"} when valid
    id: str
    error: str | None = None


def resolve_prompts_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "prompts.jsonl"
    if not path.is_file():
        raise DFlashLabError(f"--prompts {path}: no such file; give a prompt-set directory (from "
                             "`dflash-lab prompts build`) or a .jsonl file of records with `messages`")
    return path


def _derive_id(messages: list[dict]) -> str:
    from dflash_lab.data.records import prompt_id

    first_user = next(m["content"] for m in messages if m.get("role") == "user")
    return prompt_id(first_user)


def read_prompt_rows(path: Path, limit: int | None = None):
    """Yield a PromptRow per non-blank input line; bad rows carry `error` instead of a record."""
    source = path.name
    count = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8_error(f"{path}:{number}", "--prompts", exc) from None
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            bad_id = f"{source}:line{number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield PromptRow(number, None, bad_id, f"malformed JSON on line {number}: {exc}")
                continue
            if not isinstance(row, dict):
                yield PromptRow(number, None, bad_id, f"line {number} is not a JSON object")
                continue
            row_id = str(row["id"]) if row.get("id") not in (None, "") else None
            messages = row.get("messages")
            if (not isinstance(messages, list) or not messages
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages)):
                yield PromptRow(number, None, row_id or bad_id,
                                f"line {number}: `messages` must be a non-empty list of {{role, content}} strings")
                continue
            if not any(m["role"] == "user" for m in messages):
                yield PromptRow(number, None, row_id or bad_id, f"line {number}: no user turn in `messages`")
                continue
            if messages[-1]["role"] != "user":
                yield PromptRow(number, None, row_id or bad_id,
                                f"line {number}: the last message is {messages[-1]['role']!r}, not a user turn")
                continue
            record = {
                "id": row_id or _derive_id(messages),
                "category": str(row.get("category") or "chat"),
                "source": str(row.get("source") or source),
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            }
            yield PromptRow(number, record, record["id"])


# -- targets -------------------------------------------------------------------------------------------
class _ConfigOnly:
    """Stands in for the model when only the tokenizer and config are needed (openai, vllm backends)."""

    def __init__(self, config):
        self.config = config


def load_tokenizer_target(spec: str):
    """A TargetModel with the tokenizer and config but no weights: enough to render prompts, count
    tokens and fingerprint the target, without loading an 8B model into CPU memory to label over HTTP."""
    from transformers import AutoConfig, AutoTokenizer

    from dflash_lab.models import embedded
    from dflash_lab.models.target import TargetModel, _dir_fingerprint, load_target

    spec = str(spec)
    path = embedded.fetch(spec) if spec in embedded.EMBEDDED_TARGETS else Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").exists()):
        return load_target(spec)  # a .gguf file or a hub id: the full loader knows those
    meta = json.loads((path / "dflash_lab.json").read_text()) if (path / "dflash_lab.json").exists() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DFlashLabError(f"target {spec}: could not load its tokenizer/config ({exc})") from exc
    return TargetModel(model=_ConfigOnly(config), tokenizer=tokenizer, name=meta.get("name", spec),
                       fingerprint=_dir_fingerprint(path))


def encode_batch(target, texts: list[str]) -> list[list[int]]:
    """`target.encode` for many texts at once (the fast tokenizer's parallel batch path, same ids)."""
    backend = getattr(target.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [target.encode(text) for text in texts]
    return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]


def token_counter(target):
    """len(target.encode(text)), without the per-call overhead of the transformers wrapper."""
    backend = getattr(target.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: len(target.encode(text))
    return lambda text: len(backend.encode(text, add_special_tokens=False).ids)


def target_model_path(spec: str) -> str:
    from dflash_lab.models import embedded

    return str(embedded.fetch(spec)) if spec in embedded.EMBEDDED_TARGETS else str(Path(spec).expanduser())


def generation_settings(target, max_new_tokens: int) -> dict:
    tokenizer = target.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    kwargs = target.template_kwargs()
    return {
        "target": target.name,
        "target_fingerprint": target.fingerprint,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
        "template_kwargs": kwargs,
        "thinking": bool(kwargs.get("enable_thinking", False)),
        "temperature": SAMPLING["temperature"],
        "max_new_tokens": int(max_new_tokens),
    }


def _compare_settings(old: dict, new: dict, out_dir: Path) -> None:
    for key in GENERATION_SETTINGS:
        if key == "target" and old.get("target_fingerprint") and new.get("target_fingerprint"):
            continue  # the same weights under another path spelling are the same target
        if old.get(key) != new.get(key):
            raise DFlashLabError(
                f"{out_dir} was labelled with {key}={old.get(key)!r}, this run asks for {key}={new.get(key)!r}; "
                "labels made with different generation settings must not mix: use another --out directory "
                "or the same setting")


# -- the shard writer --------------------------------------------------------------------------------
class ShardWriter:
    """Journal every record at once; turn the journal into a shard every `shard_size` records or
    `flush_seconds`, whichever comes first. Failures append to failed.jsonl."""

    def __init__(self, out_dir: Path, shard_size: int, flush_seconds: float):
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.journal_path = out_dir / "journal.jsonl"
        self.failed_path = out_dir / "failed.jsonl"
        existing = [int(SHARD_RE.match(p.name).group(1)) for p in shard_paths(out_dir)]
        self.next_shard = max(existing, default=-1) + 1
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()
        self._journal = open(self.journal_path, "a", encoding="utf-8", newline="\n")
        self._failed = open(self.failed_path, "a", encoding="utf-8", newline="\n")

    def add(self, record: dict) -> None:
        self._journal.write(_line(record))
        self._journal.flush()  # in the OS page cache now: survives kill -9 of this process
        self.buffer.append(record)
        if len(self.buffer) >= self.shard_size or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def fail(self, entry: dict) -> None:
        self._failed.write(_line(entry))
        self._failed.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        write_shard(self.out_dir, self.next_shard, self.buffer)
        self.next_shard += 1
        self.buffer = []
        # Only after the shard is in place: a crash in between leaves duplicates in the journal,
        # which recovery drops because the shard holds their ids.
        self._journal.seek(0)
        self._journal.truncate()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._journal.close()
            self._failed.close()
        if self.journal_path.exists() and self.journal_path.stat().st_size == 0:
            self.journal_path.unlink()


def write_shard(out_dir: Path, number: int, records: list[dict]) -> Path:
    path = out_dir / f"shard-{number:05d}.jsonl"
    if path.exists():
        raise RuntimeError(f"{path} already exists")  # never overwrite finished records
    atomic_write(path, "".join(_line(r) for r in records))
    return path


def recover(out_dir: Path) -> tuple[set[str], dict[str, dict]]:
    """Finish what a killed run left: journal -> shard, compact failed.jsonl. Returns (done ids,
    failed entries by id, minus ids that are done)."""
    done: set[str] = set()
    for path in shard_paths(out_dir):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    done.add(json.loads(line)["id"])
    journal = out_dir / "journal.jsonl"
    pending, seen = [], set()
    for row in read_jsonl_tolerant(journal):
        if row["id"] not in done and row["id"] not in seen:
            pending.append(row)
            seen.add(row["id"])
    if pending:
        existing = [int(SHARD_RE.match(p.name).group(1)) for p in shard_paths(out_dir)]
        write_shard(out_dir, max(existing, default=-1) + 1, pending)
        done |= seen
    if journal.exists():
        journal.unlink()
    failed = {row["id"]: row for row in read_jsonl_tolerant(out_dir / "failed.jsonl") if row["id"] not in done}
    _rewrite_failed(out_dir, failed)
    return done, failed


def _rewrite_failed(out_dir: Path, failed: dict[str, dict]) -> None:
    path = out_dir / "failed.jsonl"
    if failed or path.exists():
        atomic_write(path, "".join(_line(row) for row in failed.values()))


class _DirLock:
    """One labelling process per output directory (an flock, released when the process dies)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"

    def __enter__(self):
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise DFlashLabError(f"{self.path.parent} is being written by another `dflash-lab label` process; "
                                 "wait for it or use another --out") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        return False


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class LabelStats:
    input: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_done_before: int = 0
    skipped_failed_before: int = 0
    skipped_duplicate: int = 0
    skipped_not_failed: int = 0  # --retry-failed: rows that had not failed
    failed_bad_input: int = 0
    failed_too_long: int = 0
    failed_backend: int = 0
    length_capped: int = 0
    response_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    interrupted: bool = False
    per_server: dict = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.done + self.failed + self.skipped == self.input

    def summary(self) -> str:
        text = (f"input {self.input} = done {self.done} + failed {self.failed} + skipped {self.skipped} "
                f"(earlier run {self.skipped_done_before}, failed earlier {self.skipped_failed_before}, "
                f"duplicate {self.skipped_duplicate}")
        if self.skipped_not_failed:
            text += f", not in failed.jsonl {self.skipped_not_failed}"
        text += (f"); failed: bad input {self.failed_bad_input}, too long {self.failed_too_long}, "
                 f"backend {self.failed_backend}; length-capped {self.length_capped}; "
                 f"{self.completion_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tok/s)")
        if self.per_server:
            text += "; per server " + ", ".join(f"{k}: {v}" for k, v in self.per_server.items())
        if self.interrupted:
            text += "; INTERRUPTED (rerun the same command to resume)"
        return text


def vllm_dtype(dtype: str) -> str:
    """--dtype for the in-process vLLM engine: `auto` follows the hf backend's rule (fp32 on CPU,
    vLLM's own choice on GPU); vLLM's own `auto` runs an fp32 checkpoint in bf16 on CPU, which
    gives other labels than the fp32 hf backend (issue 21)."""
    if dtype not in (None, "auto"):
        return str(dtype)
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def make_backend(name: str, target, max_new_tokens: int, *, batch_size: int = 8, servers=(), model: str | None = None,
                 concurrency: int = 16, timeout: float = 600.0, retries: int = 4, backoff: float = 0.5,
                 dtype: str = "auto"):
    if name == "hf":
        return HFBackend(target, max_new_tokens, batch_size=batch_size)
    if name == "openai":
        return OpenAIBackend(list(servers), model or target.name, max_new_tokens, target.template_kwargs(),
                             concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
    if name == "vllm":
        return VLLMBackend(target_model_path(target.name), max_new_tokens, target.template_kwargs(),
                           dtype=vllm_dtype(dtype))
    if name == "llamacpp":  # in-process llama.cpp on the target's F32 GGUF (or --target FILE.gguf)
        from dflash_lab.eval.llamacpp import target_gguf_for
        from dflash_lab.labels.backends import LlamaCppBackend

        # batch_size = llama.cpp's parallel slots: the server decodes every active slot in one batch,
        # as hf decodes its padded batch. One thread: llama.cpp's threads spin-wait for each other at
        # every step, and on a shared 2-core box two of them stalled the demo's labels (BENCHMARKS.md, 4)
        return LlamaCppBackend(target_gguf_for(target.name), max_new_tokens, threads=1, parallel=batch_size)
    raise DFlashLabError(f"--backend {name!r}: choose hf, openai, vllm or llamacpp")


def run_labels(
    prompts: str | os.PathLike,
    target,
    out_dir: str | os.PathLike,
    *,
    backend="hf",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    servers=(),
    model: str | None = None,
    concurrency: int = 16,
    timeout: float = 600.0,
    retries: int = 4,
    backoff: float = 0.5,
    retry_failed: bool = False,
    limit: int | None = None,
    shard_size: int = 1000,
    flush_seconds: float = 60.0,
    device: str = "cpu",
    dtype: str = "auto",
    progress: bool = True,
) -> LabelStats:
    """Label `prompts` (a prompt-set dir or a .jsonl) with `target` (a TargetModel or a spec string)
    greedily, thinking off, into `out_dir`; resumable. `backend` is "hf", "openai", "vllm" or an
    object with `check()` and `generate(jobs, emit)`. Returns the run's LabelStats."""
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise DFlashLabError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if shard_size < 1:
        raise DFlashLabError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 0:
        raise DFlashLabError(f"--limit must be >= 0, got {limit}")
    prompts_path = resolve_prompts_path(prompts)
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir, command="label", owned=is_label_dir, force_flag=None,
                     fix="choose a new --out directory (a rerun resumes only in the directory it wrote)")
    old_meta = read_label_meta(out_dir)
    backend_name = backend if isinstance(backend, str) else getattr(backend, "name", type(backend).__name__)
    if isinstance(target, (str, os.PathLike)):
        if backend_name == "hf":
            from dflash_lab.models.target import load_target

            target = load_target(str(target), dtype=dtype, device=device)
        else:
            target = load_tokenizer_target(str(target))
    if target.tokenizer is None:
        raise DFlashLabError(f"target {target.name} has no tokenizer; labels need one to render prompts")

    context = getattr(target.config, "max_position_embeddings", None)
    if context and max_new_tokens >= context:
        raise DFlashLabError(f"--max-new-tokens {max_new_tokens} is not below the context of target {target.name} "
                             f"({context} tokens), so no prompt would fit; pass a smaller --max-new-tokens "
                             f"(e.g. {max(1, context // 2)})")
    settings = generation_settings(target, max_new_tokens)
    meta_path = out_dir / "meta.json"
    if old_meta is not None:
        _compare_settings(old_meta.get("settings", {}), settings, out_dir)
    elif out_dir.exists() and shard_paths(out_dir):
        raise DFlashLabError(f"{out_dir} holds shards but no meta.json; it is not a label directory of this tool")

    if isinstance(backend, str):
        backend = make_backend(backend, target, max_new_tokens, batch_size=batch_size, servers=servers, model=model,
                               concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff,
                               dtype=dtype)
    backend_info = backend.check()  # unreachable / wrong-model servers fail here, before any work

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = LabelStats()
    started = _now()
    with _DirLock(out_dir):
        done_before, failed_before = recover(out_dir)
        max_prompt = context - max_new_tokens if context else None

        meta = old_meta or {"format": FORMAT, "created": _now(), "runs": []}
        meta.update({
            "target": {"name": target.name, "fingerprint": target.fingerprint,
                       "model_type": getattr(target.config, "model_type", None)},
            "settings": settings,
            "sampling": dict(SAMPLING),
            "thinking": settings["thinking"],
            "max_new_tokens": int(max_new_tokens),
            "backend": backend_name,
            "backend_info": backend_info,
            "servers": list(backend_info.get("servers", [])),
            "prompts": str(prompts_path),
            "status": "running",
        })
        atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")

        writer = ShardWriter(out_dir, shard_size, flush_seconds)
        seen: set[str] = set()
        jobs: list[Job] = []
        rendered: list[tuple[PromptRow, str]] = []
        finished = False
        count_tokens = token_counter(target)
        rows_by_id: dict[str, dict] = {}
        try:
            for row in read_prompt_rows(prompts_path, limit):
                stats.input += 1
                if row.id in seen:
                    stats.skipped_duplicate += 1
                    continue
                seen.add(row.id)
                if retry_failed:
                    if row.id not in failed_before:
                        stats.skipped_not_failed += 1
                        continue
                elif row.id in done_before:
                    stats.skipped_done_before += 1
                    continue
                elif row.id in failed_before:
                    stats.skipped_failed_before += 1
                    continue
                if row.error:
                    stats.failed_bad_input += 1
                    writer.fail({"id": row.id, "reason": "bad_input", "detail": row.error, "line": row.line})
                    continue
                try:
                    rendered.append((row, target.render_prompt(row.record["messages"])))
                except Exception as exc:  # a template that rejects this conversation
                    stats.failed_bad_input += 1
                    writer.fail({"id": row.id, "reason": "bad_input", "line": row.line,
                                 "detail": f"chat template failed: {type(exc).__name__}: {exc}"})

            for chunk in range(0, len(rendered), 1024):
                part = rendered[chunk:chunk + 1024]
                for (row, _), prompt_ids in zip(part, encode_batch(target, [text for _, text in part])):
                    if max_prompt is not None and len(prompt_ids) > max_prompt:
                        stats.failed_too_long += 1
                        writer.fail({"id": row.id, "reason": "prompt_too_long", "line": row.line,
                                     "detail": f"{len(prompt_ids)} prompt tokens > context {context} - "
                                               f"max_new_tokens {max_new_tokens}"})
                        continue
                    rows_by_id[row.id] = row.record
                    jobs.append(Job(row.id, row.record["messages"], prompt_ids))
            del rendered

            bar = tqdm(total=len(jobs), unit="prompt", desc=f"label[{backend_name}]", disable=not progress,
                       dynamic_ncols=True, mininterval=0.5)
            start = time.monotonic()
            postfix = getattr(backend, "progress_postfix", lambda: {})
            last_postfix = [0.0]

            def emit(job: Job, outcome: Outcome) -> None:
                if outcome.error is not None:
                    stats.failed_backend += 1
                    writer.fail({"id": job.id, "reason": "backend", "detail": outcome.error,
                                 "server": outcome.server})
                else:
                    record = dict(rows_by_id.pop(job.id))
                    record["messages"] = record["messages"] + [{"role": "assistant", "content": outcome.text}]
                    # counted with the target tokenizer, the same way for every backend
                    record["response_tokens"] = count_tokens(outcome.text)
                    record["finish_reason"] = outcome.finish_reason
                    writer.add(record)
                    stats.done += 1
                    stats.response_tokens += record["response_tokens"]
                    stats.completion_tokens += (outcome.completion_tokens if outcome.completion_tokens is not None
                                                else record["response_tokens"])
                    stats.length_capped += outcome.finish_reason == "length"
                bar.update(1)
                now = time.monotonic()
                if now - last_postfix[0] < 0.5 and bar.n < bar.total:
                    return
                last_postfix[0] = now
                elapsed = max(now - start, 1e-9)
                bar.set_postfix({"tok/s": f"{stats.completion_tokens / elapsed:.1f}", "failed": stats.failed_backend,
                                 **postfix()}, refresh=False)

            try:
                if jobs:
                    backend.generate(jobs, emit)
            finally:
                bar.close()
                stats.seconds = time.monotonic() - start
            finished = True
        except KeyboardInterrupt:
            stats.interrupted = True
            raise
        finally:
            writer.close()
            stats.failed = stats.failed_bad_input + stats.failed_too_long + stats.failed_backend
            stats.skipped = (stats.skipped_done_before + stats.skipped_failed_before + stats.skipped_duplicate
                             + stats.skipped_not_failed)
            stats.tokens_per_s = stats.completion_tokens / stats.seconds if stats.seconds > 0 else 0.0
            if isinstance(backend, OpenAIBackend):
                stats.per_server = dict(zip(backend.servers, backend.done_per_server))
            done_now, failed_now = recover(out_dir)  # compacts failed.jsonl: retried ids that succeeded leave it
            meta["status"] = "complete" if finished else "interrupted" if stats.interrupted else "error"
            meta["counts"] = {"records": len(done_now), "failed": len(failed_now)}
            meta["last_run"] = {"started": started, "finished": _now(), "backend": backend_name, **asdict(stats)}
            meta["runs"] = (meta.pop("runs", None) or []) + [meta["last_run"]]  # history last in the file
            atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")
    return stats
