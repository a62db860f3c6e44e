"""Labels: hf backend == single-sequence greedy, shards, resume, accounting, bad input, settings."""

from __future__ import annotations

import json

import pytest

from dflash_lab.decoding.speculative import greedy_generate
from dflash_lab.errors import DFlashLabError
from dflash_lab.labels.backends import HFBackend, Job, Outcome
from dflash_lab.labels.runner import encode_batch, iter_records, read_jsonl_tolerant, recover, run_labels, shard_paths
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir, write_jsonl

WORDS = "Natalia sold clips to her friends in April and then half as many in May".split()


def prompt_rows(n, category="math"):
    return [{"id": f"p{i}", "category": category, "source": "unit",
             "messages": [{"role": "user", "content": " ".join(WORDS[: 2 + (i * 5) % 12]) + f" #{i}"}]}
            for i in range(n)]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def target(request, tmp_path_factory):
    path = tiny_target_dir(tmp_path_factory.mktemp(request.param) / "t", request.param)
    return load_target(str(path))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_target(str(tiny_target_dir(tmp_path_factory.mktemp("q") / "t", "qwen3")))


def test_hf_batched_equals_single_sequence_greedy(target):
    rows = prompt_rows(5)
    jobs = [Job(r["id"], r["messages"], target.encode_prompt(r["messages"])) for r in rows]
    assert len({len(j.prompt_ids) for j in jobs}) > 3  # really padded
    texts = [target.render_prompt(r["messages"]) for r in rows]
    assert encode_batch(target, texts) == [j.prompt_ids for j in jobs]  # the runner's fast path, same ids
    # Make one prompt stop early: its 6th greedy token becomes an extra stop token.
    free = greedy_generate(target, jobs[0].prompt_ids, 6, [])
    saved = list(target.extra_stop_token_ids)
    target.extra_stop_token_ids = saved + [free.output_ids[5]]
    try:
        backend = HFBackend(target, max_new_tokens=12, batch_size=3)
        batched = backend._generate_batch(jobs[:3]) + backend._generate_batch(jobs[3:])
        reasons = set()
        for job, (ids, reason) in zip(jobs, batched):
            ref = greedy_generate(target, job.prompt_ids, 12, target.stop_token_ids)
            assert ids == ref.output_ids, job.id
            assert reason == ref.finish_reason
            reasons.add(reason)
    finally:
        target.extra_stop_token_ids = saved
    assert reasons == {"stop", "length"}  # both kinds of ending are covered


def test_run_labels_records_meta_and_resume(qwen, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(7))
    out = tmp_path / "out"
    first = run_labels(prompts, qwen, out, max_new_tokens=8, batch_size=4, limit=5, shard_size=2, progress=False)
    assert (first.input, first.done, first.failed, first.skipped) == (5, 5, 0, 0)
    assert len(shard_paths(out)) == 3  # 2 + 2 + 1
    second = run_labels(prompts, qwen, out, max_new_tokens=8, batch_size=4, shard_size=2, progress=False)
    assert (second.input, second.done, second.skipped, second.skipped_done_before) == (7, 2, 5, 5)
    assert second.balanced
    records = list(iter_records(out))
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(7))  # each exactly once
    rec = records[0]
    assert list(rec) == ["id", "category", "source", "messages", "response_tokens", "finish_reason"]
    assert rec["messages"][-1]["role"] == "assistant" and rec["category"] == "math"
    assert rec["response_tokens"] == len(qwen.encode(rec["messages"][-1]["content"]))
    for r in records[:2]:  # the response is the target's greedy answer with thinking off
        ref = greedy_generate(qwen, qwen.encode_prompt(r["messages"][:-1]), 8, qwen.stop_token_ids)
        body = [t for t in ref.output_ids if t not in qwen.stop_token_ids]
        assert r["messages"][-1]["content"] == qwen.decode(body)
        assert r["finish_reason"] == ref.finish_reason
    meta = json.loads((out / "meta.json").read_text())
    assert meta["thinking"] is False and meta["max_new_tokens"] == 8 and meta["sampling"]["temperature"] == 0.0
    assert meta["target"]["fingerprint"] == qwen.fingerprint and meta["counts"]["records"] == 7
    assert meta["settings"]["template_kwargs"] == {"enable_thinking": False}
    assert [r["done"] for r in meta["runs"]] == [5, 2]
    third = run_labels(prompts, qwen, out, max_new_tokens=8, progress=False)  # nothing left to do
    assert (third.done, third.skipped) == (0, 7)


