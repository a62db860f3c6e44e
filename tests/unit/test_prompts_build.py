"""prompts build: filters, quotas, exclusion, dedup, determinism, rejects, strict mode, recipe errors, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from dflash_lab.cli import main
from dflash_lab.data.manifest import load_manifest_ids
from dflash_lab.data.mix import build_mix
from dflash_lab.data.recipe import parse_recipe
from dflash_lab.data.records import prompt_id, read_prompts
from dflash_lab.errors import DFlashLabError


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    math = [{"problem": f"Math problem number {i}: compute {i} plus {i * 3}.", "source": tag}
            for i, tag in zip(range(60), ["olympiads", "amc_aime", "synthetic_math", "cn_k12"] * 15)]
    code = [{"instruction": f"Write a function that returns {i} times the input value."} for i in range(40)]
    chat = [{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": f"Tell me fact {i} about owls."}]}
            for i in range(30)]
    write_jsonl(tmp_path / "math.jsonl", math)
    write_jsonl(tmp_path / "code.jsonl", code)
    write_jsonl(tmp_path / "chat.jsonl", chat)
    return tmp_path


def recipe(**kw):
    base = {
        "seed": 7,
        "sources": [
            {"name": "m", "path": "math.jsonl", "prompt_field": "problem", "tag_field": "source", "category": "math"},
            {"name": "c", "path": "code.jsonl", "prompt_field": "instruction", "category": "code"},
            {"name": "h", "path": "chat.jsonl", "messages_field": "messages", "category": "chat"},
        ],
    }
    base.update(kw)
    return base


def build(tmp, rec, out="out", **kw):
    man = build_mix(rec, tmp / out, base_dir=tmp, **kw)
    return man, read_prompts(tmp / out / man["output"]["path"])


def check_accounting(man):
    c = man["counts"]
    assert c["read"] == c["kept"] + sum(c["removed"].values())
    for name, s in man["sources"].items():
        removed = sum(s[r] for r in ("rejected", "filtered", "excluded", "duplicate", "contaminated", "not_sampled"))
        assert s["read"] == s["kept"] + removed, name


def test_build_all_and_record_shape(data):
    man, rows = build(data, recipe())
    assert len(rows) == 130
    assert man["counts"]["by_category"] == {"chat": 30, "code": 40, "math": 60}
    r = next(r for r in rows if r["source"] == "h")
    assert set(r) == {"id", "category", "source", "messages"}
    assert r["messages"][0]["role"] == "user" and r["messages"][0]["content"].startswith("Tell me fact")
    assert r["id"] == prompt_id(r["messages"][0]["content"]) and len(r["id"]) == 20
    assert len({r["id"] for r in rows}) == 130
    check_accounting(man)
    ids = (data / "out" / "ids.txt").read_text().split()
    assert ids == sorted(r["id"] for r in rows)
    assert man["output"]["sha256"] == hashlib.sha256((data / "out" / "prompts.jsonl").read_bytes()).hexdigest()


def test_determinism_and_input_order_independence(data):
    m1, _ = build(data, recipe(quotas={"categories": {"math": 10, "code": 5}}), "o1")
    m2, _ = build(data, recipe(quotas={"categories": {"math": 10, "code": 5}}), "o2")
    assert m1["output"]["sha256"] == m2["output"]["sha256"]
    assert (data / "o1/prompts.jsonl").read_bytes() == (data / "o2/prompts.jsonl").read_bytes()
    # shuffled input lines give the same sample
    lines = (data / "math.jsonl").read_text().splitlines()
    (data / "math.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    m3, _ = build(data, recipe(quotas={"categories": {"math": 10, "code": 5}}), "o3")
    assert m3["output"]["sha256"] == m1["output"]["sha256"]
    m4, _ = build(data, recipe(seed=8, quotas={"categories": {"math": 10, "code": 5}}), "o4")
    assert m4["output"]["sha256"] != m1["output"]["sha256"]


def test_filters_tags_length_regex(data):
    rec = recipe()
    rec["sources"][0]["filters"] = {"tags": ["olympiads", "amc_aime"]}
    man, rows = build(data, rec, "t")
    assert man["sources"]["m"]["kept"] == 30 and man["sources"]["m"]["filtered_by"] == {"tag": 30}
    rec["sources"][0]["filters"] = {"exclude_tags": ["cn_k12"], "regex": r"number \d\b"}
    man, rows = build(data, rec, "r")
    nums = sorted(int(r["messages"][0]["content"].split(":")[0].split()[-1]) for r in rows if r["source"] == "m")
    assert nums == [0, 1, 2, 4, 5, 6, 8, 9]  # 3 and 7 are cn_k12
    assert man["sources"]["m"]["filtered_by"] == {"tag": 15, "regex": 37}
    rec["sources"][0]["filters"] = {"exclude_regex": "number 1", "min_chars": 0, "max_chars": 40}
    man, rows = build(data, rec, "l")
    kept = [r["messages"][0]["content"] for r in rows if r["source"] == "m"]
    assert kept and all(len(t) <= 40 and "number 1" not in t for t in kept)
    check_accounting(man)


def test_tag_filter_exact_counts(data):
    rec = recipe()
    rec["sources"][0]["filters"] = {"exclude_tags": ["cn_k12"], "regex": r"number \d:"}
    man, rows = build(data, rec)
    nums = sorted(int(r["messages"][0]["content"].split(":")[0].split()[-1]) for r in rows if r["source"] == "m")
    assert nums == [0, 1, 2, 4, 5, 6, 8, 9]  # 3 and 7 are cn_k12
    assert man["sources"]["m"]["filtered"] == 52


def test_quotas_counts_and_fractions(data):
    man, rows = build(data, recipe(quotas={"categories": {"math": 12, "code": 0.25}}), "a")
    assert man["counts"]["by_category"] == {"math": 12, "code": 10, "chat": 30}
    man, rows = build(data, recipe(quotas={"total": 40, "categories": {"math": 0.5, "code": 0.25}}), "b")
    assert man["counts"]["by_category"] == {"math": 20, "code": 10, "chat": 10}
    # per source: count, and a fraction of the category quota
    rec = recipe(quotas={"categories": {"math": 20}, "sources": {"m": 0.5, "c": 7}})
    rec["sources"].append({"name": "m2", "path": "extra_math.jsonl", "prompt_field": "q", "category": "math"})
    write_jsonl(data / "extra_math.jsonl", [{"q": f"Extra question {i}?"} for i in range(25)])
    man, rows = build(data, rec, "c")
    assert man["counts"]["by_source"] == {"m": 10, "m2": 10, "c": 7, "h": 30}
    assert man["sources"]["m2"]["not_sampled"] == 15
    check_accounting(man)


def test_quota_shortfall_error_and_allow(data):
    with pytest.raises(DFlashLabError, match=r"asks for 100 prompts but the sources hold 60"):
        build(data, recipe(quotas={"categories": {"math": 100}}))
    man, rows = build(data, recipe(quotas={"categories": {"math": 100}}, allow_shortfall=True), "s")
    assert man["counts"]["by_category"]["math"] == 60
    assert man["shortfalls"] == [{"quota": "category 'math'", "asked": 100, "got": 60}]
    with pytest.raises(DFlashLabError, match=r"source 'c'.*hold 40"):
        build(data, recipe(quotas={"sources": {"c": 41}}))


def test_dedup_across_sources_and_repeat_cap(data):
    write_jsonl(data / "dups.jsonl", [{"problem": "MATH problem number 3:   compute 3 plus 9."}, {"problem": "new one"},
                                      {"problem": "new   ONE"}])
    rec = recipe()
    rec["sources"].append({"name": "d", "path": "dups.jsonl", "prompt_field": "problem", "category": "math"})
    man, rows = build(data, rec)
    assert man["sources"]["d"]["duplicate"] == 2 and man["sources"]["d"]["kept"] == 1
    assert man["counts"]["removed"]["duplicate"] == 2
    man, rows = build(data, {**rec, "repeat_cap": 2}, "cap")
    assert man["sources"]["d"]["duplicate"] == 0 and man["sources"]["d"]["kept"] == 3
    ids = [r["id"] for r in rows]
    assert max(ids.count(i) for i in set(ids)) == 2
    check_accounting(man)


def test_upsample_respects_repeat_cap(data):
    rec = recipe(quotas={"categories": {"chat": 75}}, repeat_cap=3, upsample=True)
    man, rows = build(data, rec)
    chat = [r["id"] for r in rows if r["category"] == "chat"]
    assert len(chat) == 75 and len(set(chat)) == 30 and max(chat.count(i) for i in set(chat)) == 3
    assert man["sources"]["h"]["upsampled"] == 45
    check_accounting(man)
    with pytest.raises(DFlashLabError, match="hold 90"):
        build(data, {**rec, "quotas": {"categories": {"chat": 91}}}, "u2")


def test_exclusion_by_manifest(data):
    man1, rows1 = build(data, recipe(quotas={"categories": {"math": 25, "code": 10, "chat": 5}}), "first")
    assert load_manifest_ids(data / "first" / "manifest.json") == {r["id"] for r in rows1}
    man2, rows2 = build(data, recipe(exclude=["first/manifest.json"]), "second")
    assert not ({r["id"] for r in rows1} & {r["id"] for r in rows2})
    assert man2["counts"]["removed"]["excluded"] == 40
    assert man2["counts"]["by_category"] == {"chat": 25, "code": 30, "math": 35}
    check_accounting(man2)
    # a tampered id file is refused
    (data / "first" / "ids.txt").write_text("abc\n")
    with pytest.raises(DFlashLabError, match="sha256"):
        load_manifest_ids(data / "first")


def test_rejects_accounting_and_strict(data):
    bad = data / "bad.jsonl"
    bad.write_bytes(
        b'{"problem": "fine one"}\n'
        b'{"problem": "bad utf8 \xff\xfe"}\n'
        b'{not json\n'
        b'{"other": "x"}\n'
        b'{"problem": ""}\n'
        b'{"problem": 42}\n'
        b'{"problem": "   "}\n'
        b'\n'
        b'{"problem": "fine two"}\n'
    )
    rec = {"seed": 1, "sources": [{"name": "b", "path": "bad.jsonl", "prompt_field": "problem", "category": "math"}]}
    man, rows = build(data, rec)
    assert len(rows) == 2
    assert man["counts"]["read"] == 8 and man["counts"]["removed"]["rejected"] == 6
    check_accounting(man)
    rej = [json.loads(l) for l in (data / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rej] == [2, 3, 4, 5, 6, 7]
    assert "UTF-8" in rej[0]["reason"] and "JSON" in rej[1]["reason"] and "missing" in rej[2]["reason"]
    assert "not text" in rej[4]["reason"] and "empty" in rej[5]["reason"]
    with pytest.raises(DFlashLabError, match=r"bad\.jsonl:2: invalid UTF-8"):
        build(data, rec, "strict", strict=True)


def test_sharegpt_and_first_user_turn(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
        {"conversations": [{"from": "gpt", "value": "only assistant"}]},
    ])
    rec = {"sources": [{"name": "s", "path": "s.jsonl", "messages_field": "conversations", "category": "chat"}]}
    man, rows = build(tmp_path, rec)
    assert sorted(r["messages"][0]["content"] for r in rows) == ["Hi there", "parts"]
    assert man["counts"]["removed"]["rejected"] == 1


def test_json_and_parquet_sources_and_parquet_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"p": f"json prompt {i}"} for i in range(5)]))
    pq.write_table(pa.table({"p": [f"parquet prompt {i}" for i in range(7)], "tag": ["x"] * 7}), tmp_path / "b.parquet")
    rec = {"sources": [{"name": "a", "path": "a.json", "prompt_field": "p", "category": "chat"},
                       {"name": "b", "path": "b.parquet", "prompt_field": "p", "tag_field": "tag", "category": "code",
                        "filters": {"tags": ["x"]}}],
           "format": "parquet"}
    man, rows = build(tmp_path, rec)
    assert man["output"]["path"] == "prompts.parquet" and len(rows) == 12
    assert man["counts"]["by_source"] == {"a": 5, "b": 7}


def test_recipe_validation_errors():
    with pytest.raises(DFlashLabError, match=r"unknown key 'colour'"):
        parse_recipe(recipe(colour="red"))
    bad = recipe()
    bad["sources"][0]["promt_field"] = "x"
    with pytest.raises(DFlashLabError, match=r"unknown key 'promt_field' at sources\.0"):
        parse_recipe(bad)
    with pytest.raises(DFlashLabError, match="unknown preset 'nope'"):
        parse_recipe({"sources": [{"name": "x", "preset": "nope"}]})
    with pytest.raises(DFlashLabError, match="not a source"):
        parse_recipe(recipe(quotas={"sources": {"zz": 3}}))
    with pytest.raises(DFlashLabError, match="fraction"):
        parse_recipe(recipe(quotas={"categories": {"math": 1.5}}))
    with pytest.raises(DFlashLabError, match="exactly one of `prompt_field` or `messages_field`"):
        parse_recipe({"sources": [{"name": "x", "path": "a.jsonl", "category": "math"}]})
    r = parse_recipe({"sources": [{"name": "n", "preset": "numina-math-cot-hard"}]})
    assert r.sources[0].hf.dataset == "AI-MO/NuminaMath-CoT"
    assert set(r.sources[0].filters.tags) == {"olympiads", "amc_aime", "aops_forum", "math"}


def test_cli_build_stats_and_errors(data, capsys):
    cfg = data / "mix.yaml"
    cfg.write_text(yaml.safe_dump(recipe(quotas={"categories": {"math": 5}})))
    assert main(["prompts", "build", "--config", str(cfg), "--out", str(data / "cli")]) == 0
    assert "wrote 75 prompts" in capsys.readouterr().out
    assert main(["prompts", "stats", str(data / "cli")]) == 0
    out = capsys.readouterr().out
    assert "not_sampled" in out and "math" in out and " 55" in out
    cfg.write_text(yaml.safe_dump(recipe(sed=3)))
    assert main(["prompts", "build", "--config", str(cfg), "--out", str(data / "cli2")]) == 2
    assert "unknown key 'sed'" in capsys.readouterr().err
    assert main(["prompts", "stats", str(data / "nowhere")]) == 2


def test_parallel_reader_gives_identical_results(data, monkeypatch):
    import dflash_lab.data.mix as mix

    bad = data / "math.jsonl"
    bad.write_bytes(bad.read_bytes() + b'{broken\n{"problem": "\xff"}\n{"nope": 1}\n')
    rec = recipe(quotas={"categories": {"math": 20}})
    rec["sources"][0]["filters"] = {"exclude_tags": ["cn_k12"]}
    m1, _ = build(data, rec, "serial", workers=1)
    monkeypatch.setattr(mix, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(mix, "CHUNK_BYTES", 300)
    m2, _ = build(data, rec, "par", workers=2)
    assert m1["output"]["sha256"] == m2["output"]["sha256"]
    assert m1["counts"] == m2["counts"] and m1["sources"] == m2["sources"]
    assert (data / "serial/rejects.jsonl").read_text() == (data / "par/rejects.jsonl").read_text()
    assert [json.loads(l)["line"] for l in (data / "par/rejects.jsonl").read_text().splitlines()] == [61, 62, 63]
