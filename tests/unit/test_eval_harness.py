"""Harness: tau statistics, the mt-bench turn flow, and the builtin backend end to end via the CLI."""

import json

import pytest
import torch

from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval import backends, harness
from dflash_lab.eval.benchmarks import Benchmark, Sample
from dflash_lab.testing import tiny_target_dir, write_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target dir, a tiny random draft dir for it, and a bench dir in the shared layout."""
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target

    root = tmp_path_factory.mktemp("tiny")
    target_dir = tiny_target_dir(root / "target")
    target = load_target(target_dir)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=8))
    draft.init_weights(seed=0)
    draft_dir = save_draft(draft, root / "draft")
    bench = root / "bench"
    write_bench_dir(bench)
    return {"root": root, "target_dir": target_dir, "target": target, "draft_dir": draft_dir, "bench": bench}


def write_bench_dir(bench):
    write_jsonl(bench / "gsm8k.test.jsonl", [{"question": f"Natalia sold {i} clips. How many?"} for i in range(4)])
    write_jsonl(bench / "math500.test.jsonl", [{"problem": f"What is {i}+{i}?"} for i in range(4)])
    write_jsonl(bench / "humaneval.test.jsonl",
                [{"task_id": f"HumanEval/{i}", "prompt": f"def add{i}(a, b):\n"} for i in range(4)])
    (bench / "mbpp.sanitized.json").write_text(json.dumps(
        [{"task_id": t, "prompt": f"Write a function number {t}."} for t in (2, 11, 12, 600)]))
    write_jsonl(bench / "mt_bench.question.jsonl",
                [{"question_id": 81 + i, "turns": [f"Explain the sky {i}.", "Now a poem."]} for i in range(3)])


def test_tau_against_hand_computed_cycles():
    cycles = [[3, 1, 2], [5], [1, 1]]
    assert harness.tau_pooled(cycles) == pytest.approx(13 / 6)
    assert harness.tau_per_request(cycles) == pytest.approx((2 + 5 + 1) / 3)
    assert harness.acceptance_histogram(cycles) == {"1": 3, "2": 1, "3": 1, "5": 1}
    assert harness.tau_pooled([[]]) is None and harness.tau_per_request([[], []]) is None
    # a response with no cycle (stopped at the prefill token) does not count in the per-request mean
    assert harness.tau_per_request([[4, 2], []]) == pytest.approx(3)


def test_summarise_sglang_and_builtin_records():
    sg = [{"completion_tokens": 10, "spec_verify_ct": 4, "spec_accept_length": 2.5, "wall_s": 1.0},
          {"completion_tokens": 6, "spec_verify_ct": 3, "spec_accept_length": 2.0, "wall_s": 1.0}]
    out = harness.summarise(sg, "sglang")
    assert out["tau_pooled"] == pytest.approx(16 / 7)
    assert out["tau_per_request"] == pytest.approx(2.25)
    assert out["cycles"] == 7 and out["generated_tokens"] == 16 and out["lossless"] is None
    bi = [{"output_ids": [1, 2, 3, 4], "cycle_acceptance": [2, 1], "wall_s": 2.0, "lossless": True,
           "greedy_wall_s": 4.0}]
    out = harness.summarise(bi, "builtin")
    assert out["tau_pooled"] == 1.5 and out["tokens_per_s"] == 2.0 and out["speedup"] == 2.0
    assert out["lossless"] is True


def test_mt_bench_second_turn_sees_generated_answer(tiny):
    target = tiny["target"]
    bench = Benchmark("mt-bench", [Sample("81", 0, ("Explain the sky.", "Now a poem."))], "test")
    results = harness.evaluate(target, "none", [bench], max_new_tokens=6, progress=False)
    first, second = results["benchmarks"]["mt-bench"]["responses"]
    assert (first["turn"], second["turn"]) == (1, 2)
    answer = target.decode(first["output_ids"])
    assert answer  # the random tiny model says something
    expected = target.render_prompt([
        {"role": "user", "content": "Explain the sky."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now a poem."},
    ])
    assert second["prompt_text"] == expected
    assert f"<|im_start|>assistant\n{answer}<|im_end|>" in second["prompt_text"]
    assert first["prompt_text"] == target.render_prompt([{"role": "user", "content": "Explain the sky."}])


def test_builtin_eval_cli_end_to_end(tiny, tmp_path):
    out, db = tmp_path / "r.json", tmp_path / "runs.db"
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--draft", str(tiny["draft_dir"]),
               "--bench-dir", str(tiny["bench"]), "--limit", "1", "--max-new-tokens", "8",
               "--db", str(db), "--out", str(out), "--quiet", "--no-hub", "--no-pypi", "--name", "tiny-ref"])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["backend"] == "builtin" and results["thinking"] is False
    assert results["block_size"] == 8 and results["draft"]["sha256"]
    assert results["harness_version"] == harness.HARNESS_VERSION
    assert results["target"]["fingerprint"] == tiny["target"].fingerprint
    assert set(results["benchmarks"]) == {"gsm8k", "math500", "humaneval", "mbpp", "mt-bench"}
    for name, bench in results["benchmarks"].items():
        assert bench["lossless"] is True, name
        cycles = [c for r in bench["responses"] for c in r["cycle_acceptance"]]
        assert bench["cycles"] == len(cycles)
        assert bench["tau_pooled"] == pytest.approx(sum(cycles) / len(cycles))
        assert sum(bench["acceptance_histogram"].values()) == len(cycles)
        assert all(1 <= c <= 8 for c in cycles)
        assert bench["generated_tokens"] == sum(len(r["output_ids"]) for r in bench["responses"])
        for key in ("tau_per_request", "wall_s", "tokens_per_s", "settings_key"):
            assert bench[key] is not None
    assert len(results["benchmarks"]["mt-bench"]["responses"]) == 2  # one sample, two turns
    mbpp_prompt = results["benchmarks"]["mbpp"]["responses"][0]["prompt_text"]
    assert "Write a function number 11." in mbpp_prompt  # task 2 and 600 are outside the test split

    from dflash_lab import registry

    runs = {r["name"]: r for r in registry.list_runs(db)}
    assert runs["tiny-ref"]["kind"] == "reference" and runs["tiny-ref"]["num_results"] == 5


def test_lossless_failure_is_reported(tiny, tmp_path, monkeypatch, capsys):
    from dflash_lab.decoding import speculative

    real = speculative.greedy_generate

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.output_ids = result.output_ids[:-1] + [(result.output_ids[-1] + 1) % 100]
        return result

    monkeypatch.setattr(speculative, "greedy_generate", broken)
    out = tmp_path / "r.json"
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--drafter", "prompt-lookup", "--benchmarks", "gsm8k",
               "--bench-dir", str(tiny["bench"]), "--limit", "1", "--max-new-tokens", "4",
               "--no-db", "--out", str(out), "--quiet"])
    assert rc == 1
    assert json.loads(out.read_text())["benchmarks"]["gsm8k"]["lossless"] is False
    assert "LOSSLESS CHECK FAILED" in capsys.readouterr().err


def test_no_lossless_check_gives_null(tiny, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--drafter", "none", "--benchmarks", "gsm8k",
               "--bench-dir", str(tiny["bench"]), "--limit", "1", "--max-new-tokens", "4", "--no-lossless-check",
               "--no-db", "--out", str(out), "--quiet"])
    assert rc == 0
    bench = json.loads(out.read_text())["benchmarks"]["gsm8k"]
    assert bench["lossless"] is None and bench["tau_pooled"] == 1.0


def test_bad_inputs_are_user_errors(tiny, tmp_path, capsys):
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--draft", str(tmp_path / "nope"),
               "--bench-dir", str(tiny["bench"]), "--benchmarks", "gsm8k", "--out", str(tmp_path / "r.json"),
               "--no-db", "--quiet"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--drafter", "none", "--benchmarks", "gsm8k",
               "--bench-dir", str(tmp_path), "--no-hub", "--no-pypi", "--out", str(tmp_path / "r.json"), "--no-db"])
    assert rc == 2 and "gsm8k.test.jsonl" in capsys.readouterr().err


def test_loaded_benchmarks_are_selected_by_evaluate(tiny):
    from dflash_lab.eval.benchmarks import load_benchmark

    bench = load_benchmark("gsm8k", tiny["bench"], allow_pypi=False, allow_hub=False)  # 4 rows, unselected
    results = harness.evaluate(tiny["target"], "none", [bench], limit=2, selection="first", max_new_tokens=3,
                               lossless_check=False, progress=False)
    out = results["benchmarks"]["gsm8k"]
    assert [r["id"] for r in out["responses"]] == ["0", "1"]
    assert out["settings"]["selection"] == "first" and out["settings"]["limit"] == 2


# -- device and dtype; the lossless check in half precision --------------------------------------------
def test_eval_cli_on_cpu_in_bfloat16(tiny, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["eval", "--target", str(tiny["target_dir"]), "--draft", str(tiny["draft_dir"]), "--benchmarks", "gsm8k",
               "--bench-dir", str(tiny["bench"]), "--limit", "2", "--max-new-tokens", "8", "--device", "cpu",
               "--dtype", "bfloat16", "--no-db", "--out", str(out), "--quiet"])
    assert rc == 0
    results = json.loads(out.read_text())
    assert (results["device"], results["dtype"]) == ("cpu", "bfloat16")
    assert results["lossless_tie_tolerance"] == backends.NUMERICAL_TIE_TOLERANCE["bfloat16"] > 0
    bench = results["benchmarks"]["gsm8k"]
    assert bench["lossless"] is True and bench["lossless_failures"] == 0 and bench["settings"]["dtype"] == "bfloat16"
    assert all(r["lossless"] in (True, "numerical") for r in bench["responses"])


def test_placement_defaults_and_the_draft_follows_the_target(tiny):
    from dflash_lab.models.target import resolve_placement

    expected = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    assert resolve_placement("auto", "auto") == expected
    assert resolve_placement("cpu", None) == ("cpu", "float32")
    if not torch.cuda.is_available():
        with pytest.raises(DFlashLabError, match="no usable CUDA"):
            resolve_placement("cuda", "auto")
    target = harness.load_prompt_target(tiny["target_dir"], device="cpu", dtype="bfloat16")
    drafter, _ = harness.resolve_drafter(target, str(tiny["draft_dir"]))
    assert target.dtype == torch.bfloat16
    assert {p.dtype for p in drafter.draft.parameters()} == {torch.bfloat16}


class _ForcedTie:
    """A target whose top two tokens at `position` are `gap` logits apart, ranked one way by a
    one-token (greedy) step and the other way by a multi-token (verify) forward: what bf16 rounding
    does at a near-tie (small gap), or what a broken verify does (large gap)."""

    def __init__(self, target, position: int, gap: float):
        self._target, self.position, self.gap = target, position, gap

    def __getattr__(self, name):
        return getattr(self._target, name)

    def forward(self, input_ids, layer_ids=None, *, position_ids=None, logits_to_keep=0, **kwargs):
        logits, features = self._target.forward(input_ids, layer_ids, position_ids=position_ids,
                                                logits_to_keep=logits_to_keep, **kwargs)
        logits = logits.clone()
        kept = logits.shape[1]
        hit = (position_ids[0, -kept:] == self.position).nonzero()
        if hit.numel():
            row = logits[0, int(hit[0])]
            a, b = row.float().topk(2).indices.tolist()
            verify = input_ids.shape[1] > 1
            row[b] = row[a] + (self.gap / 2 if verify else -self.gap / 2)
        return logits, features


@pytest.mark.parametrize("dtype,gap,kind", [("bfloat16", 0.25, "numerical"), ("bfloat16", 8.0, "failure"),
                                            ("float32", 0.25, "failure")])
def test_lossless_check_tells_a_tie_from_a_wrong_token(tiny, dtype, gap, kind):
    from dflash_lab.eval.benchmarks import load_benchmark

    target = harness.load_prompt_target(tiny["target_dir"], device="cpu", dtype=dtype)
    bench = load_benchmark("gsm8k", tiny["bench"], allow_pypi=False, allow_hub=False)
    prompt = target.encode(target.render_prompt([{"role": "user", "content": select_first(bench)}]))
    forced = _ForcedTie(target, position=len(prompt) + 2, gap=gap)  # decides the output's token 3
    results = harness.evaluate(forced, str(tiny["draft_dir"]), [bench], limit=1, selection="first",
                               max_new_tokens=12, progress=False)
    record = results["benchmarks"]["gsm8k"]["responses"][0]
    mismatch = record["lossless_mismatch"]
    assert mismatch["index"] == 3 and mismatch["position"] == len(prompt) + 2 and mismatch["kind"] == kind
    spec, greedy = mismatch["speculative"], mismatch["greedy"]
    assert spec["token"] != greedy["token"]
    assert spec["top2_ids"][0] == spec["token"] and greedy["top2_ids"][0] == greedy["token"]
    assert spec["margin"] == pytest.approx(gap / 2, abs=0.07)  # each run's own top-2 margin at that position
    assert greedy["margin"] <= gap / 2 + 0.07
    if gap < 1:
        assert spec["token"] == greedy["top2_ids"][1] and greedy["margin"] == pytest.approx(gap / 2, abs=0.07)
    summary = results["benchmarks"]["gsm8k"]
    if kind == "numerical":
        assert record["lossless"] == "numerical" and summary["lossless"] is True
        assert summary["lossless_numerical"] == 1 and not harness.lossless_failures(results)
    else:
        assert record["lossless"] is False and summary["lossless"] is False and summary["lossless_failures"] == 1
        assert harness.lossless_failures(results) == ["gsm8k/0/turn1"]


def select_first(bench):
    return bench.samples[0].turns[0]
def test_sampled_eval_records_its_settings_apart_from_greedy(tiny, tmp_path):
    from dflash_lab.decoding.sampling import SamplingParams

    common = dict(target_fingerprint="f", selection="first", limit=1, max_new_tokens=8, backend="builtin",
                  data_sha256="d")
    greedy = harness.harness_settings(**common)
    assert "sampling" not in greedy  # the greedy key is what it was before sampling existed
    assert harness.harness_settings(**common, sampling=SamplingParams(0.0, top_p=0.5)) == greedy
    hot = harness.harness_settings(**common, sampling=SamplingParams(0.7, top_p=0.8, top_k=20, seed=1))
    assert hot["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert harness.settings_key(hot) != harness.settings_key(greedy)
    assert harness.settings_key(hot) == harness.settings_key(
        harness.harness_settings(**common, sampling=SamplingParams(0.7, top_p=0.8, top_k=20, seed=2)))

    out = tmp_path / "r.json"
    args = ["eval", "--target", str(tiny["target_dir"]), "--draft", str(tiny["draft_dir"]), "--benchmarks", "gsm8k",
            "--bench-dir", str(tiny["bench"]), "--limit", "2", "--selection", "first", "--max-new-tokens", "6",
            "--no-db", "--out", str(out), "--quiet", "--temperature", "0.7", "--top-p", "0.8", "--top-k", "20",
            "--seed", "5"]
    assert main(args) == 0
    results = json.loads(out.read_text())
    bench = results["benchmarks"]["gsm8k"]
    assert results["temperature"] == 0.7 and results["sampling"]["seed"] == 5
    assert bench["settings"]["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert bench["lossless"] is None  # no token-for-token check when sampling
    assert [r["seed"] for r in bench["responses"]] == [5, 6]
    assert main(args) == 0
    again = json.loads(out.read_text())["benchmarks"]["gsm8k"]["responses"]
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in bench["responses"]]  # seeded: reproducible
