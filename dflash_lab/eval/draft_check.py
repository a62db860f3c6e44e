"""`dflash-lab draft check DRAFT --target T [--engines builtin,llamacpp,vllm] [--prompts N]` (issue 21).

One draft, the same prompts, every engine that can run it; per engine: tau, acceptance per draft
position, lossless (the output equals our fp32 greedy), and whether it drafted what our own loop
drafted. This is the check for "training looks good but serving collapses": an engine that maps the
draft differently (taps, RoPE, masks) drafts other tokens from the first cycle on.

Our builtin loop is the reference: it records, per verify cycle, the tokens the draft proposed, how
many the target accepted, and the draft's own top-2 logit margin at every proposed position. An
engine says what it can (`EngineRun`):

- per-cycle drafted tokens (`cycle_drafts`): compared token by token, cycle by cycle; the first
  difference is reported (prompt, cycle, position, both tokens);
- else totals per response (llama.cpp reports `draft_n` / `draft_n_accepted`; vLLM's counters are
  server-wide per position): the output, the verify cycles and the accepted count are compared
  per prompt.

A divergence is a numerical near-tie, not a failure, when the draft's two best logits at the
position that differs are within `DRAFT_TIE_TOLERANCE` in our fp32 run (with totals only: when any
drafted position of that prompt is such a near-tie); a response that differs from greedy is
classified as the eval backends do. The command exits 1 on a failure.

Engines plug in through `ENGINES` (name -> factory returning an object with `name`,
`unavailable(job) -> str | None` and `run(job) -> list[EngineRun]`; optionally `summary() -> dict`
with `tau` / `acceptance_per_position` / `acceptance_note` measured over the whole run, e.g. from
vLLM's spec-decode counters, and `classify_output_mismatch(job, i, run) -> (verdict, report)`). The vLLM engine is looked up in
`dflash_lab.eval.vllm_engine` (`draft_check_engine()`: totals per response from vLLM's spec-decode
counters, read around each request); where vLLM is not installed it is listed as not available,
with the reason.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import atomic_write_text
from dflash_lab.outputs import add_output

DEFAULT_ENGINES = ("builtin", "llamacpp", "vllm")
DRAFT_TIE_TOLERANCE = 0.05  # logits; llama.cpp's own tie tolerance (eval/llamacpp.py)
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that adds two numbers.",
    "What is 12 times 7? Answer with the number.",
    "Give me a short tip for learning a new language.",
)


@dataclass
class CheckJob:
    """What every engine runs: one draft, one target, the same prompt tokens."""

    target: object  # TargetModel (fp32) for tokenizing and the reference
    target_spec: str
    draft_dir: Path
    prompts: list[list[int]]
    max_new_tokens: int
    gguf: str = "f32"
    threads: int = 1
    block_size: int = 16


@dataclass
class EngineRun:
    """One prompt in one engine. Fields an engine cannot observe stay None."""

    output_ids: list[int]
    cycles: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    cycle_drafts: list[list[int]] | None = None
    cycle_accepted: list[int] | None = None
    draft_margins: list[list[float]] | None = None  # builtin: per cycle, the draft's top-2 margin per slot
    finish_reason: str | None = None


@dataclass
class EngineReport:
    engine: str
    available: bool
    why: str | None = None
    tau: float | None = None
    acceptance_per_position: list[float] | None = None
    acceptance_note: str | None = None
    lossless: str | None = None  # "yes" | "numerical" | "no"
    lossless_details: list[dict] = field(default_factory=list)
    drafts: str | None = None  # "reference" | "same" | "same totals" | "diverged"
    drafts_note: str | None = None
    divergence: dict | None = None
    failed: bool = False
    dtype: str = "float32"  # the engine's precision (vLLM: bfloat16 for a Gated DeltaNet target on a CPU)


# -- our loop, recording what the draft proposed ------------------------------------------------------
class _LogitTap:
    """Stands in for the target inside a drafter: records the top-2 margin of the last `logits` call."""

    def __init__(self, target):
        self._target = target
        self.margins: list[float] | None = None

    def __getattr__(self, name):
        return getattr(self._target, name)

    def logits(self, hidden):
        logits = self._target.logits(hidden)
        top = logits[0].float().topk(2, dim=-1).values
        self.margins = (top[:, 0] - top[:, 1]).tolist()
        return logits


class RecordingDrafter:
    """Wraps a drafter: every proposal's tokens (and the draft's margins where it exposes logits)."""

    def __init__(self, inner):
        self._inner = inner
        self._tap = None
        if hasattr(inner, "target"):
            self._tap = _LogitTap(inner.target)
            inner.target = self._tap
        self.drafts: list[list[int]] = []
        self.margins: list[list[float]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def propose(self, tokens, start, n):
        from dflash_lab.decoding.speculative import as_proposal

        if self._tap is not None:
            self._tap.margins = None
        proposed = self._inner.propose(tokens, start, n)
        ids = as_proposal(proposed).tokens.tolist()
        self.drafts.append(ids)
        margins = self._tap.margins if self._tap is not None and self._tap.margins is not None else []
        self.margins.append([round(m, 5) for m in margins[:len(ids)]])
        return proposed


class BuiltinEngine:
    name = "builtin"

    def unavailable(self, job: CheckJob) -> str | None:
        return None

    def run(self, job: CheckJob) -> list[EngineRun]:
        import torch

        from dflash_lab.decoding.drafters import make_drafter
        from dflash_lab.decoding.speculative import speculative_generate
        from dflash_lab.models.checkpoint import load_draft

        draft = load_draft(job.draft_dir, job.target, dtype=torch.float32)
        runs = []
        for ids in job.prompts:
            drafter = RecordingDrafter(make_drafter("dflash", target=job.target, draft=draft,
                                                    block_size=job.block_size))
            result = speculative_generate(job.target, drafter, ids, job.max_new_tokens, job.target.stop_token_ids)
            accepted = [c - 1 for c in result.cycle_acceptance]
            runs.append(EngineRun(output_ids=result.output_ids, cycles=len(accepted),
                                  drafted=sum(len(d) for d in drafter.drafts), accepted=sum(accepted),
                                  cycle_drafts=drafter.drafts, cycle_accepted=accepted,
                                  draft_margins=drafter.margins, finish_reason=result.finish_reason))
        return runs


class LlamaCppEngine:
    """llama.cpp in-process (xllamacpp) on the target's GGUF with the draft exported to GGUF. It
    reports per response the drafted and accepted counts, not the drafted tokens of each cycle."""

    name = "llamacpp"

    def __init__(self, export=None):
        self.export = export  # tests: a function (draft_dir, target_gguf, out_dir) -> draft GGUF

    def _target_gguf(self, job: CheckJob) -> Path:
        from dflash_lab.eval.llamacpp import target_gguf_for

        if job.gguf in ("f32", "q4_1"):
            return target_gguf_for(job.target_spec, job.gguf)
        return target_gguf_for(job.gguf)

    def unavailable(self, job: CheckJob) -> str | None:
        try:
            import xllamacpp  # noqa: F401
        except ImportError:
            return "xllamacpp is not installed (pip install 'dflash-lab[llamacpp]')"
        try:
            self._target_gguf(job)
        except DFlashLabError as exc:
            return f"{exc} (--gguf FILE names the target's GGUF)"
        return None

    def run(self, job: CheckJob) -> list[EngineRun]:
        from dflash_lab.eval import llamacpp as L
        from dflash_lab.models.embedded import cache_root

        target_gguf = self._target_gguf(job)
        export = self.export or L.export_for_serving
        draft_gguf = export(job.draft_dir, target_gguf, cache_root() / "gguf-drafts")
        longest = max(len(p) for p in job.prompts)
        cfg = L.EngineConfig(model=target_gguf, draft=draft_gguf, speculative="dflash",
                             draft_n_max=job.block_size - 1, threads=job.threads,
                             ctx_size=max(512, longest + job.max_new_tokens + 64))
        runs = []
        with L.LlamaServer(cfg) as url:
            for ids in job.prompts:
                r = L.post_completion(url, ids, job.max_new_tokens)
                runs.append(EngineRun(output_ids=list(r["output_ids"] or []), cycles=r["cycles"],
                                      drafted=r["draft_n"], accepted=r["draft_n_accepted"],
                                      finish_reason=r["finish_reason"]))
        self.plain_cfg = L.EngineConfig(model=target_gguf, threads=job.threads, ctx_size=cfg.ctx_size)
        return runs

    def classify_output_mismatch(self, job: CheckJob, index: int, run: EngineRun):
        """(verdict, report) for a response that differs from greedy: llama.cpp's own plain run decides
        whether it is a near-tie of its two best tokens (eval/llamacpp.py `classify_mismatch`)."""
        from dflash_lab.eval import llamacpp as L

        record = {"prompt_text": job.target.decode(job.prompts[index]), "output_ids": run.output_ids}
        prompt_ids = job.prompts[index]
        with L.LlamaServer(self.plain_cfg) as url:
            target = _FixedEncoder(job.target, prompt_ids)
            return L.classify_mismatch(url, target, record)


class _FixedEncoder:
    """A target whose `encode` returns the exact prompt tokens (decode/encode may not round-trip)."""

    def __init__(self, target, ids):
        self._target, self._ids = target, list(ids)

    def __getattr__(self, name):
        return getattr(self._target, name)

    def encode(self, text):
        return list(self._ids)


def _vllm_engine():
    """The vLLM engine from the vLLM helper's module, when it provides one."""
    try:
        module = importlib.import_module("dflash_lab.eval.vllm_engine")
    except ImportError as exc:
        return _Unavailable("vllm", f"dflash_lab.eval.vllm_engine is not importable ({exc})")
    factory = getattr(module, "draft_check_engine", None)
    if factory is None:
        return _Unavailable("vllm", "dflash_lab.eval.vllm_engine provides no draft_check_engine() yet")
    return factory()


