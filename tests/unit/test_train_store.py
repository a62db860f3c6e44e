"""The token store: built once, keyed, identical to the in-memory path, bad records counted, ranks
reading their own samples, memory not growing with the data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir, write_jsonl
from dflash_lab.train import data as D
from dflash_lab.train import store as St
from dflash_lab.train.store import TokenStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def target(request, tmp_path_factory):
    path = tiny_target_dir(tmp_path_factory.mktemp(f"t-{request.param}"), kind=request.param)
    return load_target(path)


def _record(response, user="What is 2 + 2? Think.", rid="r1", finish="stop"):
    return {"id": rid, "category": "math", "source": "t",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
            "finish_reason": finish}


def _dataset(path, n=40, extra=()):
    rows = [_record(f"The answer is {i}. " * (1 + i % 5), user=f"What is {i} + {i}?", rid=f"r{i}") for i in range(n)]
    rows[3]["id"] = ""  # no id: the store names it by its index, like tokenize_records
    rows += list(extra)
    write_jsonl(path / "shard-00000.jsonl", rows[: len(rows) // 2])
    write_jsonl(path / "shard-00001.jsonl", rows[len(rows) // 2:])
    (path / "meta.json").write_text(json.dumps({"format": 1}))
    return path


def _open(data, target, root, max_length=128, min_supervised=2, **kw):
    return TokenStore.open_or_build(data, target, max_length, min_supervised, root=root, progress=False, **kw)


def test_identical_samples_to_tokenize_records(target, tmp_path):
    bad = [{"id": "no-role", "messages": [{"content": "hi"}, {"role": "assistant", "content": "x y z"}]},
           {"id": "short", **{k: v for k, v in _record("x").items() if k != "id"}}]
    data = _dataset(tmp_path / "ds", extra=bad)
    store = _open(data, target, tmp_path / "root", max_length=80, min_supervised=3)
    samples, stats = D.tokenize_records(target, D.read_records(data), 80, 3)
    assert len(store) == len(samples) == stats.kept
    assert [store.sample(i) for i in range(len(store))] == samples
    assert store.lengths.tolist() == [len(s.input_ids) for s in samples]
    from dflash_lab.train.blocks import anchor_candidates
    import torch
    assert store.num_anchor_candidates.tolist() == [
        int(anchor_candidates(torch.tensor(s.loss_mask)).numel()) for s in samples]
    assert store.stats["skipped_few_supervised"] == stats.skipped_few_supervised
    assert store.stats["truncated"] == stats.truncated
    assert store.sample(3).id == "#3"


def test_built_once_and_rekeyed(target, tmp_path, monkeypatch):
    data = _dataset(tmp_path / "ds", n=12)
    root = tmp_path / "root"
    first = _open(data, target, root)
    calls = []
    real = St.build_store
    monkeypatch.setattr(St, "build_store", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _open(data, target, root)
    assert calls == [] and again.key == first.key and again.path == first.path
    # max_length, min_supervised, the tokenizer, the chat template and the data each change the key
    assert _open(data, target, root, max_length=96).key != first.key
    assert _open(data, target, root, min_supervised=3).key != first.key
    assert len(calls) == 2
    other_tok = target.text_only()
    import copy
    other_tok.tokenizer = copy.deepcopy(target.tokenizer)
    other_tok.tokenizer.add_tokens(["<|brand-new|>"])
    assert St.store_key(data, other_tok, 128, 2)[0] != first.key
    templ = target.text_only()
    templ.tokenizer = copy.deepcopy(target.tokenizer)
    templ.tokenizer.chat_template = templ.tokenizer.chat_template + " "
    assert St.store_key(data, templ, 128, 2)[0] != first.key
    write_jsonl(data / "shard-00002.jsonl", [_record("more data", rid="new")])
    assert _open(data, target, root).key != first.key
    assert len(calls) == 3
    assert len([p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 4
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # no leftover temp dirs


def test_broken_records_are_counted_not_fatal(target, tmp_path, capsys):
    data = tmp_path / "ds"
    data.mkdir()
    good = [_record(f"fine answer number {i}", rid=f"g{i}") for i in range(3)]
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"id": "no-role", "messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "{not json",
        json.dumps([1, 2]),
    ]
    (data / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    (data / "shard-00001.jsonl").write_bytes(b'{"id": "latin1", "messages": "\xe9\xe9"}\n')
    store = TokenStore.open_or_build(data, target, 128, 2, root=tmp_path / "root", progress=True)
    assert len(store) == 3
    assert store.stats["skipped"]["bad_record"] == 4 and store.stats["records"] == 7
    ids = [e["id"] for e in store.stats["first_errors"]]
    assert ids == ["no-role", "#4", "#5", "#6"]  # a line that does not parse has only its index
    assert "UnicodeDecodeError" in store.stats["first_errors"][3]["reason"]
    assert any("UndefinedError" in e["reason"] or "role" in e["reason"] for e in store.stats["first_errors"])
    err = capsys.readouterr().err
    assert "3 of 7 records usable" in err and "no-role" in err


def test_truncated_response_has_no_end_of_turn(target, tmp_path):
    data = tmp_path / "ds"
    write_jsonl(data / "shard-00000.jsonl", [_record("cut off in the mid", rid="cut", finish="length"),
                                             _record("a complete answer", rid="done")])
    (data / "meta.json").write_text("{}")
    store = _open(data, target, tmp_path / "root", max_length=256)
    eot_id = target.tokenizer.convert_tokens_to_ids(target.end_of_turn_token)
    by_id = {store.sample(i).id: store.sample(i) for i in range(len(store))}
    cut, done = by_id["cut"], by_id["done"]
    assert cut.input_ids[-1] != eot_id and eot_id not in [t for t, m in zip(cut.input_ids, cut.loss_mask) if m]
    assert target.tokenizer.decode([t for t, m in zip(cut.input_ids, cut.loss_mask) if m]) == "cut off in the mid"
    assert done.input_ids[-1] == eot_id and done.loss_mask[-1] == 1
    assert store.stats["no_end_of_turn"] == 1


def test_every_record_bad_says_so(target, tmp_path):
    prompts = tmp_path / "prompts"
    write_jsonl(prompts / "shard-00000.jsonl",
                [{"id": str(i), "messages": [{"role": "user", "content": "hi"}]} for i in range(3)])
    with pytest.raises(DFlashLabError, match="no record has an assistant response.*dflash-lab label"):
        _open(prompts, target, tmp_path / "root")
    broken = tmp_path / "broken"
    write_jsonl(broken / "shard-00000.jsonl", [{"id": "x", "messages": "nope"}])
    with pytest.raises(DFlashLabError, match="no record has an assistant response"):
        _open(broken, target, tmp_path / "root")
    with pytest.raises(DFlashLabError, match="prompt set: run `dflash-lab label`"):
        (tmp_path / "pset").mkdir()
        write_jsonl(tmp_path / "pset" / "prompts.jsonl", [{"id": "1", "messages": []}])
        _open(tmp_path / "pset", target, tmp_path / "root")


def test_worker_pool_gives_the_same_store(target, tmp_path):
    data = _dataset(tmp_path / "ds", n=30)
    one = _open(data, target, tmp_path / "a", workers=1)
    meta = {"key": "k", "inputs": {}}
    out = tmp_path / "pool"
    out.mkdir()
    St.build_store(data, target, 128, 2, out, meta, workers=2, progress=False, chunk_records=4)
    pooled = TokenStore(out)
    assert len(pooled) == len(one)
    assert [pooled.sample(i) for i in range(len(one))] == [one.sample(i) for i in range(len(one))]


_RANK_SCRIPT = """
import json, sys
from dflash_lab.models.target import load_target
from dflash_lab.train.store import TokenStore
target_dir, data, root, rank, world, out = sys.argv[1:]
rank, world = int(rank), int(world)
store = TokenStore.open_or_build(data, load_target(target_dir), 128, 2, root=root, local_rank=rank,
                                 progress=False, workers=1, poll_s=0.05)