def test_different_settings_are_an_error(qwen, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    run_labels(prompts, qwen, tmp_path / "out", max_new_tokens=4, progress=False)
    with pytest.raises(DFlashLabError, match="max_new_tokens=4.*max_new_tokens=5"):
        run_labels(prompts, qwen, tmp_path / "out", max_new_tokens=5, progress=False)


def test_bad_input_duplicates_and_too_long(qwen, tmp_path):
    rows = prompt_rows(3)
    long = {"id": "long", "messages": [{"role": "user", "content": " ".join(WORDS * 8)}]}
    no_id = {"messages": [{"role": "user", "content": "  Hello   World "}]}
    lines = [json.dumps(r) for r in rows] + [
        "{not json", json.dumps({"id": "sys", "messages": [{"role": "system", "content": "x"}]}),
        json.dumps(rows[0]), json.dumps(long), json.dumps(no_id), "", json.dumps({"id": "nomsg"})]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    longest_ok = max(len(qwen.encode_prompt(r["messages"])) for r in rows + [no_id])
    assert len(qwen.encode_prompt(long["messages"])) > longest_ok
    qwen.config.max_position_embeddings, saved = longest_ok + 8, qwen.config.max_position_embeddings
    try:
        stats = run_labels(prompts, qwen, tmp_path / "out", max_new_tokens=8, progress=False)
    finally:
        qwen.config.max_position_embeddings = saved
    assert stats.input == 9 and stats.balanced
    assert (stats.done, stats.failed_bad_input, stats.failed_too_long, stats.skipped_duplicate) == (4, 3, 1, 1)
    failed = {r["id"]: r for r in read_jsonl_tolerant(tmp_path / "out" / "failed.jsonl")}
    assert failed["long"]["reason"] == "prompt_too_long"
    assert failed["p.jsonl:line4"]["reason"] == "bad_input" and "malformed JSON" in failed["p.jsonl:line4"]["detail"]
    assert "no user turn" in failed["sys"]["detail"]
    records = {r["id"]: r for r in iter_records(tmp_path / "out")}
    from dflash_lab.data.records import prompt_id

    derived = records[prompt_id("hello world")]  # id derived from the normalised first user turn
    assert derived["category"] == "chat" and derived["source"] == "p.jsonl"


class FlakyBackend:
    """Fails the ids in `bad` (once each when `heal`), answers the rest."""

    name = "flaky"

    def __init__(self, bad, heal=True):
        self.bad, self.heal, self.calls = set(bad), heal, []

    def check(self):
        return {}

    def generate(self, jobs, emit):
        for job in jobs:
            self.calls.append(job.id)
            if job.id in self.bad:
                if self.heal:
                    self.bad.discard(job.id)
                emit(job, Outcome(error="HTTP 500: boom"))
            else:
                emit(job, Outcome(text=f"answer {job.id}", finish_reason="stop", completion_tokens=3))


def test_retry_failed_reattempts_exactly_the_failed_ids(qwen, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(6))
    out = tmp_path / "out"
    backend = FlakyBackend({"p1", "p4"})
    stats = run_labels(prompts, qwen, out, backend=backend, max_new_tokens=8, progress=False)
    assert (stats.done, stats.failed_backend) == (4, 2)
    plain = run_labels(prompts, qwen, out, backend=backend, max_new_tokens=8, progress=False)
    assert (plain.done, plain.skipped_failed_before, plain.skipped_done_before) == (0, 2, 4)
    backend.calls.clear()
    retry = run_labels(prompts, qwen, out, backend=backend, max_new_tokens=8, retry_failed=True, progress=False)
    assert sorted(backend.calls) == ["p1", "p4"] and retry.done == 2 and retry.balanced
    assert read_jsonl_tolerant(out / "failed.jsonl") == []
    assert sorted(r["id"] for r in iter_records(out)) == [f"p{i}" for i in range(6)]


def test_recover_turns_a_torn_journal_into_a_shard_without_duplicates(qwen, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(4))
    out = tmp_path / "out"
    run_labels(prompts, qwen, out, backend=FlakyBackend(()), max_new_tokens=8, limit=2, progress=False)
    done = list(iter_records(out))
    extra = {**prompt_rows(4)[2], "messages": prompt_rows(4)[2]["messages"] + [{"role": "assistant", "content": "x"}],
             "response_tokens": 1, "finish_reason": "stop"}
    with open(out / "journal.jsonl", "w") as fh:  # a killed run: a flushed duplicate, a new record, a torn line
        fh.write(json.dumps(done[0]) + "\n" + json.dumps(extra) + "\n" + '{"id": "p3", "mess')
    ids, failed = recover(out)
    assert ids == {"p0", "p1", "p2"} and failed == {}
    assert not (out / "journal.jsonl").exists()
    stats = run_labels(prompts, qwen, out, backend=FlakyBackend(()), max_new_tokens=8, progress=False)
    assert (stats.done, stats.skipped_done_before) == (1, 3)
    assert sorted(r["id"] for r in iter_records(out)) == ["p0", "p1", "p2", "p3"]


def test_vllm_backend_missing_is_a_clear_error(qwen, tmp_path):
    pytest.importorskip  # vllm is an optional extra; this checks the message when it is absent
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(1))
    with pytest.raises(DFlashLabError, match=r"pip install 'dflash-lab\[vllm\]'"):
        run_labels(prompts, qwen, tmp_path / "out", backend="vllm", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_one_writer_per_output_directory(qwen, tmp_path):
    from dflash_lab.labels.runner import _DirLock

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    out = tmp_path / "out"
    out.mkdir()
    with _DirLock(out):
        with pytest.raises(DFlashLabError, match="another `dflash-lab label` process"):
            run_labels(prompts, qwen, out, backend=FlakyBackend(()), max_new_tokens=8, progress=False)
    assert run_labels(prompts, qwen, out, backend=FlakyBackend(()), max_new_tokens=8, progress=False).done == 2
