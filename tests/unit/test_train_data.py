"""Loss masks from the rendered text's offsets, skipping, truncation, splits, the feature cache."""

import pytest
import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir, write_jsonl
from dflash_lab.train import data as D


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def target(request, tmp_path_factory):
    path = tiny_target_dir(tmp_path_factory.mktemp(f"t-{request.param}"), kind=request.param)
    return load_target(path)


def _record(response, user="What is 2 + 2? Think.", rid="r1"):
    return {"id": rid, "category": "math", "source": "t",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
            "response_tokens": 5, "finish_reason": "stop"}


@pytest.mark.parametrize("response", ["The answer is 4.", "def add(a, b):\n    return a + b\n", " lead space", "\n\nnewlines first"])
def test_supervised_tokens_decode_to_response_plus_end_of_turn(target, response):
    sample, truncated = D.tokenize_record(target, _record(response), max_length=4096)
    assert not truncated
    tok = target.tokenizer
    supervised = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
    unsupervised = [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m]
    eot = target.end_of_turn_token
    assert eot == "<|im_end|>"
    assert tok.decode(supervised, skip_special_tokens=False) == response + eot
    prompt = target.render_prompt(_record(response)["messages"][:-1])
    assert tok.decode(unsupervised, skip_special_tokens=False) == prompt
    # the mask is one contiguous run at the end
    first = sample.loss_mask.index(1)
    assert all(sample.loss_mask[first:])
    if target.config.model_type == "qwen3":
        assert prompt.endswith("<think>\n\n</think>\n\n")  # thinking off, as the server renders it


def test_skip_and_truncate(target):
    records = [_record("x", rid="short"), _record("A long enough answer " * 20, rid="long"), {"id": "bad", "messages": []}]
    max_length = len(target.encode_prompt(records[0]["messages"][:-1])) + 10
    samples, stats = D.tokenize_records(target, records, max_length=max_length, min_supervised=3)
    assert [s.id for s in samples] == ["long"]
    assert stats.skipped_few_supervised == 1 and stats.skipped_bad_record == 1 and stats.truncated == 1
    assert len(samples[0].input_ids) == max_length and samples[0].num_supervised == 10


def test_read_records_dir_and_file(tmp_path):
    rows = [_record("a", rid=str(i)) for i in range(5)]
    write_jsonl(tmp_path / "ds" / "shard-00000.jsonl", rows[:3])
    write_jsonl(tmp_path / "ds" / "shard-00001.jsonl", rows[3:])
    write_jsonl(tmp_path / "ds" / "failed.jsonl", [{"id": "nope"}])
    (tmp_path / "ds" / "meta.json").write_text("{}")
    assert [r["id"] for r in D.read_records(tmp_path / "ds")] == ["0", "1", "2", "3", "4"]
    assert D.manifest_sha256(tmp_path / "ds") is not None
    write_jsonl(tmp_path / "one.jsonl", rows)
    assert len(D.read_records(tmp_path / "one.jsonl")) == 5
    with pytest.raises(DFlashLabError, match="no such file"):
        D.read_records(tmp_path / "missing")


def test_heldout_split_is_deterministic():
    samples = [D.Sample(id=str(i), category="", input_ids=[1, 2, 3], loss_mask=[0, 1, 1]) for i in range(50)]
    tr1, ho1 = D.split_heldout(samples, 0.1, 64, seed=0)
    tr2, ho2 = D.split_heldout(samples, 0.1, 64, seed=0)
    assert [s.id for s in ho1] == [s.id for s in ho2] and len(ho1) == 5 and len(tr1) == 45
    assert len(D.split_heldout(samples, 3, 64, seed=0)[1]) == 3


def test_feature_cache_roundtrip(tmp_path):
    cache = D.FeatureCache(tmp_path, "fp", [1, 2])
    s = D.Sample(id="a", category="", input_ids=[1, 2, 3], loss_mask=[0, 1, 1])
    assert cache.get(s) is None
    feats, final = torch.randn(3, 8), torch.randn(3, 4)
    cache.put(s, feats, final)
    got = cache.get(s)
    assert torch.allclose(got[0].float(), feats, atol=0.05) and got[0].dtype == torch.bfloat16
    other = D.FeatureCache(tmp_path, "fp", [1, 3])  # other layers: a different key
    assert other.get(s) is None


def test_any_template_error_skips_only_its_record(target):
    """A message without `role` makes the chat template raise a jinja error: counted, never fatal."""
    records = [_record("fine answer here", rid="ok"),
               {"id": "no-role", "messages": [{"content": "hi"}, {"role": "assistant", "content": "yo yo yo"}]}]
    samples, stats = D.tokenize_records(target, records, max_length=4096, min_supervised=2)
    assert [s.id for s in samples] == ["ok"] and stats.skipped_bad_record == 1
    assert stats.reasons[0].startswith("record no-role: UndefinedError")


def test_length_capped_response_gets_no_end_of_turn(target):
    cut, _ = D.tokenize_record(target, {**_record("cut off mid"), "finish_reason": "length"}, max_length=4096)
    done, _ = D.tokenize_record(target, _record("cut off mid"), max_length=4096)
    assert done.input_ids[:-1] == cut.input_ids and done.loss_mask[:-1] == cut.loss_mask
    assert target.tokenizer.convert_ids_to_tokens(done.input_ids[-1]) == target.end_of_turn_token