class _Unavailable:
    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def unavailable(self, job: CheckJob) -> str | None:
        return self.why


ENGINES = {"builtin": BuiltinEngine, "llamacpp": LlamaCppEngine, "vllm": _vllm_engine}


# -- comparing -------------------------------------------------------------------------------------
def acceptance_per_position(cycle_accepted: list[int], slots: int) -> list[float]:
    """For k = 1..slots: the share of verify cycles whose first k drafted tokens were all accepted."""
    if not cycle_accepted:
        return []
    return [round(sum(a >= k for a in cycle_accepted) / len(cycle_accepted), 4) for k in range(1, slots + 1)]


def tau_of(runs: list[EngineRun]) -> float | None:
    """Tokens per verify cycle after the prefill's token (SPEC section 6; llama.cpp's definition)."""
    committed = sum(max(len(r.output_ids) - 1, 0) for r in runs)
    cycles = sum(r.cycles or 0 for r in runs)
    return committed / cycles if cycles and all(r.cycles is not None for r in runs) else None


def _stop_in_draft(ours: EngineRun, theirs: EngineRun) -> bool:
    """One accounting difference that is not a divergence: a response that ends inside a drafted
    block (a stop token the DRAFT proposed, or max_new_tokens reached there) is counted by the
    engine as one more accepted token, by our loop as its cycle's own token. llama.cpp then also
    counts one cycle fewer (stop only); vLLM counts the same cycles (stop or length)."""
    if theirs.accepted != (ours.accepted or 0) + 1:
        return False
    llamacpp_like = ours.finish_reason == "stop" and theirs.cycles == (ours.cycles or 0) - 1
    vllm_like = ours.finish_reason in ("stop", "length") and theirs.cycles == ours.cycles
    return llamacpp_like or vllm_like


