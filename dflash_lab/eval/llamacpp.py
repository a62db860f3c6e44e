"""llama.cpp as an engine: an in-process server (xllamacpp) and the `eval --backend llamacpp` backend.

`pip install 'dflash-lab[llamacpp]'` brings `xllamacpp`, llama.cpp's own HTTP server as a Python
extension (CPU wheel, no compiler). `LlamaServer` starts it on a free loopback port:

    with LlamaServer(EngineConfig(model=target_gguf, draft=draft_gguf, speculative="dflash")) as url:
        POST {url}/completion {"prompt": [token ids], "n_predict": N, "temperature": 0}

Per response llama.cpp reports `timings.predicted_n`, `timings.draft_n` (drafted tokens) and
`timings.draft_n_accepted`. Every verify step of the target commits the accepted drafted tokens
plus one token of its own, and the first generated token comes from the prefill, so

    cycles = predicted_n - 1 - draft_n_accepted        tau = (predicted_n - 1) / cycles

which is our builtin loop's definition (sum of a + 1 over cycles / cycles); the tests check both
agree on the same draft. Prompts go as token ids (the tokens our template renders), so both
harnesses see exactly the same input.

Speculative types: `dflash` (an exported draft GGUF, `draft export`), `ngram` (llama.cpp's own
n-gram drafter, our `prompt-lookup`'s counterpart), `none` (plain greedy).
"""

from __future__ import annotations

import os

import json
import socket
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.errors import DFlashLabError

SPECULATIVE = ("dflash", "ngram", "none")
XLLAMACPP_PIN = "xllamacpp==2026.10.11549"


def require_xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise DFlashLabError(
            "llama.cpp is not installed: pip install 'dflash-lab[llamacpp]' (the xllamacpp wheel, "
            f"{XLLAMACPP_PIN}), or pass --server URL of a running llama-server") from None
    return xllamacpp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineConfig:
    """One llama.cpp server: a target GGUF, optionally a draft and a speculative type."""

    model: Path
    draft: Path | None = None
    speculative: str = "none"  # dflash | ngram | none
    draft_n_max: int = 15  # block_size - 1 for a DFlash draft (llama.cpp's default, 3, wastes it)
    threads: int = 1
    ctx_size: int = 4096
    parallel: int = 1
    alias: str | None = None  # the name /v1/models reports (label backends check it)
    port: int | None = None


