"""The llama.cpp `/completion` request body: greedy as before, sampled with our settings, our sampler
order and every other llama.cpp sampler stage off (issue 15: every backend passes the same sampling
settings). No engine: the real engine's sampled run is in tests/integration/test_llamacpp.py."""

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.eval.llamacpp import completion_request, request_seed


def test_greedy_request_is_argmax():
    body = completion_request([1, 2, 3], 8)
    assert body["temperature"] == 0 and body["top_k"] == 1
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 8 and body["return_tokens"] is True
    assert "seed" not in body and "samplers" not in body


def test_sampled_request_carries_our_settings_in_our_order():
    qwen = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=5)
    body = completion_request([1, 2, 3], 8, qwen, seed=123)
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.7, 0.8, 20, 123)
    assert body["samplers"] == ["temperature", "top_k", "top_p"]
    # llama.cpp's default min_p (0.05) would cut the tail our loop samples from
    assert body["min_p"] == 0.0 and body["typical_p"] == 1.0 and body["repeat_penalty"] == 1.0
    assert body["dry_multiplier"] == 0.0 and body["xtc_probability"] == 0.0 and body["mirostat"] == 0


def test_request_seed_is_per_prompt_and_reproducible():
    qwen = SamplingParams(temperature=0.7, seed=5)
    a, b = request_seed(qwen, [1, 2, 3]), request_seed(qwen, [1, 2, 4])
    assert a == request_seed(qwen, [1, 2, 3]) and a != b and 0 <= a < 2**31
    assert request_seed(SamplingParams(temperature=0.7), [1]) is None  # no --seed: the engine picks
    assert request_seed(GREEDY, [1]) is None


def test_attach_lossless_rechecks_only_mismatches_and_a_later_turns_prompt():
    from dflash_lab.eval.llamacpp import attach_lossless

    def rec(prompt, ids):
        return {"prompt_text": prompt, "output_ids": ids, "wall_s": 1.0}

    asked = []

    def recheck(record):
        asked.append(record["prompt_text"])
        return "numerical", {"kind": "numerical"}

    records = [rec("a", [1, 2]), rec("b", [1, 3]), rec("c2", [5])]
    plain = [rec("a", [1, 2]), rec("b", [1, 4]), rec("c1", [5])]  # turn 2 after a tie: another prompt
    attach_lossless(records, plain, recheck=recheck)
    assert asked == ["b", "c2"]
    assert [r["lossless"] for r in records] == [True, "numerical", "numerical"]
    assert "lossless_mismatch" not in records[0] and records[1]["lossless_mismatch"] == {"kind": "numerical"}
    records = [rec("b", [1, 3])]
    attach_lossless(records, [rec("b", [1, 4])])  # no plain server to ask: a failure
    assert records[0]["lossless"] is False