def first_cycle_divergence(ours: EngineRun, theirs: EngineRun) -> dict | None:
    """The first verify cycle and slot where the two engines drafted different tokens."""
    for cycle, (a, b) in enumerate(zip(ours.cycle_drafts or [], theirs.cycle_drafts or [])):
        for slot, (x, y) in enumerate(zip(a, b)):
            if x != y:
                margins = (ours.draft_margins or [[]] * (cycle + 1))[cycle]
                margin = margins[slot] if slot < len(margins) else None
                return {"cycle": cycle, "position": slot + 1, "builtin_token": x, "engine_token": y,
                        "draft_margin": margin}
        if len(a) != len(b):
            return {"cycle": cycle, "position": min(len(a), len(b)) + 1, "builtin_token": None,
                    "engine_token": None, "draft_margin": None, "note": f"drafted {len(a)} vs {len(b)} tokens"}
    if len(ours.cycle_drafts or []) != len(theirs.cycle_drafts or []):
        n = min(len(ours.cycle_drafts or []), len(theirs.cycle_drafts or []))
        return {"cycle": n, "position": None, "builtin_token": None, "engine_token": None, "draft_margin": None,
                "note": f"{len(ours.cycle_drafts or [])} vs {len(theirs.cycle_drafts or [])} verify cycles"}
    return None


