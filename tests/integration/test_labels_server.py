"""The openai backend against real HTTP servers on 127.0.0.1 (see tests/fake_openai_server.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_openai_server import FakeOpenAIServer, hf_generator  # noqa: E402

from dflash_lab.cli import main  # noqa: E402
from dflash_lab.errors import DFlashLabError  # noqa: E402
from dflash_lab.labels.runner import (  # noqa: E402
    iter_records, load_tokenizer_target, read_jsonl_tolerant, run_labels, shard_paths)
from dflash_lab.testing import tiny_target_dir, write_jsonl  # noqa: E402


def rows(n):
    return [{"id": f"q{i:03d}", "category": ["math", "code", "chat"][i % 3], "source": "it",
             "messages": [{"role": "user", "content": f"Explain why the sky is blue, part {i}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "t", "qwen3")


@pytest.fixture(scope="module")
def tok_target(target_dir):
    return load_tokenizer_target(str(target_dir))


def label(prompts, target, out, servers, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.01)
    return run_labels(prompts, target, out, backend="openai", servers=servers, **kw)


def test_openai_backend_gives_the_hf_answers(tmp_path, target_dir, tok_target):
    from dflash_lab.models.target import load_target

    prompts = write_jsonl(tmp_path / "p.jsonl", rows(4))
    hf = run_labels(prompts, load_target(str(target_dir)), tmp_path / "hf", max_new_tokens=8, progress=False)
    with FakeOpenAIServer(hf_generator(str(target_dir)), models=[tok_target.name]) as server:
        stats = label(prompts, tok_target, tmp_path / "api", [server.url])
        payload = server.payloads[0]
    assert hf.done == stats.done == 4
    assert payload["temperature"] == 0 and payload["max_tokens"] == 8
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}  # the template needs it
    by_id = {r["id"]: r for r in iter_records(tmp_path / "hf")}
    for rec in iter_records(tmp_path / "api"):
        ref = by_id[rec["id"]]
        assert rec["messages"] == ref["messages"]
        assert (rec["finish_reason"], rec["response_tokens"]) == (ref["finish_reason"], ref["response_tokens"])
    meta = json.loads((tmp_path / "api" / "meta.json").read_text())
    assert meta["servers"] == [server.url] and meta["backend"] == "openai"
    # the two backends may add to one directory: the generation settings are the same
    assert json.loads((tmp_path / "hf" / "meta.json").read_text())["settings"] == meta["settings"]


def test_concurrency_and_load_spread_over_two_servers(tmp_path, tok_target):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(24))
    with FakeOpenAIServer(models=[tok_target.name], delay_s=0.1) as a, \
            FakeOpenAIServer(models=[tok_target.name], delay_s=0.1) as b:
        start = time.monotonic()
        stats = label(prompts, tok_target, tmp_path / "out", [a.url, b.url], concurrency=4)
        elapsed = time.monotonic() - start
    assert stats.done == 24 and stats.balanced
    assert a.max_in_flight > 1 and b.max_in_flight > 1
    assert a.max_in_flight <= 4 and b.max_in_flight <= 4  # bounded per server
    assert a.requests > 4 and b.requests > 4 and a.requests + b.requests == 24
    assert sorted(stats.per_server.values()) == sorted([a.requests, b.requests])
    assert elapsed < 24 * 0.1  # overlapped, not sequential


def test_server_errors_are_retried_until_it_recovers(tmp_path, tok_target):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(5))
    with FakeOpenAIServer(models=[tok_target.name], fail_first=3) as server:
        stats = label(prompts, tok_target, tmp_path / "out", [server.url], concurrency=1, retries=4)
    assert stats.done == 5 and stats.failed == 0
    assert server.requests == 8


def test_a_hanging_server_times_out_then_retries_or_fails(tmp_path, tok_target):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(3))
    with FakeOpenAIServer(models=[tok_target.name], hang_first=1, hang_s=20) as server:
        start = time.monotonic()
        retried = label(prompts, tok_target, tmp_path / "a", [server.url], concurrency=1, timeout=0.5, retries=2)
        assert retried.done == 3 and time.monotonic() - start < 10
    with FakeOpenAIServer(models=[tok_target.name], hang_first=1, hang_s=20) as server:
        start = time.monotonic()
        gave_up = label(prompts, tok_target, tmp_path / "b", [server.url], concurrency=1, timeout=0.5, retries=0)
        assert time.monotonic() - start < 10
    assert (gave_up.done, gave_up.failed_backend) == (2, 1)
    (entry,) = read_jsonl_tolerant(tmp_path / "b" / "failed.jsonl")
    assert "timed out" in entry["detail"]
    with FakeOpenAIServer(models=[tok_target.name]) as server:  # and --retry-failed fixes it
        fixed = label(prompts, tok_target, tmp_path / "b", [server.url], retry_failed=True)
    assert fixed.done == 1 and read_jsonl_tolerant(tmp_path / "b" / "failed.jsonl") == []


def test_a_down_server_is_an_error_before_any_work(tmp_path, tok_target):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(DFlashLabError, match="not reachable"):
        label(prompts, tok_target, tmp_path / "out", [f"http://127.0.0.1:{port}"])
    assert not (tmp_path / "out").exists()


def test_a_wrong_model_name_is_an_error_before_any_work(tmp_path, tok_target):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(2))
    with FakeOpenAIServer(models=["some-other-model"]) as server:
        with pytest.raises(DFlashLabError, match=r"serves \['some-other-model'\].*--model"):
            label(prompts, tok_target, tmp_path / "out", [server.url])
        assert server.requests == 0
    assert not (tmp_path / "out").exists()


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, target_dir, tok_target):
    n = 80
    prompts = write_jsonl(tmp_path / "p.jsonl", rows(n))
    out = tmp_path / "out"
    with FakeOpenAIServer(models=[tok_target.name], delay_s=0.1) as server:
        args = ["label", "--prompts", str(prompts), "--target", str(target_dir), "--backend", "openai",
                "--server", server.url, "--concurrency", "2", "--max-new-tokens", "8", "--shard-size", "4",
                "--no-progress", "--out", str(out)]
        proc = subprocess.Popen([sys.executable, "-m", "dflash_lab", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(shard_paths(out)) >= 3:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        partial = list(iter_records(out))
        assert 0 < len(partial) < n
        assert main(args) == 0  # the same command resumes
        reference = tmp_path / "ref"
        faster = [("16" if a == "2" and args[i - 1] == "--concurrency" else a) for i, a in enumerate(args[:-1])]
        assert main([*faster, str(reference)]) == 0  # concurrency is not a generation setting
    resumed = list(iter_records(out))
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == n  # every prompt exactly once
    ref = {r["id"]: r for r in iter_records(reference)}
    assert {r["id"]: r for r in resumed} == ref  # identical records to an uninterrupted run
    meta = json.loads((out / "meta.json").read_text())
    last = meta["last_run"]
    assert last["input"] == n and last["done"] + last["skipped"] == n and last["skipped_done_before"] >= len(partial)
