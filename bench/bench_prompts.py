"""Benchmark `dflash-lab prompts build` end to end (not a test).

Generates N synthetic prompts (default 900,000; math/code/chat jsonl files with realistic lengths),
10% of them planted near-duplicates of benchmark items from BENCH_DIR, and a 300,000-id manifest to
subtract (half of its ids are prompts of the mix). Then runs `python -m dflash_lab prompts build`
in a child process (decontamination against all five benchmarks, hash subtraction) and reports
prompts/s, the child's peak RSS, and caught/planted.

    python bench/bench_prompts.py --bench-dir ../shared/data/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_lab.data.decontam import load_bench_dir, words_of  # noqa: E402
from dflash_lab.data.manifest import write_ids, write_manifest  # noqa: E402
from dflash_lab.data.records import prompt_id  # noqa: E402

PREFIXES = ("Question {i}:", "Please solve the following ({i}).", "Task #{i}.", "Homework item {i} -", "Hi! Quick one, ref {i}:")
SUFFIXES = ("", " Thanks!", " Show your work.", " Explain briefly.", " Answer concisely.")


def plant(text: str, i: int, rng: random.Random) -> str | None:
    """A near-duplicate of a benchmark text that is a distinct prompt (its own id)."""
    w = text.split()
    nwords = len(words_of(text))
    if nwords < 8:
        return None  # such items are matched only exactly; planted once each, separately
    if nwords >= 30:  # change one word in the middle
        j = len(w) // 2
        w[j] = rng.choice(("several", "exactly", "banana", "seventeen", "purple"))
    body = " ".join(w)
    if rng.random() < 0.3:
        body = body.upper() if rng.random() < 0.5 else body.replace(" ", "  ")
    return rng.choice(PREFIXES).format(i=i) + " " + body + rng.choice(SUFFIXES)


def synth(rng: random.Random, vocab: list[str], lo: int, hi: int, i: int, kind: str) -> str:
    n = rng.randint(lo, hi)
    words = rng.choices(vocab, k=n)
    if kind == "code":
        return f"Write a function `{words[0]}_{i}` that " + " ".join(words[1:]) + ".\n\n```python\ndef " + f"{words[0]}_{i}(x):\n    pass\n```"
    return f"{kind} item {i}: " + " ".join(words) + "?"


def generate(work: Path, n: int, n_exclude: int, bench: dict, seed: int = 0) -> dict:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(6000)})
    n_planted = n // 10
    bench_items = [(b, t) for b in sorted(bench) for t in bench[b]]
    exact_items = [(b, t) for b, t in bench_items if len(words_of(t)) < 8]
    long_items = [(b, t) for b, t in bench_items if len(words_of(t)) >= 8]
    planted = [t.upper() for _, t in exact_items]  # exact after normalisation
    k = 0
    while len(planted) < n_planted:
        b, t = long_items[k % len(long_items)]
        p = plant(t, k, rng)
        if p is not None:
            planted.append(p)
        k += 1
    planted = planted[:n_planted]
    n_clean = n - len(planted)
    shares = {"math": (0.45, 30, 110), "code": (0.33, 40, 220), "chat": (0.22, 8, 140)}
    files = {}
    clean_ids = []
    counts = {}
    pi = 0
    for ci, (cat, (frac, lo, hi)) in enumerate(shares.items()):
        m = int(n_clean * frac) if ci < 2 else n_clean - sum(counts.values())
        per_cat_planted = len(planted) // 3 if ci < 2 else len(planted) - 2 * (len(planted) // 3)
        path = work / f"{cat}.jsonl"
        rows = []
        for i in range(m):
            t = synth(rng, vocab, lo, hi, i, cat)
            rows.append(t)
            if i % 3 == 0:
                clean_ids.append(prompt_id(t))
        rows.extend(planted[pi : pi + per_cat_planted])
        pi += per_cat_planted
        rng.shuffle(rows)
        field = "messages" if cat == "chat" else "prompt"
        with open(path, "w", encoding="utf-8") as fh:
            for t in rows:
                row = {"messages": [{"role": "user", "content": t}]} if field == "messages" else {"prompt": t, "tag": cat}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        files[cat] = path
        counts[cat] = m
    # the manifest to subtract: half real ids of this mix, half random
    ex_ids = clean_ids[: n_exclude // 2]
    ex_ids += [f"{rng.getrandbits(80):020x}" for _ in range(n_exclude - len(ex_ids))]
    ex_dir = work / "earlier"
    ex_dir.mkdir()
    ref = write_ids(ex_dir, ex_ids)
    write_manifest(ex_dir, {"kind": "synthetic", "ids": ref, "counts": {}, "output": {}})
    return {"files": files, "planted": len(planted), "excluded_real": len(set(clean_ids[: n_exclude // 2])),
            "exclude_manifest": ex_dir / "manifest.json"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", required=True)
    ap.add_argument("--n", type=int, default=900_000)
    ap.add_argument("--exclude-n", type=int, default=300_000)
    ap.add_argument("--workdir", help="keep generated files here (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = load_bench_dir(args.bench_dir)
        t0 = time.perf_counter()
        gen = generate(work, args.n, args.exclude_n, bench)
        t_gen = time.perf_counter() - t0
        recipe = {
            "name": "bench-900k", "seed": 0,
            "sources": [
                {"name": "math", "path": str(gen["files"]["math"]), "prompt_field": "prompt", "tag_field": "tag", "category": "math"},
                {"name": "code", "path": str(gen["files"]["code"]), "prompt_field": "prompt", "category": "code"},
                {"name": "chat", "path": str(gen["files"]["chat"]), "messages_field": "messages", "category": "chat"},
            ],
            "exclude": [str(gen["exclude_manifest"])],
            "decontaminate": {"bench_dir": str(Path(args.bench_dir).resolve()), "ngram": 13, "threshold": 0.0},
        }
        cfg = work / "mix.yaml"
        cfg.write_text(json.dumps(recipe))  # JSON is YAML
        out = work / "out"
        load0 = os.getloadavg()[0]
        t1 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dflash_lab", "prompts", "build", "--config", str(cfg), "--out", str(out)],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        wall = time.perf_counter() - t1
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return 1
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss_mb = ru.ru_maxrss / 1024
        cpu_s = ru.ru_utime + ru.ru_stime
        man = json.loads((out / "manifest.json").read_text())
        c = man["counts"]
        caught = c["removed"]["contaminated"]
        rows = [
            ("prompts read", f"{c['read']:,}"),
            ("generation (s, not timed)", f"{t_gen:.1f}"),
            ("build wall (s)", f"{wall:.1f}"),
            ("prompts/s end to end", f"{c['read'] / wall:,.0f}"),
            ("CPU seconds of the build (all processes)", f"{cpu_s:.1f}"),
            ("load average before the build (1 min)", f"{load0:.2f}"),
            ("peak RSS of the build (MB)", f"{rss_mb:,.0f}"),
            ("planted near-duplicates", f"{gen['planted']:,}"),
            ("removed as contaminated", f"{caught:,}"),
            ("caught / planted", f"{caught}/{gen['planted']}"),
            ("excluded by the 300K manifest (expected)", f"{c['removed']['excluded']:,} ({gen['excluded_real']:,})"),
            ("kept", f"{c['kept']:,}"),
            ("accounting read == kept + removed", str(c["read"] == c["kept"] + sum(c["removed"].values()))),
        ]
        w = max(len(a) for a, _ in rows)
        print(f"machine: {platform.machine()} {os.cpu_count()}-core CPU, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"{'metric'.ljust(w)}  value\n{'-' * w}  -----")
        for a, b in rows:
            print(f"{a.ljust(w)}  {b}")
        print("per benchmark removed:", {b: v["removed"] for b, v in man["decontamination"]["benchmarks"].items()})
        ok = caught == gen["planted"] and c["removed"]["excluded"] == gen["excluded_real"]
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