def compare_drafts(reference: list[EngineRun], runs: list[EngineRun]) -> tuple[str, dict | None, str | None]:
    """("same" | "same totals" | "not compared" | "diverged", first divergence or None, note)."""
    per_cycle = all(r.cycle_drafts is not None for r in runs)
    if not per_cycle and all(r.cycles is None and r.accepted is None for r in runs):
        return "not compared", None, "the engine exposes no drafted tokens or draft counts per response"
    for prompt, (ours, theirs) in enumerate(zip(reference, runs)):
        if per_cycle:
            found = first_cycle_divergence(ours, theirs)
            if found is not None:
                margin = found.get("draft_margin")
                found.update(prompt=prompt, kind="numerical" if margin is not None and margin <= DRAFT_TIE_TOLERANCE
                             else "failure")
                return "diverged", found, None
            continue
        same = (theirs.output_ids == ours.output_ids and theirs.cycles in (None, ours.cycles)
                and theirs.accepted in (None, ours.accepted))
        if same or (theirs.output_ids == ours.output_ids and _stop_in_draft(ours, theirs)):
            continue
        ties = [m for cycle in ours.draft_margins or [] for m in cycle if m <= DRAFT_TIE_TOLERANCE]
        return "diverged", {
            "prompt": prompt, "cycle": None, "position": None,
            "builtin": {"cycles": ours.cycles, "accepted": ours.accepted, "drafted": ours.drafted},
            "engine": {"cycles": theirs.cycles, "accepted": theirs.accepted, "drafted": theirs.drafted},
            "same_output": theirs.output_ids == ours.output_ids,
            "kind": "numerical" if ties else "failure",
            "note": "totals only" + (f"; {len(ties)} near-tie(s) in our draft's logits on this prompt" if ties else ""),
        }, None
    if per_cycle:
        return "same", None, None
    return "same totals", None, "per-cycle drafted tokens are not exposed by this engine: compared the output, " \
                                "the verify cycles and the accepted count of every response"


def _lossless(job: CheckJob, engine, runs: list[EngineRun], greedy: list[list[int]]) -> tuple[str, list[dict]]:
    from dflash_lab.eval.backends import first_difference

    details = []
    verdict = "yes"
    for i, (run, ref) in enumerate(zip(runs, greedy)):
        index = first_difference(run.output_ids, ref)
        if index is None:
            continue
        report = {"prompt": i, "index": index, "kind": "failure"}
        classify = getattr(engine, "classify_output_mismatch", None)
        if classify is not None:
            kind, extra = classify(job, i, run)
            report = {"prompt": i, "index": index, **(extra or {}),
                      "kind": "numerical" if kind == "numerical" else "failure"}
        details.append(report)
        verdict = "no" if report["kind"] == "failure" or verdict == "no" else "numerical"
    return verdict, details


