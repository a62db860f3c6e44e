"""Decontamination against evaluation benchmarks: exact match and word n-gram overlap.

Rules (a prompt is removed by the first that fires):

* exact: the prompt's normalised text (case-folded, whitespace collapsed; the id's text) equals a
  benchmark text's normalised text.
* ngram: words are the whitespace-separated tokens of the case-folded text after ASCII
  punctuation is replaced by spaces. With ``n`` (default 13), a prompt's
  *n-gram hit fraction* is (distinct prompt n-grams found in any benchmark text) / (distinct prompt
  n-grams). ``threshold == 0`` removes on any hit; ``threshold > 0`` removes when the fraction is
  ``>= threshold``. The removal is attributed to the benchmark with the most hits.
* short items: a benchmark text with fewer than ``n`` but at least ``min_words`` (default 8) words
  has no n-gram; it matches when its whole word sequence occurs in the prompt. Benchmark texts
  under ``min_words`` words are matched only exactly.

The core is ``Decontaminator(bench_texts)`` / ``decontaminate(texts, bench_texts)`` taking
``{benchmark_name: [texts]}``; ``load_bench_dir`` reads the five benchmark files.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dflash_lab.data.records import normalize_text, prompt_id
from dflash_lab.errors import DFlashLabError

BENCHMARKS = ("gsm8k", "math500", "humaneval", "mbpp", "mt_bench")
BENCH_FILES = {
    "gsm8k": "gsm8k.test.jsonl",
    "math500": "math500.test.jsonl",
    "humaneval": "humaneval.test.jsonl",
    "mbpp": "mbpp.sanitized.json",
    "mt_bench": "mt_bench.question.jsonl",
}
MBPP_TEST_IDS = range(11, 511)

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def words_of(text: str) -> list[str]:
    """Words for n-grams: the case-folded text with ASCII punctuation turned into spaces, split."""
    return text.casefold().translate(_PUNCT).split()


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_bench_dir(bench_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Texts of the five benchmarks from a folder laid out as BENCH_FILES.

    gsm8k `question`; math500 `problem`; humaneval `prompt`; mbpp (JSON list) `prompt` of the test
    split (task_id 11..510); mt_bench both `turns`.
    """
    bench_dir = Path(bench_dir)
    names = list(names or BENCHMARKS)
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in BENCH_FILES:
            raise DFlashLabError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        path = bench_dir / BENCH_FILES[name]
        if not path.is_file():
            raise DFlashLabError(
                f"benchmark file {path} not found; put {BENCH_FILES[name]} in {bench_dir} "
                "or fix decontaminate.bench_dir / decontaminate.benchmarks in the recipe"
            )
        try:
            if name == "gsm8k":
                out[name] = [r["question"] for r in _read_jsonl(path)]
            elif name == "math500":
                out[name] = [r["problem"] for r in _read_jsonl(path)]
            elif name == "humaneval":
                out[name] = [r["prompt"] for r in _read_jsonl(path)]
            elif name == "mbpp":
                rows = json.loads(path.read_text(encoding="utf-8"))
                out[name] = [r["prompt"] for r in rows if r["task_id"] in MBPP_TEST_IDS]
            else:
                out[name] = [t for r in _read_jsonl(path) for t in r["turns"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise DFlashLabError(f"benchmark file {path} is not in the expected layout ({exc!r})") from None
    return out


_TEXT_KEYS = ("prompt", "question", "problem", "instruction", "text", "content", "input")


def _texts_from_row(row) -> list[str]:
    if isinstance(row, str):
        return [row]
    if not isinstance(row, dict):
        return []
    if isinstance(row.get("turns"), list):
        return [t for t in row["turns"] if isinstance(t, str)]
    if isinstance(row.get("messages"), list):
        return [m.get("content") for m in row["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for k in _TEXT_KEYS:
        if isinstance(row.get(k), str):
            return [row[k]]
    return []


def load_extra_file(path: str | Path) -> list[str]:
    """Texts of an extra contamination file: .txt (one text per line), .jsonl or .json (a list).

    From each row: `turns` (all), `messages` (all contents), or the first of prompt, question,
    problem, instruction, text, content, input.
    """
    path = Path(path)
    if not path.is_file():
        raise DFlashLabError(f"decontamination file {path} not found; fix decontaminate.extra_files")
    try:
        if path.suffix == ".txt":
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else [data]
        else:
            rows = _read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DFlashLabError(f"decontamination file {path}: cannot read it ({exc})") from None
    texts = [t for r in rows for t in _texts_from_row(r)]
    if not texts:
        raise DFlashLabError(f"decontamination file {path}: found no texts (see docs/prompts.md for the fields read)")
    return texts


@dataclass
class Hit:
    benchmark: str
    rule: str  # exact | ngram | short
    fraction: float = 1.0


@dataclass
class DecontamReport:
    kept: list[int] = field(default_factory=list)  # indices of kept texts
    removed: dict = field(default_factory=dict)  # benchmark -> count
    by_rule: dict = field(default_factory=dict)  # rule -> count
    examples: dict = field(default_factory=dict)  # benchmark -> [texts]


class Decontaminator:
    """Indexes benchmark texts once; ``check(text)`` says which rule (if any) removes a prompt.

    Speed: besides the full n-gram table it keeps a prefilter of all benchmark g-grams
    (g = ceil(n/2)); a prompt's g-grams are looked up only at every s-th word (g + s - 1 = n), which
    is enough to see any shared n-gram, so a clean prompt costs about n/s times fewer lookups.
    """

    def __init__(self, bench_texts: dict[str, list[str]], ngram: int = 13, threshold: float = 0.0, min_words: int = 8):
        if ngram < 1:
            raise DFlashLabError(f"decontamination ngram must be >= 1, got {ngram}")
        self.n = n = ngram
        self.threshold = threshold
        self.min_words = min_words = max(1, min(min_words, ngram))
        self.names = sorted(bench_texts)
        self.exact: dict[str, str] = {}
        self.grams: dict[tuple, object] = {}  # n-gram -> benchmark name, or a tuple of names
        self.short: dict[int, dict[tuple, str]] = {}
        self.g = (n + 1) // 2
        self.s = n - self.g + 1
        self.g2 = (min_words + 1) // 2
        self.s2 = min_words - self.g2 + 1
        self.pre: set[tuple] = set()
        self.pre2: set[tuple] = set()
        for name in self.names:
            for text in bench_texts[name]:
                if not isinstance(text, str) or not text.strip():
                    continue
                self.exact.setdefault(prompt_id(text), name)
                w = words_of(text)
                if len(w) >= n:
                    for g in set(zip(*[w[i:] for i in range(n)])):
                        prev = self.grams.get(g)
                        if prev is None:
                            self.grams[g] = name
                        elif prev != name and (isinstance(prev, str) or name not in prev):
                            self.grams[g] = (prev, name) if isinstance(prev, str) else prev + (name,)
                    self.pre.update(zip(*[w[i:] for i in range(self.g)]))
                elif len(w) >= min_words:
                    self.short.setdefault(len(w), {}).setdefault(tuple(w), name)
                    self.pre2.update(zip(*[w[i:] for i in range(self.g2)]))
        self._short_lengths = sorted(self.short)
        self.sizes = {name: len(bench_texts[name]) for name in self.names}

    def check(self, text: str, pid: str | None = None) -> Hit | None:
        """The rule that removes ``text``, or None when it is clean."""
        name = self.exact.get(pid or prompt_id(text))
        if name is not None:
            return Hit(name, "exact")
        w = words_of(text)
        nw = len(w)
        n = self.n
        if nw >= n and self.grams:
            g, s = self.g, self.s
            if not self.pre.isdisjoint(zip(*[w[i::s] for i in range(g)])):
                hit = self._ngram_hit(w)
                if hit is not None:
                    return hit
        if self.short and nw >= self.min_words:
            g2, s2 = self.g2, self.s2
            if not self.pre2.isdisjoint(zip(*[w[i::s2] for i in range(g2)])):
                for L in self._short_lengths:
                    if L > nw:
                        break
                    table = self.short[L]
                    for gram in zip(*[w[i:] for i in range(L)]):
                        if gram in table:
                            return Hit(table[gram], "short")
        return None

    def _ngram_hit(self, w: list[str]) -> Hit | None:
        grams = self.grams
        mine = set(zip(*[w[i:] for i in range(self.n)]))
        counts: dict[str, int] = {}
        hits = 0
        for gram in mine:
            owner = grams.get(gram)
            if owner is None:
                continue
            hits += 1
            for b in (owner,) if isinstance(owner, str) else owner:
                counts[b] = counts.get(b, 0) + 1
        if not hits:
            return None
        frac = hits / len(mine)
        if self.threshold <= 0 or frac >= self.threshold:
            best = max(sorted(counts), key=lambda b: counts[b])
            return Hit(best, "ngram", frac)
        return None


def decontaminate(
    texts: list[str],
    bench_texts: dict[str, list[str]],
    ngram: int = 13,
    threshold: float = 0.0,
    min_words: int = 8,
    n_examples: int = 3,
) -> DecontamReport:
    """Check ``texts`` against ``{benchmark: [texts]}``; returns kept indices and removals per benchmark."""
    dec = Decontaminator(bench_texts, ngram=ngram, threshold=threshold, min_words=min_words)
    rep = DecontamReport(removed={b: 0 for b in dec.names})
    for i, t in enumerate(texts):
        hit = dec.check(t)
        if hit is None:
            rep.kept.append(i)
            continue
        rep.removed[hit.benchmark] = rep.removed.get(hit.benchmark, 0) + 1
        rep.by_rule[hit.rule] = rep.by_rule.get(hit.rule, 0) + 1
        ex = rep.examples.setdefault(hit.benchmark, [])
        if len(ex) < n_examples:
            ex.append(t[:300])
    return rep


__all__ = [
    "BENCHMARKS", "BENCH_FILES", "Decontaminator", "DecontamReport", "Hit", "decontaminate",
    "load_bench_dir", "load_extra_file", "words_of", "normalize_text",
]
