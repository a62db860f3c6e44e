"""`eval --backend llamacpp` at T > 0 (issue 15: every backend passes the same sampling settings), on
the real engine (xllamacpp, in-process, loopback) with the embedded target's F32 GGUF and a fresh
(untrained) draft exported to GGUF: its drafts are mostly rejected, which does not matter here.

- top-k 1 at T 0.7 is the argmax: the engine's text equals our builtin greedy text, with the draft
  and without it, so the settings reach llama.cpp's sampler (a default min_p or top-k 40 would not
  change this, but a temperature-only request would sample and differ);
- T 1.5 with a seed: the results record the sampling settings and each response's seed, a rerun
  gives the same tokens, the draws differ from greedy, and the settings key is not greedy's.
"""

from __future__ import annotations

import pytest

from dflash_lab.cli import main
from dflash_lab.decoding.sampling import SamplingParams
from dflash_lab.eval.benchmarks import Benchmark, Sample
from dflash_lab.eval.harness import evaluate

TARGET = "smollm2-135m-instruct"
PROMPTS = ["Tell me a short story about a cat.", "Name three colours of the rainbow."]
MAX_NEW = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    from dflash_lab.models.target import load_target

    return load_target(TARGET)


@pytest.fixture(scope="module")
def bench():
    return Benchmark(name="chat", samples=[Sample(id=str(i), index=i, turns=(t,)) for i, t in enumerate(PROMPTS)],
                     source="test", selection="first", selected=True)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    out = tmp_path_factory.mktemp("draft") / "fresh"
    assert main(["draft", "init", "--target", TARGET, "--num-layers", "1", "--out", str(out)]) == 0
    return out


def _ids(results):
    return [r["output_ids"] for r in results["benchmarks"]["chat"]["responses"]]


def test_top_k_1_is_greedy_with_and_without_the_draft(target, bench, draft):
    greedy = evaluate(target, "none", [bench], max_new_tokens=MAX_NEW, progress=False)
    argmax = SamplingParams(temperature=0.7, top_k=1, seed=0)
    for drafter in (str(draft), "none"):
        ll = evaluate(target, drafter, [bench], max_new_tokens=MAX_NEW, progress=False, backend="llamacpp",
                      sampling=argmax)
        assert _ids(ll) == _ids(greedy), drafter
        assert ll["sampling"] == {"temperature": 0.7, "top_p": 1.0, "top_k": 1, "seed": 0}


def test_sampled_eval_is_seeded_and_recorded(target, bench, draft):
    hot = SamplingParams(temperature=1.5, seed=7)
    first = evaluate(target, str(draft), [bench], max_new_tokens=MAX_NEW, progress=False, backend="llamacpp",
                     sampling=hot)
    again = evaluate(target, str(draft), [bench], max_new_tokens=MAX_NEW, progress=False, backend="llamacpp",
                     sampling=hot)
    greedy = evaluate(target, str(draft), [bench], max_new_tokens=MAX_NEW, progress=False, backend="llamacpp")
    chat = first["benchmarks"]["chat"]
    assert chat["settings"]["sampling"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 0}
    assert chat["settings_key"] != greedy["benchmarks"]["chat"]["settings_key"]
    seeds = [r["seed"] for r in chat["responses"]]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == len(seeds)
    assert _ids(first) == _ids(again)  # the same seeds, the same draws
    assert _ids(first) != _ids(greedy)  # at T 1.5 on 2 x 16 tokens, a draw equal to greedy is ~impossible
    assert chat["lossless"] is None and chat["tau_pooled"] >= 1.0