def check_draft(job: CheckJob, engine_names: list[str], engines: dict | None = None) -> list[EngineReport]:
    """Run the job in every named engine (builtin always, first: it is the reference)."""
    from dflash_lab.decoding.speculative import greedy_generate

    engines = {**ENGINES, **(engines or {})}
    names = ["builtin"] + [n for n in engine_names if n != "builtin"]
    greedy = [greedy_generate(job.target, ids, job.max_new_tokens, job.target.stop_token_ids).output_ids
              for ids in job.prompts]
    reports: list[EngineReport] = []
    reference: list[EngineRun] | None = None
    for name in names:
        engine = engines[name]()
        why = engine.unavailable(job)
        if why:
            reports.append(EngineReport(name, False, why))
            continue
        runs = engine.run(job)
        report = EngineReport(name, True, tau=tau_of(runs))
        if all(r.cycle_accepted is not None for r in runs):
            report.acceptance_per_position = acceptance_per_position(
                [a for r in runs for a in r.cycle_accepted], job.block_size - 1)
        else:
            report.acceptance_note = f"not exposed by {name} (it reports totals per response)"
        # engines that measure over the whole run (vLLM's counters) give their own figures
        for key, value in (getattr(engine, "summary", dict)() or {}).items():
            if key in ("tau", "acceptance_per_position", "acceptance_note") and value is not None:
                setattr(report, key, value)
        report.lossless, report.lossless_details = _lossless(job, engine, runs, greedy)
        report.dtype = getattr(engine, "dtype", "float32")
        if name == "builtin":
            reference = runs
            report.drafts = "reference"
        else:
            report.drafts, report.divergence, report.drafts_note = compare_drafts(reference, runs)
            _other_precision(report)
        report.failed = report.lossless == "no" or bool(report.divergence and report.divergence["kind"] == "failure")
        reports.append(report)
    return reports


def _other_precision(report: EngineReport) -> None:
    """An engine in bf16 (vLLM on a hybrid target on a CPU) drafts from bf16 target features and
    verifies with bf16 logits: its drafts and counts are not our fp32 loop's, so a divergence there
    is `numerical` (its losslessness is still checked against its own plain decoding)."""
    if report.dtype != "float32" and report.divergence is not None:
        report.divergence["kind"] = "numerical"
        report.divergence["note"] = (report.divergence.get("note") or "") + \
            f"; {report.engine} ran the target in {report.dtype}, our loop in float32"


# -- the command -----------------------------------------------------------------------------------
def format_report(reports: list[EngineReport], job: CheckJob) -> str:
    lines = [f"draft {job.draft_dir} on {job.target_spec}: {len(job.prompts)} prompts, "
             f"{job.max_new_tokens} new tokens, block {job.block_size}"]
    for r in reports:
        if not r.available:
            lines.append(f"  {r.engine:9s} not available: {r.why}")
            continue
        tau = "-" if r.tau is None else f"{r.tau:.3f}"
        precision = "" if r.dtype == "float32" else f"  ({r.dtype})"
        lines.append(f"  {r.engine:9s} tau {tau}  lossless {r.lossless}  drafts {r.drafts}{precision}")
        if r.acceptance_per_position is not None:
            lines.append("            acceptance per position " + " ".join(f"{a:.2f}" for a in r.acceptance_per_position))
        else:
            lines.append(f"            acceptance per position: {r.acceptance_note}")
        if r.drafts_note:
            lines.append(f"            ({r.drafts_note})")
        for d in r.lossless_details:
            lines.append(f"            output differs from greedy on prompt {d['prompt']} at token {d.get('index')} "
                         f"({d['kind']})")
        if r.divergence:
            lines.append("            first divergence: " + _describe_divergence(r.divergence, r.engine, job))
    failed = [r.engine for r in reports if r.failed]
    lines.append("FAILED: " + ", ".join(failed) if failed else "OK: every available engine agrees with the builtin loop")
    return "\n".join(lines)


