"""Token store benchmark: build time, records/s, store size, and a rank's memory after opening.

    python bench/bench_data.py --records 200000 --small 20000 --out /tmp/bench-data
    python bench/bench_data.py --rss-only --records 200000 --small 20000 --out /tmp/bench-data

Writes synthetic labelled records (response lengths drawn like Qwen3 non-thinking answers:
log-normal, median about 600 tokens, long tail clipped at 3,072 with `finish_reason: "length"`),
builds the token store for the first `--small` records and for all of them with the embedded
SmolLM2 tokenizer, then opens each store in a fresh process (as a rank does), reads 1,000 samples
spread over the store, and reports that process's memory: VmRSS, and its private part RssAnon
(file pages of a memory map are shared and reclaimable; RssAnon is what grows with the data if
anything was loaded). Prints a Markdown table for BENCHMARKS.md and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the of and to in is that for it as with was on be by this are or from at which an have not "
         "but all can one more we if will their has there so each other about when what these how up "
         "out them then some she many would make like into time has look two write go see number no way "
         "could people my than first water been call who oil its now find long down day did get come made "
         "may part answer step total value equation function return result sum first second therefore "
         "def list print range len int str if else while for import numpy x y z 12 7 48 100 3.5 = + - * /").split()


def response_lengths(n: int, seed: int = 0, median: float = 600.0, sigma: float = 0.65, cap: int = 3072) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), 8, cap).astype(np.int64)


def write_records(out: Path, n: int, tokens_per_word: float, seed: int = 0, shard: int = 10_000) -> Path:
    """`n` labelled records in `shard-*.jsonl` files + a meta.json, as `dflash-lab label` writes."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    lengths = response_lengths(n, seed)
    words = np.array(WORDS)
    handle = None
    for i in range(n):
        if i % shard == 0:
            if handle:
                handle.close()
            handle = open(out / f"shard-{i // shard:05d}.jsonl", "w")
        n_words = max(1, int(lengths[i] / tokens_per_word))
        response = " ".join(words[rng.integers(0, len(words), n_words)])
        prompt = " ".join(words[rng.integers(0, len(words), int(rng.integers(15, 150)))])
        record = {"id": f"syn-{i}", "category": "synthetic", "source": "bench",
                  "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                  "response_tokens": int(lengths[i]), "finish_reason": "length" if lengths[i] >= 3072 else "stop"}
        handle.write(json.dumps(record) + "\n")
    handle.close()
    (out / "meta.json").write_text(json.dumps({"format": 1, "synthetic": n, "seed": seed}))
    return out


_OPEN_SCRIPT = """
import json, sys, numpy as np
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from dflash_lab.train.store import TokenStore
def status():
    fields = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
before = status()
store = TokenStore(sys.argv[1])
n = len(store)
# what a rank does at start: the per-sample tables a sampler reads, and a first few samples
tokens = int(store.lengths.sum()) + 0 * int(store.num_anchor_candidates.sum())
for i in range(0, n, max(1, n // 10)):
    store.sample(i)
opened = status()
for i in np.linspace(0, n - 1, 1000).astype(int):
    store.sample(int(i))
after = status()
print(json.dumps({"before": before, "opened": opened, "after": after, "n": n, "tokens": tokens}))
"""


def open_rss(store_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _OPEN_SCRIPT, str(store_path), str(REPO)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_store(path: Path, n: int, seed: int = 0) -> Path:
    """A store with `n` samples of the same length distribution (prompt 20-200 + response tokens),
    written directly (random ids, no tokenizer): the memory side at full size in seconds."""
    from dflash_lab.train import store as St

    if (path / "store.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    responses = response_lengths(n, seed)
    writer = St._StoreWriter(path)
    for start in range(0, n, 10_000):
        resp = responses[start:start + 10_000]
        prompt = rng.integers(20, 200, len(resp))
        lengths = np.minimum(prompt + resp + 1, 3072).astype(np.int32)
        mask = np.concatenate([np.r_[np.zeros(p, np.uint8), np.ones(l - p, np.uint8)] for p, l in zip(prompt, lengths)])
        writer.add(St._ChunkResult(tokens=rng.integers(0, 49_152, int(lengths.sum()), dtype=np.int32), mask=mask,
                                   lengths=lengths, anchors=(lengths - prompt - 1).astype(np.int32),
                                   names=[json.dumps([f"syn-{start + j}", "synthetic"]).encode() for j in range(len(resp))],
                                   records=len(resp)))
    writer.finish({"key": f"synthetic-{n}"})
    return path


def rss_only(args) -> int:
    rows = {}
    for n in (args.small, args.records):
        path = synthetic_store(Path(args.out) / f"synthetic-store-{n}", n)
        mem = open_rss(path)
        rows[n] = {"records": n, "tokens": mem["tokens"], "store_mb": round(dir_size(path) / 1e6, 1), **_mem_columns(mem)}
    _mem_table(rows, args.small, args.records)
    diff = rows[args.records]["rss_open_mb"] - rows[args.small]["rss_open_mb"]
    print(json.dumps({"rows": rows, "rss_open_diff_mb": round(diff, 1)}))
    return 0 if diff < 100 else 1


def _mem_columns(mem: dict) -> dict:
    mb = lambda v: round(v / 1e6, 1)  # noqa: E731
    return {"rss_open_mb": mb(mem["opened"]["VmRSS"]), "rss_anon_open_mb": mb(mem["opened"]["RssAnon"]),
            "rss_after_reads_mb": mb(mem["after"]["VmRSS"]), "rss_anon_after_reads_mb": mb(mem["after"]["RssAnon"]),
            "rss_file_after_reads_mb": mb(mem["after"]["RssFile"])}


def _mem_table(rows: dict, small: int, big: int) -> None:
    print("\n| samples | tokens | store MB | RSS after opening MB | private (RssAnon) MB | RSS after 1,000 spread reads MB | "
          "of which file pages MB | private MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['records']:,} | {r['tokens']:,} | {r['store_mb']} | {r['rss_open_mb']} | {r['rss_anon_open_mb']} | "
              f"{r['rss_after_reads_mb']} | {r['rss_file_after_reads_mb']} | {r['rss_anon_after_reads_mb']} |")
    a, b = rows[small], rows[big]
    print(f"\nRSS after opening, {big:,} vs {small:,} samples: {b['rss_open_mb'] - a['rss_open_mb']:+.1f} MB (limit 100 MB); "
          f"private memory after 1,000 reads: {b['rss_anon_after_reads_mb'] - a['rss_anon_after_reads_mb']:+.1f} MB")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--out", default="/tmp/bench-data")
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--max-length", type=int, default=3072)
    ap.add_argument("--workers", type=int, default=None, help="default: every core this process may use")
    ap.add_argument("--rss-only", action="store_true",
                    help="only the memory side: stores of --small and --records samples with the same length "
                         "distribution written directly (random ids, no tokenizer), opened in a fresh process")
    args = ap.parse_args()
    if args.rss_only:
        return rss_only(args)

    from dflash_lab.models.target import load_target
    from dflash_lab.train.store import TokenStore, default_workers

    out = Path(args.out)
    target = load_target(args.target, dtype="float32")
    sample_text = " ".join(WORDS * 4)
    tokens_per_word = len(target.encode(sample_text)) / len(sample_text.split())
    rows = {}
    for n in (args.small, args.records):
        data = out / f"data-{n}"
        if not (data / "meta.json").exists():
            t0 = time.perf_counter()
            write_records(data, n, tokens_per_word)
            print(f"wrote {n} records in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        root = out / f"store-{n}"
        t0, c0 = time.perf_counter(), os.times()
        store = TokenStore.open_or_build(data, target, args.max_length, 2, root=root, progress=True, workers=args.workers)
        build_s, c1 = time.perf_counter() - t0, os.times()
        cpu_s = (c1.user + c1.system + c1.children_user + c1.children_system) - (c0.user + c0.system + c0.children_user + c0.children_system)
        if store.meta["build"]["pid"] != os.getpid():  # built by an earlier run: its own figure, if it kept one
            cpu_s = store.meta["build"].get("cpu_seconds")
        mem = open_rss(store.path)
        rows[n] = {
            "records": n, "usable": len(store), "tokens": int(store.stats["tokens"]),
            "median_response_tokens": int(np.median(response_lengths(n))),
            "build_s": round(store.stats["build_seconds"] or build_s, 1),
            "records_per_s": round(n / (store.stats["build_seconds"] or build_s), 1),
            "workers": store.meta["build"]["workers"],
            "cpu_s": round(cpu_s, 1) if cpu_s else None, "records_per_cpu_s": round(n / cpu_s, 1) if cpu_s else None,
            "data_mb": round(sum(f.stat().st_size for f in data.glob("shard-*.jsonl")) / 1e6, 1),
            "store_mb": round(dir_size(store.path) / 1e6, 1),
            **_mem_columns(mem),
        }
    print("| records | usable | tokens | build s (wall) | records/s (wall) | CPU s | records per CPU s | workers | jsonl MB | store MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['records']:,} | {r['usable']:,} | {r['tokens']:,} | {r['build_s']} | {r['records_per_s']} | {r['cpu_s']} | "
              f"{r['records_per_cpu_s']} | {r['workers']} | {r['data_mb']} | {r['store_mb']} |")
    _mem_table(rows, args.small, args.records)
    diff = rows[args.records]["rss_open_mb"] - rows[args.small]["rss_open_mb"]
    print(f"cores available: {default_workers()}")
    print(json.dumps({"rows": rows, "rss_open_diff_mb": round(diff, 1)}))
    return 0 if diff < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
