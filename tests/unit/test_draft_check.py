"""`draft check` (issue 21): the builtin loop is the reference; an engine that exposes per-cycle
drafts is compared token by token (first divergence: prompt, cycle, position, both tokens), one that
reports totals per response is compared on those; near-ties of the draft's logits are not failures."""

import copy

import pytest

from dflash_lab.eval import draft_check as C
from dflash_lab.models.checkpoint import save_draft
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import load_target
from dflash_lab.testing import tiny_target_dir


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    target = load_target(tiny_target_dir(root / "target"))
    cfg = build_draft_config(target, num_layers=1, block_size=4)
    draft = save_draft(DFlashDraftModel(cfg).init_weights(seed=0), root / "draft")
    prompts = [target.encode_prompt([{"role": "user", "content": t}]) for t in C.CHECK_PROMPTS[:3]]
    return C.CheckJob(target=target, target_spec=str(root / "target"), draft_dir=draft, prompts=prompts,
                      max_new_tokens=12, block_size=4)


class ReplayEngine:
    """An engine that exposes per-cycle drafts (as the vLLM engine module may): it replays our loop's
    runs, with `mutate(runs)` applied."""

    name = "replay"

    def __init__(self, mutate=None):
        self.mutate = mutate or (lambda runs: None)

    def unavailable(self, job):
        return None

    def run(self, job):
        runs = copy.deepcopy(C.BuiltinEngine().run(job))
        for run in runs:
            run.draft_margins = None  # an engine reports no margins of ours
        self.mutate(runs)
        return runs


def _check(job, mutate=None, totals_only=False):
    def factory():
        engine = ReplayEngine(mutate)
        if totals_only:
            inner = engine.run
            engine.run = lambda j: [C.EngineRun(output_ids=r.output_ids, cycles=r.cycles, drafted=r.drafted,
                                                accepted=r.accepted, finish_reason=r.finish_reason) for r in inner(j)]
        return engine

    return C.check_draft(job, ["replay"], engines={"replay": factory})


def test_the_same_drafts_agree(job):
    builtin, replay = _check(job)
    assert builtin.drafts == "reference" and builtin.lossless == "yes" and builtin.tau >= 1
    assert len(builtin.acceptance_per_position) == 3
    assert replay.drafts == "same" and replay.divergence is None and not replay.failed


def test_a_different_drafted_token_is_the_first_divergence(job, monkeypatch):
    def mutate(runs):
        runs[1].cycle_drafts[2][1] += 1  # prompt 1, cycle 2, position 2

    monkeypatch.setattr(C, "DRAFT_TIE_TOLERANCE", -1.0)  # no margin counts as a tie
    _, replay = _check(job, mutate)
    d = replay.divergence
    assert replay.drafts == "diverged" and replay.failed and d["kind"] == "failure"
    assert (d["prompt"], d["cycle"], d["position"]) == (1, 2, 2) and d["engine_token"] == d["builtin_token"] + 1
    text = C.format_report([_, replay], job)
    assert "prompt 1, cycle 2, position 2: builtin drafted" in text and "FAILED: replay" in text


def test_a_divergence_at_a_near_tie_of_the_draft_is_numerical(job, monkeypatch):
    monkeypatch.setattr(C, "DRAFT_TIE_TOLERANCE", float("inf"))
    _, replay = _check(job, lambda runs: runs[0].cycle_drafts[0].__setitem__(0, runs[0].cycle_drafts[0][0] + 1))
    assert replay.divergence["kind"] == "numerical" and not replay.failed


def test_totals_only_engines_compare_counts_per_response(job):
    _, same = _check(job, totals_only=True)
    assert same.drafts == "same totals" and "not exposed" in same.drafts_note and same.acceptance_per_position is None

    def fewer(runs):
        runs[2].accepted -= 1
        runs[2].cycles += 1

    _, other = _check(job, fewer, totals_only=True)
    assert other.drafts == "diverged" and other.divergence["prompt"] == 2 and other.divergence["cycle"] is None