def _describe_divergence(d: dict, engine: str, job: CheckJob) -> str:
    if d.get("cycle") is not None and d.get("builtin_token") is not None:
        ours, theirs = d["builtin_token"], d["engine_token"]
        return (f"prompt {d['prompt']}, cycle {d['cycle']}, position {d['position']}: builtin drafted {ours} "
                f"({job.target.decode([ours])!r}), {engine} {theirs} ({job.target.decode([theirs])!r}) "
                f"[{d['kind']}; draft margin {d.get('draft_margin')}]")
    if d.get("cycle") is not None:
        return f"prompt {d['prompt']}, cycle {d['cycle']}: {d.get('note')} [{d['kind']}]"
    return (f"prompt {d['prompt']}: builtin {d['builtin']['accepted']} accepted in {d['builtin']['cycles']} cycles, "
            f"{engine} {d['engine']['accepted']} in {d['engine']['cycles']}"
            f"{'' if d['same_output'] else ', different output'} [{d['kind']}; {d['note']}]")


def parse_engines(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise DFlashLabError(f"--engines {text!r}: use a comma list of {', '.join(ENGINES)}")
    return names


def cmd_draft_check(args) -> int:
    from dflash_lab.models.checkpoint import read_draft_config
    from dflash_lab.models.target import load_target

    engines = parse_engines(args.engines)
    if args.prompts < 1 or args.prompts > len(CHECK_PROMPTS):
        raise DFlashLabError(f"--prompts {args.prompts}: choose 1 to {len(CHECK_PROMPTS)}")
    if args.max_new_tokens < 1:
        raise DFlashLabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    draft_dir = Path(args.draft).expanduser()
    cfg = read_draft_config(draft_dir)  # a clear error for a folder that is not a draft, before the target loads
    target = load_target(args.target, dtype="float32")
    prompts = [target.encode_prompt([{"role": "user", "content": text}]) for text in CHECK_PROMPTS[:args.prompts]]
    job = CheckJob(target=target, target_spec=str(args.target), draft_dir=draft_dir, prompts=prompts,
                   max_new_tokens=args.max_new_tokens, gguf=args.gguf, threads=args.threads,
                   block_size=int(cfg.block_size))
    reports = check_draft(job, engines)
    print(format_report(reports, job))
    if args.out:
        report = {"draft": str(draft_dir), "target": str(args.target), "prompts": list(CHECK_PROMPTS[:args.prompts]),
                  "max_new_tokens": args.max_new_tokens, "engines": [asdict(r) for r in reports]}
        atomic_write_text(Path(args.out), json.dumps(report, indent=1))
    return 1 if any(r.failed for r in reports) else 0


def _is_check_report(path: Path, args) -> bool:
    """A JSON report an earlier `draft check` wrote (it may be replaced; anything else is refused)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"draft", "target", "engines"} <= report.keys()


def register(draft_sub) -> None:
    p = draft_sub.add_parser("check", help="run one draft in every available engine and compare their drafts",
                             description="Runs DRAFT on the same prompts in each engine and prints tau, acceptance "
                                         "per position, lossless, and whether it drafted what our builtin loop "
                                         "drafted (exit 1 on a divergence that is not a numerical near-tie).")
    p.add_argument("draft", metavar="DRAFT", help="draft checkpoint directory")
    p.add_argument("--target", required=True, help="embedded name, HF directory or hub id")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma list of {', '.join(ENGINES)} (default: all; builtin always runs, as the reference)")
    p.add_argument("--prompts", type=int, default=4, help=f"how many built-in chat prompts (1-{len(CHECK_PROMPTS)})")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gguf", default="f32", metavar="f32|q4_1|FILE",
                   help="llamacpp: the target GGUF (an embedded target's f32 or q4_1 file, or a path)")
    p.add_argument("--threads", type=int, default=1, help="llamacpp: CPU threads")
    add_output(p, "--out", kind="file", command="draft check", owned=_is_check_report, inputs=("draft",),
               example="check.json", help="also write the report as JSON (a previous report is replaced)")
    p.set_defaults(handler=cmd_draft_check)


__all__ = ["CheckJob", "EngineRun", "EngineReport", "ENGINES", "check_draft", "cmd_draft_check", "register",
           "acceptance_per_position", "compare_drafts", "RecordingDrafter"]
