"""The token store: labelled shards tokenised once, memory-mapped, shared by every rank and run.

The first run that needs a (dataset, tokenizer, chat template, max_length, min_supervised)
combination builds the store; every later run and every `--resume` with the same key opens it in
milliseconds. One directory per key, `ROOT/<key>/`:

    tokens.bin    int32   the token ids of every usable sample, concatenated
    mask.bin      uint8   the loss mask, aligned with tokens.bin (1 = supervised)
    offsets.bin   int64   [N + 1]: sample i is tokens[offsets[i]:offsets[i + 1]]
    lengths.bin   int32   [N] tokens per sample
    anchors.bin   int32   [N] anchor candidates per sample (`blocks.anchor_candidates`)
    names.bin     utf-8   JSON `[id, category]` per sample, concatenated
    names_off.bin int64   [N + 1] byte offsets into names.bin
    store.json    the key's inputs, the sizes, and the build statistics (`stats`, for run.json)

Every array is opened with `numpy.memmap`: opening reads only store.json, and `sample(i)` touches
only the pages of sample i, so a rank's memory does not grow with the dataset (docs/training.md
says why memmap rather than Arrow).

Building: local rank 0 of each node builds under a file lock (`fcntl.flock`, so concurrent runs and
nodes sharing a filesystem build once), with a pool of worker processes over chunks of records,
into a temporary directory renamed into place when complete: a store directory either is complete
or does not exist. The other local ranks poll for it (no torch.distributed needed). A record that
fails to parse, render or tokenise is counted and reported, never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dflash_lab.errors import DFlashLabError
from dflash_lab.train.data import Sample, TokenizedRecord, data_files, manifest_sha256, tokenize_one

# Bump when what a store holds for the same inputs changes (tokenize_record's rules, the layout).
STORE_FORMAT = 1
CHUNK_RECORDS = 256  # records per work item: big enough to amortise the pickling, small enough to balance
MAX_FIRST_ERRORS = 5
SMALL_DATA_BYTES = 8 << 20  # below this the store is built in-process, without a worker pool
_META = "store.json"


def default_root() -> Path:
    """`$DFLASH_LAB_HOME/token-store`, else `~/.cache/dflash-lab/token-store`."""
    from dflash_lab.models.embedded import cache_root

    return cache_root() / "token-store"


# -- the key --------------------------------------------------------------------------------------
def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how text becomes ids: the fast tokenizer's full JSON
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens), else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256_text(f"{type(tokenizer).__name__}|{body}")


def data_identity(data_path: str | os.PathLike) -> dict:
    """The dataset's manifest sha256 (meta.json of a `dflash-lab label` directory: it changes with
    every labelling run) plus each data file's name and size. Without a manifest, each file's
    modification time too (touching a bare .jsonl rebuilds; cheaper than hashing gigabytes)."""
    files = data_files(data_path)
    manifest = manifest_sha256(data_path)
    listing = []
    for file in files:
        st = file.stat()
        listing.append([file.name, st.st_size] + ([] if manifest else [st.st_mtime_ns]))
    return {"manifest_sha256": manifest, "files": listing}


def store_key(data_path, target, max_length: int, min_supervised: int) -> tuple[str, dict]:
    """(key, the inputs it hashes). The chat template and the end-of-turn token are part of the
    rendering, so they are keyed separately from the tokenizer's vocabulary."""
    tokenizer = target.tokenizer
    parts = {
        "format": STORE_FORMAT,
        "data": data_identity(data_path),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "chat_template": _sha256_text(str(getattr(tokenizer, "chat_template", None) or "")),
        "template_kwargs": target.template_kwargs() if tokenizer is not None else {},
        "end_of_turn": target.end_of_turn_token,
        "max_length": int(max_length),
        "min_supervised": int(min_supervised),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return key, parts


# -- tokenising a chunk (in a worker process or in-process) -----------------------------------------
@dataclass
class _ChunkResult:
    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    anchors: np.ndarray
    names: list[bytes]
    records: int = 0
    bad_record: int = 0
    few_supervised: int = 0
    truncated: int = 0
    no_end_of_turn: int = 0
    prompt_like: int = 0
    supervised_tokens: int = 0
    errors: list[dict] = field(default_factory=list)


_WORKER: dict = {}


def _init_worker(text_target, max_length: int, min_supervised: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(target=text_target, max_length=max_length, min_supervised=min_supervised)


def _work(chunk) -> _ChunkResult:
    return tokenize_chunk(_WORKER["target"], chunk, _WORKER["max_length"], _WORKER["min_supervised"])


def _looks_like_prompt(record) -> bool:
    messages = record.get("messages") if isinstance(record, dict) else None
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") != "assistant")


def tokenize_chunk(target, chunk: tuple[int, list], max_length: int, min_supervised: int) -> _ChunkResult:
    """`chunk` = (index of its first record, [(where, raw JSON line bytes or a dict), ...]). The
    rules of `data.tokenize_one`, record by record; any exception skips only its record."""
    first, items = chunk
    ids_out, mask_out, lengths, anchors, names = [], [], [], [], []
    res = _ChunkResult(tokens=None, mask=None, lengths=None, anchors=None, names=names)  # type: ignore[arg-type]
    for offset, (where, payload) in enumerate(items):
        index = first + offset
        res.records += 1
        try:
            record = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
        except Exception as exc:  # noqa: BLE001 - not JSON (or not UTF-8): counted and reported, never fatal
            out = TokenizedRecord(payload, error=exc)
        else:
            out = tokenize_one(target, record, index, max_length, min_supervised)
        res.truncated += int(out.truncated)
        if out.error is not None:
            res.bad_record += 1
            res.prompt_like += int(_looks_like_prompt(out.record))
            if len(res.errors) < MAX_FIRST_ERRORS:
                rid = out.record.get("id") if isinstance(out.record, dict) else None
                res.errors.append({"id": str(rid) if rid is not None else f"#{index}", "where": where,
                                   "reason": f"{type(out.error).__name__}: {out.error}"[:300]})
            continue
        if out.few_supervised:
            res.few_supervised += 1
            continue
        sample = out.sample
        res.no_end_of_turn += int(out.record.get("finish_reason") == "length")
        ids = np.asarray(sample.input_ids, dtype=np.int32)
        mask = np.asarray(sample.loss_mask, dtype=np.uint8)
        ids_out.append(ids)
        mask_out.append(mask)
        lengths.append(len(ids))
        anchors.append(int(np.count_nonzero(mask[:-1] & mask[1:])))
        names.append(json.dumps([sample.id, sample.category], ensure_ascii=False).encode())
        res.supervised_tokens += int(mask.sum())
    res.tokens = np.concatenate(ids_out) if ids_out else np.zeros(0, np.int32)
    res.mask = np.concatenate(mask_out) if mask_out else np.zeros(0, np.uint8)
    res.lengths = np.asarray(lengths, dtype=np.int32)
    res.anchors = np.asarray(anchors, dtype=np.int32)
    return res


def _iter_chunks(files: list[Path], size: int):
    """Chunks of (where, raw record) streamed from the files, never the whole dataset at once.
    JSON is parsed in the workers (it is a good part of the work)."""
    chunk, first, index = [], 0, 0
    for file in files:
        for where, payload in _iter_file(file):
            chunk.append((where, payload))
            index += 1
            if len(chunk) == size:
                yield first, chunk
                chunk, first = [], index
    if chunk:
        yield first, chunk


def _iter_file(file: Path):
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(file)
            row = 0
            for batch in parquet.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{file.name}:row {row}", record
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DFlashLabError(f"data {file}: not a readable parquet file ({exc}); export it again") from exc
        return
    with open(file, "rb") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                yield f"{file.name}:{lineno}", line


# -- writing a store ---------------------------------------------------------------------------------
class _StoreWriter:
    """Appends chunk results to the store's files in record order; keeps only running totals."""

    def __init__(self, directory: Path):
        self.dir = directory
        names = ("tokens", "mask", "offsets", "lengths", "anchors", "names", "names_off")
        self.files = {n: open(directory / f"{n}.bin", "wb") for n in names}
        self.num_samples = 0
        self.num_tokens = 0
        self.name_bytes = 0
        self.totals = {"records": 0, "bad_record": 0, "few_supervised": 0, "truncated": 0, "no_end_of_turn": 0,
                       "prompt_like": 0, "supervised_tokens": 0}
        self.errors: list[dict] = []

    def add(self, res: _ChunkResult) -> None:
        f = self.files
        lengths = res.lengths.astype(np.int64)
        f["offsets"].write((self.num_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])).astype(np.int64).tobytes()
                           if len(lengths) else b"")
        name_sizes = np.array([len(n) for n in res.names], dtype=np.int64)
        f["names_off"].write((self.name_bytes + np.concatenate([[0], np.cumsum(name_sizes)[:-1]])).astype(np.int64).tobytes()
                             if len(name_sizes) else b"")
        f["tokens"].write(res.tokens.astype(np.int32).tobytes())
        f["mask"].write(res.mask.astype(np.uint8).tobytes())
        f["lengths"].write(res.lengths.astype(np.int32).tobytes())
        f["anchors"].write(res.anchors.astype(np.int32).tobytes())
        f["names"].write(b"".join(res.names))
        self.num_samples += len(lengths)
        self.num_tokens += int(lengths.sum())
        self.name_bytes += int(name_sizes.sum())
        for k in self.totals:
            self.totals[k] += getattr(res, k)
        self.errors.extend(res.errors[:MAX_FIRST_ERRORS - len(self.errors)])

    def finish(self, meta: dict) -> dict:
        self.files["offsets"].write(np.array([self.num_tokens], np.int64).tobytes())
        self.files["names_off"].write(np.array([self.name_bytes], np.int64).tobytes())
        for handle in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        t = self.totals
        stats = {
            "records": t["records"],
            "usable": self.num_samples,
            "skipped": {"bad_record": t["bad_record"], "few_supervised": t["few_supervised"]},
            "truncated": t["truncated"],
            "no_end_of_turn": t["no_end_of_turn"],
            "prompt_like": t["prompt_like"],
            "tokens": self.num_tokens,
            "supervised_tokens": t["supervised_tokens"],
            "first_errors": self.errors,
            # the names of the in-memory path's TokenizeStats, so run.json readers keep working
            "kept": self.num_samples,
            "skipped_bad_record": t["bad_record"],
            "skipped_few_supervised": t["few_supervised"],
            "reasons": [f"record {e['id']} ({e['where']}): {e['reason']}" for e in self.errors],
        }
        meta = {**meta, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                "name_bytes": self.name_bytes, "stats": stats,
                "files": {f"{n}.bin": _file_summary(self.dir / f"{n}.bin") for n in self.files}}
        (self.dir / _META).write_text(json.dumps(meta, indent=1) + "\n")
        return meta

    def abort(self) -> None:
        for handle in self.files.values():
            with contextlib.suppress(Exception):
                handle.close()


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 64))


