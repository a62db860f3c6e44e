"""Decontamination: exact and n-gram rules on planted near-duplicates of real benchmark items."""

from __future__ import annotations

import json

import pytest

from dflash_lab.data.decontam import Decontaminator, decontaminate, load_bench_dir, load_extra_file
from dflash_lab.data.mix import build_mix
from dflash_lab.data.records import read_prompts

@pytest.fixture(scope="module")
def bench(bench_dir):
    """../shared's benchmark files, or on a fresh clone the fixture files of the same shape (conftest)."""
    return load_bench_dir(bench_dir)


def test_load_bench_dir_sizes(bench):
    assert {k: len(v) for k, v in bench.items()} == {
        "gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 257, "mt_bench": 160}


def test_exact_and_ngram_on_planted_items(bench):
    g = bench["gsm8k"][10]
    m = bench["math500"][3]
    h = bench["humaneval"][0]
    mt2 = bench["mt_bench"][1]  # a second turn
    words = g.split()
    mid = len(words) // 2
    near_g = " ".join(words[:mid] + ["seventeen"] + words[mid + 1:])  # one word changed
    texts = [
        "  " + g.upper() + "  ",  # exact after normalisation
        "Please help me: " + near_g + " Answer with a number.",  # n-gram
        m.replace("\\", " \\"),  # LaTeX spacing changed: words still match
        "Complete this code.\n" + h,
        mt2,
        "What is the capital of France? Answer in one word.",  # clean
        "Write a haiku about a lighthouse keeper who loves tea and long walks on the beach at dawn.",  # clean
    ]
    rep = decontaminate(texts, bench)
    assert rep.kept == [5, 6]
    assert rep.removed["gsm8k"] == 2 and rep.removed["math500"] == 1
    assert rep.removed["humaneval"] == 1 and rep.removed["mt_bench"] == 1
    assert rep.by_rule["exact"] >= 2 and rep.by_rule["ngram"] >= 2


def test_threshold_fraction(bench):
    g = bench["gsm8k"][0]
    long_prefix = " ".join(f"unrelated{i} filler{i}" for i in range(100))
    text = long_prefix + " " + g  # a small fraction of its 13-grams come from gsm8k
    d0 = Decontaminator(bench, ngram=13, threshold=0.0)
    hit = d0.check(text)
    assert hit.benchmark == "gsm8k" and hit.rule == "ngram" and 0 < hit.fraction < 0.3
    assert Decontaminator(bench, ngram=13, threshold=0.5).check(text) is None
    assert Decontaminator(bench, ngram=13, threshold=0.5).check("Note: " + g).benchmark == "gsm8k"


def test_ngram_size_configurable():
    b = {"toy": ["the quick brown fox jumps over the lazy dog near the river bank today"]}
    probe = "I saw that the quick brown fox jumps over a cat"
    assert Decontaminator(b, ngram=13).check(probe) is None
    assert Decontaminator(b, ngram=5).check(probe).benchmark == "toy"
    assert Decontaminator(b, ngram=4).check("nothing in common at all here") is None


def test_short_benchmark_items_and_min_words():
    b = {"mt": ["Rewrite your previous response. Start every sentence with the letter A.", "Explain more."]}
    d = Decontaminator(b, ngram=13, min_words=8)
    assert d.check("Thanks! Now rewrite your previous response, start every sentence with the letter A please").rule == "short"
    assert d.check("explain   MORE.").rule == "exact"
    assert d.check("Could you explain more about cats?") is None  # 2-word item: exact match only


def test_extra_file_and_recipe_decontamination(tmp_path, bench, bench_dir):
    extra = tmp_path / "private_eval.jsonl"
    extra.write_text(json.dumps({"question": "Our private eval asks how many marbles twelve purple frogs can juggle while riding a bicycle uphill"}) + "\n")
    assert len(load_extra_file(extra)) == 1
    g = bench["gsm8k"][42]
    rows = [{"p": "Solve: " + g}, {"p": bench["mbpp"][5]}, {"p": "A clean prompt about owls."},
            {"p": "I wonder: how many marbles twelve purple frogs can juggle while riding a bicycle uphill, really?"},
            {"p": bench["mt_bench"][0] + " Make it funny."}]
    with open(tmp_path / "src.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    rec = {"sources": [{"name": "s", "path": "src.jsonl", "prompt_field": "p", "category": "chat"}],
           "decontaminate": {"bench_dir": str(bench_dir), "extra_files": ["private_eval.jsonl"]}}
    man = build_mix(rec, tmp_path / "out", base_dir=tmp_path)
    out = read_prompts(tmp_path / "out" / "prompts.jsonl")
    assert [r["messages"][0]["content"] for r in out] == ["A clean prompt about owls."]
    d = man["decontamination"]
    assert {b: v["removed"] for b, v in d["benchmarks"].items()} == {
        "gsm8k": 1, "humaneval": 0, "math500": 0, "mbpp": 1, "mt_bench": 1, "private_eval": 1}
    assert d["benchmarks"]["gsm8k"]["examples"][0]["text"].startswith("Solve: ")
    assert man["counts"]["removed"]["contaminated"] == 4
    assert len(d["inputs"]) == 6 and all(len(i["sha256"]) == 64 for i in d["inputs"])
