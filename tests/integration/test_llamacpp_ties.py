"""The llama.cpp lossless check tells a near-tie from a failure, on the real engine (xllamacpp,
in-process, the embedded target's F32 GGUF).

llama.cpp verifies drafted tokens in one batched forward and decodes plain greedy one token at a time;
its kernels round differently, so at a near-tie the two runs can pick different tokens (seen with a
DFlash2 draft on mbpp: 0.0032 logits apart). `classify_mismatch` decodes the response's prompt again
on the plain server with `n_probs: 2`: a speculative token that is the plain run's runner-up within
the tolerance is `numerical`, anything else a failure. Here the "speculative" responses are made by
hand from the plain run's own tokens: its step with the smallest top-2 margin, with the runner-up
swapped in (numerical under a tolerance above that margin, a failure under one below it), and the
same step with a token outside the top two (always a failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dflash_lab.eval.backends import _post_json
from dflash_lab.eval.llamacpp import EngineConfig, LlamaServer, classify_mismatch, completion_request, target_gguf_for

TARGET = "smollm2-135m-instruct"
PROMPT = "Write a function to find the maximum product of an increasing subsequence."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    from dflash_lab.models.target import load_target

    return load_target(TARGET)


def test_runner_up_within_the_tolerance_is_numerical_else_a_failure(target):
    prompt_text = target.render_prompt([{"role": "user", "content": PROMPT}])
    prompt_ids = target.encode(prompt_text)
    with LlamaServer(EngineConfig(model=Path(target_gguf_for(TARGET, "f32")), threads=1, ctx_size=512)) as url:
        plain = _post_json(url + "/completion", {**completion_request(prompt_ids, 32), "n_probs": 2}, 600)
        tokens = plain["tokens"]
        steps = [s["top_logprobs"] for s in plain["completion_probabilities"]]
        margins = [s[0]["logprob"] - s[1]["logprob"] for s in steps]
        k = min(range(len(margins)), key=margins.__getitem__)
        assert steps[k][0]["id"] == tokens[k]  # the plain run took its own top token
        runner_up = steps[k][1]["id"]
        swapped = {"prompt_text": prompt_text, "output_ids": tokens[:k] + [runner_up] + tokens[k + 1:]}

        verdict, report = classify_mismatch(url, target, swapped, tolerance=margins[k] + 1e-3)
        assert verdict == "numerical" and report["index"] == k and report["kind"] == "numerical"
        assert report["greedy"]["top2_ids"] == [tokens[k], runner_up]
        assert report["greedy"]["margin"] == pytest.approx(margins[k], abs=1e-4)

        verdict, report = classify_mismatch(url, target, swapped, tolerance=margins[k] / 2)
        assert verdict is False and report["kind"] == "failure"

        outside = next(t for t in range(100, 200) if t not in (tokens[k], runner_up))
        wrong = {"prompt_text": prompt_text, "output_ids": tokens[:k] + [outside] + tokens[k + 1:]}
        assert classify_mismatch(url, target, wrong, tolerance=100.0)[0] is False

        same = {"prompt_text": prompt_text, "output_ids": tokens}
        assert classify_mismatch(url, target, same) == (True, None)