mine = [store.sample(i) for i in range(rank, len(store), world)]
json.dump({"ids": [s.id for s in mine], "tokens": [s.input_ids for s in mine], "pid_built": store.meta["build"]["pid"],
           "n": len(store)}, open(out, "w"))
"""


def test_two_ranks_build_once_and_read_disjoint_samples(tmp_path):
    target_dir = tiny_target_dir(tmp_path / "target")
    data = _dataset(tmp_path / "ds", n=25)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # rank 1 starts first and must wait for rank 0 rather than build
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(target_dir), str(data), str(root), str(r), "2",
                               str(tmp_path / f"r{r}.json")], env=env) for r in (1, 0)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0["pid_built"] == r1["pid_built"] == procs[1].pid  # built by rank 0, once
    assert not set(r0["ids"]) & set(r1["ids"]) and len(r0["ids"]) + len(r1["ids"]) == r0["n"]
    reference = _open(data, load_target(target_dir), root)
    for rank, got in ((0, r0), (1, r1)):
        assert got["tokens"] == [reference.sample(i).input_ids for i in range(rank, len(reference), 2)]


def test_opening_does_not_load_the_data(tmp_path):
    """A store of 200K synthetic samples (about 100 MB of tokens): opening it and reading a few
    samples adds only the pages touched, and it pickles as a path."""
    import pickle

    rng = np.random.default_rng(0)
    out = tmp_path / "big"
    out.mkdir()
    writer = St._StoreWriter(out)
    for start in range(0, 200_000, 20_000):
        lengths = rng.integers(100, 150, 20_000).astype(np.int32)
        total = int(lengths.sum())
        writer.add(St._ChunkResult(tokens=rng.integers(0, 50_000, total, dtype=np.int32),
                                   mask=np.ones(total, np.uint8), lengths=lengths, anchors=lengths - 1,
                                   names=[json.dumps([f"s{start + j}", ""]).encode() for j in range(20_000)],
                                   records=20_000))
    writer.finish({"key": "synthetic"})
    size = (out / "tokens.bin").stat().st_size
    assert size > 90e6

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    store = TokenStore(out)
    samples = [store.sample(i) for i in range(0, 200_000, 20_000)]
    grown = rss() - before
    assert len(store) == 200_000 and samples[3].id == "s60000" and len(samples[3].input_ids) >= 100
    assert isinstance(store._tokens, np.memmap)
    # (the kernel maps up to 64 KiB around each page fault of a cached file: some MB, never the 100)
    assert grown < 20e6, f"opening grew RSS by {grown / 1e6:.1f} MB for a {size / 1e6:.0f} MB store"
    assert len(pickle.dumps(store)) < 1000


# -- issue 24: verified before mapped; issue 23 item 8: two builders without a shared lock ----------
@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_a_damaged_store_file_is_named_before_mmap(target, tmp_path, damage):
    data = _dataset(tmp_path / "ds", n=12)
    store = _open(data, target, tmp_path / "root")
    tokens = store.path / "tokens.bin"
    raw = tokens.read_bytes()
    if damage == "truncate":
        tokens.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        tokens.write_bytes(bytes([raw[0] ^ 0xFF]) + raw[1:])
    else:
        tokens.unlink()
    with pytest.raises(DFlashLabError, match="tokens.bin") as info:
        _open(data, target, tmp_path / "root")
    assert str(store.path) in str(info.value) and "rebuilds" in str(info.value)


def test_two_builders_without_a_shared_lock_never_delete_a_published_store(target, tmp_path, monkeypatch):
    """Node-local flock: builder B starts before builder A publishes and finishes after. A's store
    (which A's ranks have mapped) must stay the published one, untouched; B uses it."""
    import contextlib

    data = _dataset(tmp_path / "ds", n=12)
    root = tmp_path / "root"
    monkeypatch.setattr(St, "_file_lock", lambda path: contextlib.nullcontext())  # no lock across "nodes"
    real_build = St.build_store
    published = {}

    def build_b(*args, **kwargs):  # while B builds, A builds and publishes, and its ranks map the store
        monkeypatch.setattr(St, "build_store", real_build)
        published["a"] = _open(data, target, root)
        published["inode"] = os.stat(published["a"].path / "tokens.bin").st_ino
        return real_build(*args, **kwargs)

    monkeypatch.setattr(St, "build_store", build_b)
    b = _open(data, target, root)
    a = published["a"]
    assert b.path == a.path
    assert os.stat(a.path / "tokens.bin").st_ino == published["inode"]  # not replaced, not deleted
    assert [a.sample(i) for i in range(len(a))] == [b.sample(i) for i in range(len(b))]  # A's map still reads
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp", ".stale"))]  # B's copy is gone


def test_a_half_directory_is_moved_aside_not_trusted(target, tmp_path):
    data = _dataset(tmp_path / "ds", n=12)
    root = tmp_path / "root"
    key, _ = St.store_key(data, target, 128, 2)
    (root / key).mkdir(parents=True)
    (root / key / "tokens.bin").write_bytes(b"\x00" * 8)  # a crashed older version's leftovers, no store.json
    store = _open(data, target, root)
    assert len(store) > 0 and (root / key / "store.json").is_file()
