import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# that spin-wait for each other made the decoding tests 10x slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "data" / "benchmarks"


# Real benchmark sizes: a fresh clone without ../shared gets a folder of the same shape.
FIXTURE_SIZES = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 257, "mt-bench": 80}


def write_fixture_benchmarks(root: Path) -> Path:
    """Every benchmark file `--bench-dir` reads, in its real format and size, with rows the tests
    write (simple questions a 135M chat model answers), and the paper's index lists computed by
    SPEC section 6's rule (`numpy.random.default_rng(0).permutation(n)[:128]`). A fresh clone with
    no ../shared runs every test on it."""
    import json

    import numpy as np

    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # long, distinct rows: the decontamination tests need 13-word n-grams that only one item holds
    jsonl("gsm8k.test.jsonl", [{"question": f"A farmer named Tom has {i} apples in his orchard and buys {i + 3} more "
                                            f"apples at the market on day {i} before lunch. How many apples does Tom "
                                            "have now in total?", "answer": f"#### {2 * i + 3}"}
                               for i in range(FIXTURE_SIZES["gsm8k"])])
    jsonl("math500.test.jsonl", [{"problem": f"Compute the value of $\\frac{{{i}}}{{7}} + \\sqrt{{{i + 4}}}$ for case {i} "
                                             "and write the result as a simplified expression in lowest terms.",
                                  "answer": str(i)} for i in range(FIXTURE_SIZES["math500"])])
    jsonl("humaneval.test.jsonl", [{"task_id": f"HumanEval/{i}",
                                    "prompt": f"def shift_{i}(values):\n    \"\"\"Return a new list in which every "
                                              f"element of values is increased by {i} and negative results are "
                                              "replaced by zero.\"\"\"\n"}
                                   for i in range(FIXTURE_SIZES["humaneval"])])
    test_ids = list(range(11, 11 + FIXTURE_SIZES["mbpp"]))  # the test split is task_id 11..510
    mbpp = [{"task_id": t, "prompt": f"Write a python function that takes a list of integers and returns the sum of "
                                     f"every element multiplied by {t}."} for t in [2, 3, *test_ids, 600]]
    (root / "mbpp.sanitized.json").write_text(json.dumps(mbpp))
    jsonl("mt_bench.question.jsonl", [{"question_id": 81 + i, "category": "writing",
                                       "turns": [f"Compose an engaging travel blog post about a recent trip to harbour "
                                                 f"town number {i}, highlighting its cultural experiences and sights.",
                                                 f"Rewrite your previous answer about harbour town {i} as a short "
                                                 "limerick of five lines."]}
                                      for i in range(FIXTURE_SIZES["mt-bench"])])
    lists = {str(n): [int(x) for x in np.random.default_rng(0).permutation(n)[:128]]
             for n in (FIXTURE_SIZES["gsm8k"], FIXTURE_SIZES["math500"], FIXTURE_SIZES["mbpp"])}
    (root / "hf_shuffle_seed0_first128.json").write_text(json.dumps(lists))
    return root


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    """../shared/data/benchmarks when it is there, else fixture files of the same shape."""
    if BENCH_DIR.is_dir():
        return BENCH_DIR
    return write_fixture_benchmarks(tmp_path_factory.mktemp("benchmarks"))