def _pool_context():
    """`fork` where the platform has it: workers start in milliseconds with the tokenizer already in
    memory, and nothing re-imports the main module (`spawn` would re-run `python -m dflash_lab`'s
    CLI in every worker, and any script without a `__main__` guard). The workers only parse JSON
    and run the tokenizer (no torch, no CUDA), which is what makes forking a process that holds a
    CUDA context or thread pools safe here; HF tokenizers turns its own threads off after a fork."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def build_store(data_path, target, max_length: int, min_supervised: int, directory: Path, meta: dict, *,
                workers: int | None = None, progress: bool = True, chunk_records: int = CHUNK_RECORDS) -> dict:
    """Tokenise every record of `data_path` into the (empty, existing) `directory`; returns store.json.
    With more than one worker, chunks go to a process pool (`_pool_context`), at most 2 per worker
    in flight so the reader never runs ahead of the writer."""
    from tqdm import tqdm

    files = data_files(data_path)
    if workers is None:
        # a pool costs a second or so to start and feed: not worth it for small data
        small = sum(f.stat().st_size for f in files) < SMALL_DATA_BYTES
        workers = 1 if small else default_workers()
    workers = max(1, int(workers))
    writer = _StoreWriter(directory)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    bar = tqdm(desc="token store", unit="rec", disable=not progress, dynamic_ncols=True, mininterval=1.0,
               file=sys.stderr)
    results = _tokenized_chunks(_iter_chunks(files, chunk_records), target.text_only(), max_length, min_supervised,
                                workers)
    try:
        for res in results:
            writer.add(res)
            bar.update(res.records)
    except BaseException:
        results.close()  # the pool stops now, not when the traceback is freed
        writer.abort()
        bar.close()
        raise
    bar.close()
    meta = {**meta, "build": {"seconds": round(time.perf_counter() - started, 3),
                              "cpu_seconds": round(_cpu_seconds() - cpu_started, 3), "workers": workers,
                              "host": os.uname().nodename, "pid": os.getpid()}}
    return writer.finish(meta)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    cpu = os.times()
    return cpu.user + cpu.system + cpu.children_user + cpu.children_system


def _tokenized_chunks(chunks, text_target, max_length: int, min_supervised: int, workers: int):
    """Each chunk tokenised, in order: here, or by a pool of `workers` processes with at most 2
    chunks per worker in flight, so the reader never runs ahead of the writer."""
    if workers == 1:
        for chunk in chunks:
            yield tokenize_chunk(text_target, chunk, max_length, min_supervised)
        return
    ctx = _pool_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(text_target, max_length, min_supervised)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- verifying a store before it is mapped ------------------------------------------------------------
_EDGE_BYTES = 64 << 10  # the checksum covers each file's first and last 64 KiB: cheap on every open


def _file_summary(path: Path) -> dict:
    """{bytes, edges_sha256}: the file's size and a sha256 of its first and last 64 KiB."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        if size > _EDGE_BYTES:
            handle.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
            digest.update(handle.read())
    return {"bytes": size, "edges_sha256": digest.hexdigest()}


