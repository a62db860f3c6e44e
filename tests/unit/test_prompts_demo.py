"""The offline demo prompt pack."""

from __future__ import annotations

import json
import re

from dflash_lab.data.demo_pack import build_demo_pack, gen_math
from dflash_lab.data.records import read_prompts


def test_demo_pack_builds_and_is_deterministic(tmp_path):
    a = build_demo_pack(tmp_path / "a", n_math=300, n_code=200, n_chat=150, seed=5)
    b = build_demo_pack(tmp_path / "b", n_math=300, n_code=200, n_chat=150, seed=5)
    c = build_demo_pack(tmp_path / "c", n_math=300, n_code=200, n_chat=150, seed=6)
    assert (a / "prompts.jsonl").read_bytes() == (b / "prompts.jsonl").read_bytes()
    assert (a / "prompts.jsonl").read_bytes() != (c / "prompts.jsonl").read_bytes()
    man = json.loads((a / "manifest.json").read_text())
    assert man["counts"]["by_category"] == {"chat": 150, "code": 200, "math": 300}
    assert man["kind"] == "demo"
    rows = read_prompts(a / "prompts.jsonl")
    assert len({r["id"] for r in rows}) == 650
    code = [r["messages"][0]["content"] for r in rows if r["category"] == "code"]
    assert sum("```python\ndef " in t or "```python\nimport" in t for t in code) >= 50  # stdlib function completion
    assert sum(t.startswith(("Write a", "Implement", "Create")) for t in code) >= 50
    math = [r["messages"][0]["content"] for r in rows if r["category"] == "math"]
    assert all(re.search(r"\d", t) and "?" in t for t in math)


def test_demo_pack_decontaminates_given_texts(tmp_path):
    import random

    planted = gen_math(random.Random("5:math"))  # the first math prompt the pack generates for seed 5
    out = build_demo_pack(tmp_path / "d", n_math=50, n_code=10, n_chat=10, seed=5, bench_texts={"mine": [planted]})
    man = json.loads((out / "manifest.json").read_text())
    assert man["decontamination"]["benchmarks"]["mine"]["removed"] == 1
    texts = {r["messages"][0]["content"] for r in read_prompts(out / "prompts.jsonl")}
    assert planted not in texts and len(texts) == 70


def test_math_variety():
    import random

    rng = random.Random(0)
    probs = [gen_math(rng) for _ in range(500)]
    assert len(set(probs)) == 500
    assert len({p.split()[0] for p in probs}) > 30  # many names and openings