def test_an_output_that_differs_from_greedy_is_not_lossless(job):
    def wrong(runs):
        runs[0].output_ids[-1] += 1

    _, replay = _check(job, wrong)
    assert replay.lossless == "no" and replay.failed and replay.lossless_details[0]["prompt"] == 0


def test_unavailable_engines_say_why(job, monkeypatch, tmp_path):
    from dflash_lab.engines import vllm_env

    monkeypatch.setattr(vllm_env, "engine_dir", lambda: tmp_path / "no-engine")
    monkeypatch.delenv(vllm_env.PYTHON_ENV, raising=False)
    reports = C.check_draft(job, ["vllm"])
    assert [r.engine for r in reports] == ["builtin", "vllm"]
    assert reports[1].available is False and "engines install vllm" in reports[1].why
    assert "vllm      not available: " in C.format_report(reports, job)
    with pytest.raises(Exception, match="--engines"):
        C.parse_engines("builtin,sglang")


def test_an_engine_with_run_wide_counters_reports_its_own_figures(job):
    class Counters(ReplayEngine):
        """Like vLLM's server: totals per response, acceptance per position from run-wide counters."""

        def run(self, job):
            return [C.EngineRun(output_ids=r.output_ids, finish_reason=r.finish_reason) for r in super().run(job)]

        def summary(self):
            return {"tau": 2.5, "acceptance_per_position": [0.5, 0.25, 0.0]}

    _, counters = C.check_draft(job, ["counters"], engines={"counters": Counters})
    assert counters.tau == 2.5 and counters.acceptance_per_position == [0.5, 0.25, 0.0]
    assert counters.drafts == "not compared" and not counters.failed and counters.lossless == "yes"


class FakeVllm:
    """Stands in for the vLLM server of `VllmCheckEngine`: answers each prompt with our loop's output
    and moves the spec-decode counters by our loop's cycles and accepted counts (`extra_accepted`
    per prompt: vLLM's count of a response that ends inside a drafted block)."""

    def __init__(self, runs, extra_accepted=0):
        self.runs, self.extra, self.i = runs, extra_accepted, 0
        self.counters = {"accepted": 0.0, "drafts": 0.0, "per_pos": {0: 0.0}}

    def server(self, cfg):
        import contextlib

        return contextlib.nullcontext("http://fake")

    def read(self, url):
        return copy.deepcopy(self.counters)

    def post(self, url, ids, max_new_tokens, **kw):
        run = self.runs[self.i]
        self.i += 1
        self.counters["drafts"] += run.cycles
        self.counters["accepted"] += run.accepted + self.extra
        self.counters["per_pos"][0] += sum(a >= 1 for a in run.cycle_accepted)
        return {"output_ids": run.output_ids, "finish_reason": run.finish_reason}


def test_the_vllm_engine_compares_per_response_counters(job, monkeypatch):
    """vLLM's engine reads the counters around each request (one at a time): per-response cycles and
    accepted, tau and acceptance per position from the counters over the whole run."""
    from dflash_lab.eval import vllm_engine as V

    ours = C.BuiltinEngine().run(job)
    fake = FakeVllm(ours)
    monkeypatch.setattr(V, "VllmServer", fake.server)
    monkeypatch.setattr(V, "read_counters", fake.read)
    monkeypatch.setattr(V, "post_completion", fake.post)
    _, vllm = C.check_draft(job, ["vllm"], engines={"vllm": lambda: _available(V.draft_check_engine())})
    assert vllm.drafts == "same totals" and vllm.lossless == "yes" and not vllm.failed
    cycles = sum(r.cycles for r in ours)
    assert vllm.tau == round(1 + sum(r.accepted for r in ours) / cycles, 4)
    assert vllm.acceptance_per_position[0] == round(sum(a >= 1 for r in ours for a in r.cycle_accepted) / cycles, 4)

    fake = FakeVllm(ours, extra_accepted=2)  # two more accepted than our loop on every prompt: a divergence
    monkeypatch.setattr(V, "VllmServer", fake.server)
    monkeypatch.setattr(V, "read_counters", fake.read)
    monkeypatch.setattr(V, "post_completion", fake.post)
    _, other = C.check_draft(job, ["vllm"], engines={"vllm": lambda: _available(V.draft_check_engine())})
    assert other.drafts == "diverged" and other.divergence["prompt"] == 0