def _expected_sizes(meta: dict) -> dict[str, int]:
    """Each file's size in bytes, from the counts in store.json (stores of every version have them)."""
    n, t = int(meta["num_samples"]), int(meta["num_tokens"])
    return {"tokens.bin": 4 * t, "mask.bin": t, "offsets.bin": 8 * (n + 1), "lengths.bin": 4 * n,
            "anchors.bin": 4 * n, "names.bin": int(meta["name_bytes"]), "names_off.bin": 8 * (n + 1)}


def verify_store(path: Path, meta: dict) -> None:
    """Every file of the store against store.json before it is memory-mapped: its size (a truncated
    tokens.bin used to end in `mmap length is greater than file size`) and, for stores that record
    it, the checksum of its edges. Raises DFlashLabError naming the file and the fix."""
    recorded = meta.get("files") or {}
    for name, size in _expected_sizes(meta).items():
        file = path / name
        fix = f"delete the directory {path} and the next run rebuilds the store"
        if not file.is_file():
            raise DFlashLabError(f"token store {path}: {name} is missing; {fix}")
        actual = file.stat().st_size
        if actual != size:
            raise DFlashLabError(f"token store {path}: {name} is {actual} bytes, store.json says {size} "
                                 f"(truncated or damaged, e.g. by a full disk); {fix}")
        want = recorded.get(name, {}).get("edges_sha256")
        if want and _file_summary(file)["edges_sha256"] != want:
            raise DFlashLabError(f"token store {path}: {name} does not match the checksum in store.json "
                                 f"(damaged); {fix}")