def _params(cfg: EngineConfig, port: int):
    x = require_xllamacpp()
    if cfg.speculative not in SPECULATIVE:
        raise DFlashLabError(f"speculative type {cfg.speculative!r}: use one of {', '.join(SPECULATIVE)}")
    if not Path(cfg.model).is_file():
        raise DFlashLabError(f"llama.cpp target {cfg.model}: no such GGUF file")
    params = x.CommonParams()
    params.model.path = str(cfg.model)
    params.n_ctx = cfg.ctx_size * cfg.parallel
    params.n_parallel = cfg.parallel
    params.cpuparams.n_threads = cfg.threads
    params.cpuparams_batch.n_threads = cfg.threads
    params.port = port
    params.hostnames = ["127.0.0.1"]
    params.verbosity = -1  # llama.cpp logs every request at info level otherwise
    if cfg.alias:
        params.model_alias = {cfg.alias}  # a set of names in this binding (a str becomes its letters)
    spec = params.speculative
    kinds = x.common_speculative_type
    if cfg.speculative == "dflash":
        if cfg.draft is None or not Path(cfg.draft).is_file():
            raise DFlashLabError(f"llama.cpp draft {cfg.draft}: no such GGUF file; write one with "
                                 "`dflash-lab draft export DRAFT --to gguf --target TARGET --out FILE`")
        spec.types = [kinds.COMMON_SPECULATIVE_TYPE_DRAFT_DFLASH]
        spec.draft.mparams.path = str(cfg.draft)
        spec.draft.n_max = cfg.draft_n_max
        spec.draft.n_min = 0
        spec.draft.p_min = 0.0
        spec.draft.cpuparams.n_threads = cfg.threads
        spec.draft.cpuparams_batch.n_threads = cfg.threads
    elif cfg.speculative == "ngram":
        spec.types = [kinds.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
        spec.draft.n_max = cfg.draft_n_max
        spec.draft.n_min = 0
    return params


class LlamaServer:
    """llama.cpp's HTTP server in this process on a free loopback port; a context manager that
    yields its base URL and stops it on exit."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.server = None
        self.url: str | None = None

    def start(self) -> str:
        x = require_xllamacpp()
        port = self.cfg.port or free_port()
        params = _params(self.cfg, port)
        try:
            self.server = x.Server(params)
        except Exception as exc:  # the extension raises RuntimeError/ValueError on a bad file
            raise DFlashLabError(f"llama.cpp could not load {self.cfg.model}"
                                 + (f" with draft {self.cfg.draft}" if self.cfg.draft else "")
                                 + f": {exc}") from exc
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.url)
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            del server  # the destructor stops the main loop and frees the model

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise DFlashLabError(f"llama.cpp server {url} did not become healthy in {timeout:g} s ({last})")


# -- requests -------------------------------------------------------------------------------------
# llama.cpp's own sampler chain has more stages than ours, some on by default (min_p 0.05): every
# one of them is switched off, and the three we use run in our order (temperature, top-k, top-p;
# decoding/sampling.py), so the engine samples from the same processed distribution as our loop.
LLAMACPP_SAMPLERS_OFF = {"min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                         "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
                         "mirostat": 0, "top_n_sigma": -1.0}


def completion_request(prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams = GREEDY,
                       seed: int | None = None) -> dict:
    """Body of llama.cpp's `/completion`: the exact prompt tokens, the generated ids back; greedy,
    or `sampling` with `seed` (llama.cpp's speculative verify at T > 0 samples the target and keeps
    drafted tokens while they match the sample: for a one-hot proposal that is the lossless rule of
    decoding/sampling.py)."""
    body = {"prompt": list(prompt_ids), "n_predict": max_new_tokens, "return_tokens": True,
            "cache_prompt": False, "stream": False}
    if sampling.greedy:
        return {**body, "temperature": 0, "top_k": 1}
    return {**body, **LLAMACPP_SAMPLERS_OFF, "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p, "samplers": ["temperature", "top_k", "top_p"],
            **({"seed": seed} if seed is not None else {})}


def parse_completion(body: dict, server: str | None = None) -> dict:
    """One `/completion` answer -> a response record with llama.cpp's counts and the derived cycles.
    The counts are sanity-checked (non-negative, accepted <= drafted); `server` names it."""
    from dflash_lab.eval.backends import check_accepted, server_count

    timings = body.get("timings") or {}
    if "predicted_n" not in timings:
        raise DFlashLabError(f"llama.cpp answer without timings.predicted_n: {json.dumps(body)[:200]}")
    predicted = server_count(timings["predicted_n"], "timings.predicted_n", server)
    drafted = server_count(timings.get("draft_n", 0) or 0, "timings.draft_n", server)
    accepted = server_count(timings.get("draft_n_accepted", 0) or 0, "timings.draft_n_accepted", server)
    check_accepted(accepted, drafted, "drafted tokens", server)
    check_accepted(accepted, predicted, "predicted tokens", server)
    stop = body.get("stop_type")
    return {
        "output_ids": body.get("tokens"),
        "output_text": body.get("content"),
        "completion_tokens": predicted,
        "draft_n": drafted,
        "draft_n_accepted": accepted,
        "cycles": max(predicted - 1 - accepted, 0),
        "predicted_per_second": timings.get("predicted_per_second"),
        "predicted_ms": timings.get("predicted_ms"),
        "cycle_acceptance": None,  # llama.cpp reports counts, not per-cycle lengths
        "finish_reason": "length" if stop == "limit" else "stop" if stop in ("eos", "word") else stop,
    }


def llamacpp_tau(records: list[dict]) -> tuple[float | None, float | None]:
    """(pooled, per-request mean) tau from the records' counts (see the module docstring)."""
    committed = [max(r["completion_tokens"] - 1, 0) for r in records]
    cycles = [r["cycles"] for r in records]
    pooled = sum(committed) / sum(cycles) if sum(cycles) else None
    per = [c / n for c, n in zip(committed, cycles) if n]
    return pooled, (sum(per) / len(per) if per else None)


def post_completion(url: str, prompt_ids: list[int], max_new_tokens: int, timeout: float = 1800.0,
                    sampling: SamplingParams = GREEDY, seed: int | None = None) -> dict:
    from dflash_lab.eval.backends import _post_json

    record = parse_completion(_post_json(url.rstrip("/") + "/completion",
                                         completion_request(prompt_ids, max_new_tokens, sampling, seed), timeout),
                              url)
    if not sampling.greedy:
        record["seed"] = seed
    return record


# -- the evaluation backend -----------------------------------------------------------------------
def request_seed(sampling: SamplingParams, prompt_ids: list[int]) -> int | None:
    """A sampled request's seed: the eval's seed mixed with the prompt, so a response's draw does not
    depend on which server or thread sent it (None: the engine picks one)."""
    if sampling.greedy or sampling.seed is None:
        return None
    return (sampling.seed + zlib.crc32(json.dumps(list(prompt_ids)).encode())) % (1 << 31)


def run_llamacpp(target, benchmark, max_new_tokens: int, servers: list[str], *, concurrency: int = 1,
                 progress: bool = True, sampling: SamplingParams = GREEDY) -> list[dict]:
    """Every response of `benchmark` from running llama.cpp servers (the exact prompt tokens;
    greedy, or `sampling` with a per-prompt seed)."""
    from dflash_lab.eval.backends import _run_servers

    def make_send(server):
        def send(prompt_text, prompt_ids):
            return post_completion(server, prompt_ids, max_new_tokens, sampling=sampling,
                                   seed=request_seed(sampling, prompt_ids))
        return send

    return _run_servers(benchmark, target, servers, concurrency, progress, make_send)


# llama.cpp verifies a drafted block in one batched forward but decodes plain greedy one token at a
# time, and its CPU kernels sum in a different order for the two: where the target's two best tokens
# are almost tied the runs can part ways with nothing wrong (measured: a DFlash2 draft on mbpp 468, F32
# GGUF, ' max' vs ' if' 0.0032 logits apart in llama.cpp, 0.0014 in our fp32 HF target). A mismatch is
# `numerical` when the speculative run's token is the plain run's runner-up within this many logits.
LLAMACPP_TIE_TOLERANCE = 0.05


def attach_lossless(records: list[dict], plain: list[dict], recheck=None) -> None:
    """Compare each response with the same engine's plain greedy response (no drafter). A mismatch
    goes to `recheck(record) -> (verdict, report)` when given (`classify_mismatch` on the plain
    server), else it is a failure."""
    for record, ref in zip(records, plain):
        same = record.get("prompt_text") == ref.get("prompt_text") and (
            record.get("output_ids") == ref.get("output_ids") if record.get("output_ids") is not None
            else record.get("output_text") == ref.get("output_text"))
        record["lossless"] = same
        if not same and recheck is not None and record.get("output_ids") is not None:
            record["lossless"], report = recheck(record)
            if report is not None:
                record["lossless_mismatch"] = report
        record["greedy_wall_s"] = ref["wall_s"]
        record["greedy_predicted_per_second"] = ref.get("predicted_per_second")


def classify_mismatch(url: str, target, record: dict, tolerance: float = LLAMACPP_TIE_TOLERANCE):
    """(True | "numerical" | False, report or None) for a speculative response that differs from the
    plain run: decode its own prompt again on the plain server, greedy, with the top-2 log-probs of
    every step (a later turn's prompt holds the earlier answers, so after a tie the plain run's
    prompt may differ: the reference must be this prompt's). At the first differing token the report
    has both tokens and the plain step's top two with their margin (log-prob difference = logit
    difference)."""
    from dflash_lab.eval.backends import _post_json, first_difference, plain_tie_verdict

    prompt_ids = target.encode(record["prompt_text"])
    spec_ids = list(record["output_ids"])
    body = {**completion_request(prompt_ids, max(len(spec_ids), 1)), "n_probs": 2}
    plain = _post_json(url.rstrip("/") + "/completion", body, 1800.0)
    plain_ids = list(plain.get("tokens") or [])
    index = first_difference(spec_ids, plain_ids)
    if index is None:
        return True, None
    steps = plain.get("completion_probabilities") or []
    top = (steps[index].get("top_logprobs") or []) if index < len(steps) else []
    # another llama.cpp build's format (no ids or log-probs) leaves top2 short: a failure, with the report
    top2 = [(int(t["id"]), float(t["logprob"])) for t in top[:2] if "id" in t and "logprob" in t]
    return plain_tie_verdict(spec_ids, plain_ids, index, top2, tolerance)


def target_gguf_for(spec, kind: str = "f32") -> Path:
    """The GGUF llama.cpp loads for a target spec: a .gguf path, or an embedded name's file."""
    from dflash_lab.models import embedded

    if str(spec) in embedded.EMBEDDED_TARGETS:
        return embedded.gguf_path(str(spec), kind)
    path = Path(str(spec)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise DFlashLabError(f"target {spec}: llama.cpp needs a GGUF file; pass --target FILE.gguf or an embedded name")


def export_for_serving(draft_dir, target_gguf: Path, out_dir: Path) -> Path:
    """The draft as a GGUF beside the eval results (exported once per draft sha)."""
    from dflash_lab.models.checkpoint import checkpoint_sha256
    from dflash_lab.models.gguf_export import export_draft_gguf

    out = Path(out_dir) / f"draft-{checkpoint_sha256(draft_dir)[:12]}.f32.gguf"
    if not out.is_file():
        export_draft_gguf(draft_dir, target_gguf, out)
    return out


def evaluate_in_process(target, target_gguf: Path, desc: dict, benchmark, max_new_tokens: int, *,
                        draft_gguf: Path | None, lossless_check: bool = True, progress: bool = True,
                        threads: int = 1, sampling: SamplingParams = GREEDY) -> list[dict]:
    """Start a llama.cpp server with the drafter, run the benchmark, stop it; with `lossless_check`,
    run the same prompts on a plain server (no drafter) and compare the tokens (a mismatch at a near-tie
    of llama.cpp's own two best tokens is `numerical`, see `classify_mismatch`). Tokens/s with and
    without the drafter come from the same engine in the same run."""
    kind = {"dflash": "dflash", "prompt-lookup": "ngram", "none": "none"}[desc["drafter"]]
    n_max = max(int(desc.get("block_size") or 16) - 1, 1)
    cfg = EngineConfig(model=Path(target_gguf), draft=draft_gguf, speculative=kind, draft_n_max=n_max,
                       threads=threads, ctx_size=_ctx_for(benchmark, target, max_new_tokens))
    with LlamaServer(cfg) as url:
        records = run_llamacpp(target, benchmark, max_new_tokens, [url], progress=progress, sampling=sampling)
    if lossless_check:
        plain_cfg = EngineConfig(model=Path(target_gguf), threads=threads, ctx_size=cfg.ctx_size)
        with LlamaServer(plain_cfg) as url:
            plain = run_llamacpp(target, benchmark, max_new_tokens, [url], progress=progress)
            attach_lossless(records, plain, recheck=lambda record: classify_mismatch(url, target, record))
    return records


def _ctx_for(benchmark, target, max_new_tokens: int) -> int:
    longest = max((len(target.encode(target.render_prompt([{"role": "user", "content": t}])))
                   for s in benchmark.samples for t in s.turns), default=0)
    turns = max((len(s.turns) for s in benchmark.samples), default=1)
    need = turns * (longest + max_new_tokens) + 64
    return int(min(max(need, 512), 32768))


def summarise_llamacpp(records: list[dict]) -> dict:
    """The llamacpp rows of a benchmark's results (harness.summarise calls this)."""
    pooled, per_request = llamacpp_tau(records)
    drafted = sum(r.get("draft_n", 0) for r in records)
    accepted = sum(r.get("draft_n_accepted", 0) for r in records)
    out = {"tau_pooled": pooled, "tau_per_request": per_request, "cycles": sum(r["cycles"] for r in records),
           "acceptance_histogram": None,
           "counters": {"draft_n": drafted, "draft_n_accepted": accepted,
                        "accepted_fraction": accepted / drafted if drafted else None}}
    generated = sum(r["completion_tokens"] for r in records)
    engine_ms = sum(r.get("predicted_ms") or 0.0 for r in records)
    out["engine_tokens_per_s"] = generated / (engine_ms / 1000) if engine_ms > 0 else None
    return out


# -- a server process: python -m dflash_lab.eval.llamacpp --model T.gguf [--draft D.gguf] --port P ----
def main(argv: list[str] | None = None) -> int:
    """Serve until killed (what `serve-cmd --engine llamacpp` prints when llama-server is absent)."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m dflash_lab.eval.llamacpp",
                                description="llama.cpp's HTTP server in-process (xllamacpp), on 127.0.0.1")
    p.add_argument("--model", required=True, help="target GGUF")
    p.add_argument("--draft", help="DFlash draft GGUF (`dflash-lab draft export`)")
    p.add_argument("--spec-type", choices=SPECULATIVE, default=None, help="default: dflash with --draft, else none")
    p.add_argument("--spec-draft-n-max", type=int, default=15)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--alias", help="the model name /v1/models reports")
    args = p.parse_args(argv)
    kind = args.spec_type or ("dflash" if args.draft else "none")
    cfg = EngineConfig(model=Path(args.model), draft=Path(args.draft) if args.draft else None, speculative=kind,
                       draft_n_max=args.spec_draft_n_max, threads=args.threads, parallel=args.parallel,
                       ctx_size=args.ctx_size, alias=args.alias, port=args.port)
    server = LlamaServer(cfg)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print(server.start(), flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    # llama.cpp's stop waits for in-flight requests to drain, and clients that retry keep it busy:
    # a server told to stop exits now (its clients see the connection close, as with a crash)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