def test_vllm_in_bf16_is_checked_against_its_own_plain_decoding(job, monkeypatch):
    """A Gated DeltaNet target on a CPU runs vLLM in bf16 (vllm_engine.resolve_dtype): its drafts and
    counts come from bf16 features and logits, so differing from our fp32 loop is `numerical`, and an
    output that differs from our fp32 greedy but equals plain vLLM's (same dtype) is `numerical`;
    one that differs from plain vLLM beyond a near-tie stays a failure."""
    from dflash_lab.eval import vllm_engine as V

    ours = C.BuiltinEngine().run(job)
    other = [C.EngineRun(output_ids=r.output_ids[:1] + [r.output_ids[1] + 1] + r.output_ids[2:], cycles=r.cycles,
                         accepted=r.accepted, cycle_accepted=r.cycle_accepted, finish_reason=r.finish_reason)
             for r in ours]  # another token at index 1: not our greedy
    monkeypatch.setattr(V, "resolve_dtype", lambda requested, target_dir, device=None: "bfloat16")
    # plain vLLM (one start, after the speculative one): prompt 0 as vLLM with the draft answered;
    # prompt 1 our greedy, with vLLM's token 1 below the first place beyond the bf16 tolerance
    far = V.tie_tolerance("bfloat16") + 1
    plain_runs = [(other[0].output_ids, []),
                  (ours[1].output_ids, [[]] + [[(ours[1].output_ids[1], -0.1), (other[1].output_ids[1], -0.1 - far)]])]
    asked = []
    monkeypatch.setattr(V, "plain_top2", lambda url, ids, n, k: asked.append(k) or plain_runs[len(asked) - 1])
    fake = FakeVllm(other, extra_accepted=2)
    monkeypatch.setattr(V, "VllmServer", fake.server)
    monkeypatch.setattr(V, "read_counters", fake.read)
    monkeypatch.setattr(V, "post_completion", fake.post)
    import dataclasses

    two = dataclasses.replace(job, prompts=job.prompts[:2])
    _, vllm = C.check_draft(two, ["vllm"], engines={"vllm": lambda: _available(V.draft_check_engine())})
    assert vllm.dtype == "bfloat16" and vllm.drafts == "diverged"
    assert vllm.divergence["kind"] == "numerical" and "bfloat16" in vllm.divergence["note"]
    first, second = vllm.lossless_details
    assert first["kind"] == "numerical" and "plain vLLM" in first["note"] and first["index"] == 1
    assert second["kind"] == "failure" and second["speculative"]["gap"] == pytest.approx(far) and vllm.lossless == "no"
    assert vllm.failed and asked == [V.VLLM_TIE_TOP_K["bfloat16"]] * 2
    assert "(bfloat16)" in C.format_report([vllm], two)


def _available(engine):
    engine.unavailable = lambda job: None
    return engine


def test_an_answer_that_ends_inside_a_drafted_block_is_not_a_divergence():
    ours = C.EngineRun(output_ids=[1, 2, 3], cycles=3, accepted=4, finish_reason="length")
    assert C._stop_in_draft(ours, C.EngineRun(output_ids=[1, 2, 3], cycles=3, accepted=5))  # vLLM's count
    assert not C._stop_in_draft(ours, C.EngineRun(output_ids=[1, 2, 3], cycles=2, accepted=5))  # llama.cpp: stop only
    stop = C.EngineRun(output_ids=[1, 2, 3], cycles=3, accepted=4, finish_reason="stop")
    assert C._stop_in_draft(stop, C.EngineRun(output_ids=[1, 2, 3], cycles=2, accepted=5))  # llama.cpp's count
    assert not C._stop_in_draft(stop, C.EngineRun(output_ids=[1, 2, 3], cycles=3, accepted=6))