# -- the store -----------------------------------------------------------------------------------------
def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenStore:
    """A built store, opened read-only. Nothing but store.json is read on opening."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / _META
        try:
            self.meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DFlashLabError(f"token store {self.path}: unreadable {_META} ({exc}); delete the directory "
                                 "and the next run rebuilds it") from exc
        try:
            verify_store(self.path, self.meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise DFlashLabError(f"token store {self.path}: {_META} lacks the sizes ({exc}); delete the directory "
                                 "and the next run rebuilds it") from None
        self.key: str = self.meta["key"]
        self.stats: dict = {**self.meta["stats"], "key": self.key, "path": str(self.path),
                            "build_seconds": self.meta.get("build", {}).get("seconds")}
        n, t = int(self.meta["num_samples"]), int(self.meta["num_tokens"])
        self._n = n
        self._tokens = _memmap(self.path / "tokens.bin", np.int32, t)
        self._mask = _memmap(self.path / "mask.bin", np.uint8, t)
        self._offsets = _memmap(self.path / "offsets.bin", np.int64, n + 1)
        self._lengths = _memmap(self.path / "lengths.bin", np.int32, n)
        self._anchors = _memmap(self.path / "anchors.bin", np.int32, n)
        self._names = _memmap(self.path / "names.bin", np.uint8, int(self.meta["name_bytes"]))
        self._names_off = _memmap(self.path / "names_off.bin", np.int64, n + 1)

    # memmaps would pickle as full copies: a DataLoader worker reopens the files instead
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @classmethod
    def open_or_build(cls, data_path, target, max_length: int, min_supervised: int, *, root=None,
                      local_rank: int = 0, progress: bool = True, workers: int | None = None,
                      poll_s: float = 1.0) -> "TokenStore":
        """The store for this data, tokenizer, template, `max_length` and `min_supervised`: opened
        when it exists, else built by local rank 0 while the other local ranks wait for it."""
        key, parts = store_key(data_path, target, max_length, min_supervised)
        root = Path(root).expanduser() if root is not None else default_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / key
        if not (final / _META).is_file():
            if local_rank == 0:
                _build_locked(root, key, data_path, target, max_length, min_supervised,
                              {"key": key, "inputs": parts, "data_path": str(Path(data_path).resolve())},
                              workers=workers, progress=progress)
            else:
                _wait_for(root, key, poll_s)
        store = cls(final)
        if len(store) == 0:
            raise _no_usable_records(data_path, store.stats, min_supervised)
        if local_rank == 0:
            store.report(data_path)
        return store

    def report(self, data_path, file=None) -> None:
        """Skipped records on stderr: the count by reason and the first few ids and reasons."""
        s = self.stats
        skipped = s["skipped"]["bad_record"] + s["skipped"]["few_supervised"]
        file = file or sys.stderr
        if skipped:
            print(f"[data] {data_path}: {s['usable']} of {s['records']} records usable; skipped "
                  f"{s['skipped']['bad_record']} that failed to parse, render or tokenise and "
                  f"{s['skipped']['few_supervised']} with too few supervised tokens", file=file)
            for e in s["first_errors"]:
                print(f"[data]   record {e['id']} ({e['where']}): {e['reason']}", file=file)

    # -- reading ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, loss mask uint8) of sample i: read-only views into the memory map."""
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} of a store with {self._n}")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._tokens[a:b], self._mask[a:b]

    def name(self, i: int) -> tuple[str, str]:
        a, b = int(self._names_off[i]), int(self._names_off[i + 1])
        sid, category = json.loads(bytes(self._names[a:b]).decode())
        return sid, category

    def sample(self, i: int) -> Sample:
        ids, mask = self.arrays(i)
        sid, category = self.name(i)
        return Sample(id=sid, category=category, input_ids=ids.tolist(), loss_mask=mask.tolist())

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample, [N] int32 (memory-mapped)."""
        return self._lengths

    @property
    def num_anchor_candidates(self) -> np.ndarray:
        """Anchor candidates per sample (m[p] == m[p+1] == 1), [N] int32 (memory-mapped)."""
        return self._anchors


# -- building once per node ---------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_locked(root: Path, key: str, data_path, target, max_length, min_supervised, meta, *, workers, progress):
    failed = root / f".{key}.failed"
    with _file_lock(root / f".{key}.lock"):
        final = root / key
        if (final / _META).is_file():  # another run or node built it while we waited for the lock
            return
        failed.unlink(missing_ok=True)
        tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build_store(data_path, target, max_length, min_supervised, tmp, meta, workers=workers, progress=progress)
            _publish(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            message = str(exc) if isinstance(exc, DFlashLabError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                failed.write_text(json.dumps({"error": message, "pid": os.getpid(), "time": time.time()}))
            raise


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`, atomically; never delete a published store.

    flock is node-local on some shared filesystems (Lustre `localflock`), so two nodes may build the
    same key at once (issue 23 item 8). The first rename wins; a later builder finds `final` complete
    and drops its own unpublished copy: the published one may already be mapped by another node's
    ranks. Only a directory without store.json (a half directory a crashed older version left; no
    reader opens it) is moved aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
            if (final / _META).is_file():  # another builder published first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return
            aside = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise DFlashLabError(f"token store {final}: could not publish the new build; delete {final} and rerun")


def _wait_for(root: Path, key: str, poll_s: float) -> None:
    """Poll until local rank 0 has renamed the finished store into place, or has failed."""
    final, failed = root / key / _META, root / f".{key}.failed"
    started = time.time()
    last_note = started
    while not final.is_file():
        if failed.is_file() and failed.stat().st_mtime >= started - 60:
            try:
                message = json.loads(failed.read_text()).get("error", "")
            except (OSError, json.JSONDecodeError):
                message = "(no message)"
            raise DFlashLabError(f"token store {root / key}: local rank 0 failed to build it: {message}")
        if time.time() - last_note > 300:
            print(f"[data] still waiting for local rank 0 to build the token store {root / key}", file=sys.stderr)
            last_note = time.time()
        time.sleep(poll_s)


def _no_usable_records(data_path, stats: dict, min_supervised: int) -> DFlashLabError:
    records, bad = stats["records"], stats["skipped"]["bad_record"]
    first = "; ".join(f"{e['id']}: {e['reason']}" for e in stats["first_errors"][:3])
    if stats.get("prompt_like"):
        return DFlashLabError(
            f"data {data_path}: no record has an assistant response ({stats['prompt_like']} of {records} end with a "
            f"user turn: this looks like a prompt set); run `dflash-lab label --prompts {data_path} --target TARGET "
            "--out LABELS` to get the target's responses, then train on LABELS")
    if bad == records:
        return DFlashLabError(
            f"data {data_path}: no record has an assistant response that renders ({records} records failed; "
            f"first: {first}); each record needs `messages` ending with an assistant turn, as `dflash-lab label` writes")
    return DFlashLabError(
        f"data {data_path}: no usable record ({stats['skipped']['few_supervised']} of {records} have fewer than "
        f"{min_supervised} supervised tokens, {bad} failed to render{'; first: ' + first if first else ''}); "
        "lower data.min_supervised or raise data.max_length")


__all__ = ["TokenStore", "build_store", "store_key", "tokenizer_fingerprint", "data_identity", "default_root",
           "tokenize_chunk", "STORE_FORMAT"]
