"""Where the responses of a benchmark come from.

- `builtin`: our own lossless verify loop (`speculative_generate`) on this machine; every response
  can be checked against plain greedy decoding (the lossless check), which also gives the
  target-only throughput on the same prompts for free.
- `sglang`: already running SGLang servers in DFLASH mode, native `/generate` endpoint; tau comes
  from each response's `meta_info` (`completion_tokens`, `spec_verify_ct`, `spec_accept_length`).
- `vllm`: already running vLLM servers, `/v1/completions`; tau comes from the Prometheus spec-decode
  counters on `/metrics`, diffed before/after the benchmark (vLLM has no per-request count).

Each backend returns one record per response (a sample's turn). mt-bench turns run in order inside
a sample: turn 2 is rendered after turn 1's generated answer, appended as the assistant message.
Server responses are parsed by the pure functions `parse_sglang_response`,
`parse_prometheus` and `parse_vllm_completion`, tested on bodies shaped as the servers document.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle as round_robin

from tqdm import tqdm

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.errors import DFlashLabError

BACKENDS = ("builtin", "sglang", "vllm", "llamacpp")  # llamacpp: see eval/llamacpp.py


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="resp", disable=not progress, dynamic_ncols=True)


# -- builtin --------------------------------------------------------------------------------------
# Plain greedy output depends only on (target, prompt, max_new_tokens, stops): evaluating several
# drafters on the same prompts in one process (eval-run, the demo) decodes each reference once.
# The cache lives on the model object, so it dies with it.
_GREEDY_CACHE_MAX = 4096


def _greedy_reference(target, prompt_ids, max_new_tokens, stop_ids, greedy_generate):
    cache = target.model.__dict__.setdefault("_dflash_lab_greedy_cache", {})
    key = (tuple(prompt_ids), max_new_tokens, tuple(stop_ids))
    if key not in cache:
        if len(cache) >= _GREEDY_CACHE_MAX:
            cache.pop(next(iter(cache)))
        cache[key] = greedy_generate(target, prompt_ids, max_new_tokens, stop_ids)
    return cache[key]


# -- the lossless check: exact in fp32, numerical ties told apart in bf16/fp16 -----------------------
# In half precision a 16-token verify forward and a 1-token greedy step round differently, so where
# the target's top two tokens are almost tied the two runs may pick different ones. A mismatch is
# `numerical` when, at the first differing token, the target's top-2 logit margin is at most this
# tolerance (in logits) in BOTH runs; anything else is a failure. fp32 keeps the exact check.
NUMERICAL_TIE_TOLERANCE = {"bfloat16": 1.0, "float16": 0.25, "float32": 0.0}


def tie_tolerance(dtype) -> float:
    return NUMERICAL_TIE_TOLERANCE.get(str(dtype).removeprefix("torch."), 0.0)


class LogitRecorder:
    """A target stand-in for the verify loop: forwards to the target and keeps, per absolute
    position, the top-2 token ids and logits of the last forward that computed that position's
    logits (the ones that decided the token after it)."""

    def __init__(self, target):
        self._target = target
        self.top2: dict[int, tuple[list[int], list[float]]] = {}

    def __getattr__(self, name):
        return getattr(self._target, name)

    def forward(self, input_ids, layer_ids=None, *, position_ids=None, logits_to_keep: int = 0, **kwargs):
        logits, features = self._target.forward(input_ids, layer_ids, position_ids=position_ids,
                                                logits_to_keep=logits_to_keep, **kwargs)
        kept = logits.shape[1]
        if position_ids is not None:
            positions = position_ids[0, -kept:].tolist()
        else:
            positions = list(range(input_ids.shape[1] - kept, input_ids.shape[1]))
        values, ids = logits[0].float().topk(2, dim=-1)
        for pos, i, v in zip(positions, ids.tolist(), values.tolist()):
            self.top2[pos] = (i, v)
        return logits, features


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a shorter output differs where it ends), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def plain_tie_verdict(spec_ids: list[int], plain_ids: list[int], index: int, top2: list[tuple[int, float]],
                      tolerance: float):
    """("numerical" | False, report) at the first differing token `index` of a speculative run and
    a plain run of the same engine, given the plain step's best (token id, log-prob), best first: a
    near-tie when the plain token is the first place and the speculative token is within `tolerance`
    of it (log-prob difference = logit difference). With the top two (fp32) that is "the plain run's
    runner-up"; an engine in bf16 passes more (its rounding reorders several close tokens). Shared by
    the engines that recheck a mismatch on their own plain server."""
    margin = top2[0][1] - top2[1][1] if len(top2) >= 2 else None
    spec_token = spec_ids[index] if index < len(spec_ids) else None
    plain_token = plain_ids[index] if index < len(plain_ids) else None
    spec_lp = next((lp for t, lp in top2[1:] if t == spec_token), None) if spec_token is not None else None
    gap = top2[0][1] - spec_lp if spec_lp is not None else None
    tie = gap is not None and gap <= tolerance and top2[0][0] == plain_token
    report = {"index": index, "kind": "numerical" if tie else "failure", "tolerance": tolerance,
              "speculative": {"token": spec_token, "gap": None if gap is None else round(gap, 5)},
              "greedy": {"token": plain_token, "top2_ids": [t for t, _ in top2[:2]],
                         "top2_logprobs": [round(lp, 5) for _, lp in top2[:2]],
                         "margin": None if margin is None else round(margin, 5)}}
    return ("numerical" if tie else False), report


def _side(recorder: LogitRecorder, position: int, token: int | None) -> dict:
    ids, values = recorder.top2.get(position, ([], []))
    margin = values[0] - values[1] if len(values) == 2 else None
    return {"token": token, "top2_ids": ids, "top2_logits": [round(v, 4) for v in values],
            "margin": None if margin is None else round(margin, 4)}


def classify_mismatch(index: int, num_prompt: int, spec_ids: list[int], ref_ids: list[int],
                      spec_rec: LogitRecorder, ref_rec: LogitRecorder, tolerance: float) -> dict:
    """The report of the first differing token: both runs' top-2 margins at the position that
    decided it, and `kind` = "numerical" (both margins <= tolerance, tolerance > 0) or "failure"."""
    position = num_prompt + index - 1  # the logits at this position chose the token at index
    spec = _side(spec_rec, position, spec_ids[index] if index < len(spec_ids) else None)
    ref = _side(ref_rec, position, ref_ids[index] if index < len(ref_ids) else None)
    tie = (tolerance > 0 and spec["margin"] is not None and ref["margin"] is not None
           and spec["margin"] <= tolerance and ref["margin"] <= tolerance)
    return {"index": index, "position": position, "kind": "numerical" if tie else "failure",
            "tolerance": tolerance, "speculative": spec, "greedy": ref}


def lossless_verdict(target, prompt_ids, max_new_tokens, stop_ids, result, spec_rec, reference,
                     greedy_generate, tolerance: float) -> tuple[object, dict | None]:
    """(True | "numerical" | False, mismatch report or None). On a mismatch the greedy reference
    is decoded again up to the differing token with its logits recorded (mismatches are rare, so
    the reference cache keeps no logits)."""
    index = first_difference(result.output_ids, reference.output_ids)
    if index is None:
        return True, None
    ref_rec = LogitRecorder(target)
    greedy_generate(ref_rec, prompt_ids, index + 1, stop_ids)
    report = classify_mismatch(index, len(prompt_ids), result.output_ids, reference.output_ids, spec_rec, ref_rec,
                               tolerance)
    return ("numerical" if report["kind"] == "numerical" else False), report
def response_seed(sampling: SamplingParams, index: int) -> int | None:
    """The seed of the index-th response of a benchmark: `seed + index`, so each response is
    reproducible on its own (None: fresh random seeds)."""
    return None if sampling.seed is None else sampling.seed + index


def run_builtin(target, drafter, benchmark, max_new_tokens: int, *, lossless_check: bool = True,
                progress: bool = True, sampling: SamplingParams = GREEDY) -> list[dict]:
    """Generate every response of `benchmark` with the core verify loop; with `lossless_check`,
    also decode greedily and compare the tokens: exactly in fp32; in bf16/fp16 a mismatch at a
    near-tie of the target's top two logits is `numerical`, not a failure (see above). With
    `sampling` at T > 0 each response samples with seed `response_seed(sampling, i)` (recorded as
    `seed`) and there is no token-level check (the output is equal in distribution, not in tokens)."""
    from dataclasses import replace

    from dflash_lab.decoding.speculative import greedy_generate, speculative_generate

    stop_ids = target.stop_token_ids
    tolerance = tie_tolerance(target.dtype)
    records: list[dict] = []
    total = sum(len(s.turns) for s in benchmark.samples)
    pooled = [0, 0]
    with _bar(total, f"eval {benchmark.name}", progress) as bar:
        for sample in benchmark.samples:
            messages: list[dict] = []
            for turn, user_text in enumerate(sample.turns, start=1):
                messages.append({"role": "user", "content": user_text})
                prompt_text = target.render_prompt(messages)
                prompt_ids = target.encode(prompt_text)
                spec_rec = LogitRecorder(target) if (lossless_check and sampling.greedy) else target
                response_sampling = sampling if sampling.greedy else replace(
                    sampling, seed=response_seed(sampling, len(records)))
                result = speculative_generate(spec_rec, drafter, prompt_ids, max_new_tokens, stop_ids,
                                              sampling=response_sampling)
                record = {
                    "id": sample.id,
                    "turn": turn,
                    "prompt_text": prompt_text,
                    "num_prompt_tokens": result.num_prompt_tokens,
                    "output_ids": result.output_ids,
                    "cycle_acceptance": result.cycle_acceptance,
                    "finish_reason": result.finish_reason,
                    "wall_s": result.wall_s,
                    "lossless": None,
                }
                if not sampling.greedy:
                    record["seed"] = result.extra["sampling"]["seed"]
                if lossless_check and sampling.greedy:
                    reference = _greedy_reference(target, prompt_ids, max_new_tokens, stop_ids, greedy_generate)
                    verdict, mismatch = lossless_verdict(target, prompt_ids, max_new_tokens, stop_ids, result, spec_rec,
                                                         reference, greedy_generate, tolerance)
                    record["lossless"] = verdict
                    if mismatch is not None:
                        record["lossless_mismatch"] = mismatch
                    record["greedy_wall_s"] = reference.wall_s
                records.append(record)
                # the next turn sees this turn's generated answer (special tokens dropped, as a
                # server's detokenizer does)
                messages.append({"role": "assistant", "content": target.decode(result.output_ids)})
                pooled[0] += sum(result.cycle_acceptance)
                pooled[1] += len(result.cycle_acceptance)
                bar.update(1)
                bar.set_postfix(tau=f"{pooled[0] / max(pooled[1], 1):.2f}")
    return records


# -- HTTP -----------------------------------------------------------------------------------------
def _http(method: str, url: str, body: dict | None = None, timeout: float = 600.0) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        from dflash_lab.validate import summarize_body

        detail = summarize_body(exc.read())
        raise DFlashLabError(f"server {url} answered HTTP {exc.code}: {detail}; is --server the right kind of "
                             "server (SGLang, vLLM, llama.cpp) for --backend?") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DFlashLabError(
            f"server {url} is not reachable ({exc}); start it first and pass its address with --server"
        ) from exc


def server_count(value, name: str, server: str | None) -> int:
    """A count a server reported, as a non-negative int; anything else fails naming the server: a
    wrong count would otherwise become a wrong tau (or `tau -`) with exit 0."""
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        count = int(value)
    if count is None or count < 0:
        raise DFlashLabError(f"server {server or '(unnamed)'} reported {name} = {value!r}: not a count (>= 0); "
                             "it is not a server build this program reads correctly: check its version")
    return count


def check_accepted(accepted: int, drafted: int, what: str, server: str | None) -> None:
    if accepted > drafted:
        raise DFlashLabError(f"server {server or '(unnamed)'} reported {accepted} accepted of {drafted} {what}: "
                             "a server cannot accept more than it drafted; its numbers cannot give a tau: check "
                             "its version (and that nothing else talks to it)")


def _post_json(url: str, body: dict, timeout: float = 600.0) -> dict:
    raw = _http("POST", url, body, timeout)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        from dflash_lab.validate import summarize_body

        raise DFlashLabError(f"server {url}: the answer is not JSON ({summarize_body(raw)}); is --server the right "
                             "kind of server (SGLang, vLLM, llama.cpp) for --backend?") from exc


def _run_sample_turns(sample, target, send) -> list[dict]:
    """Turns of one sample in order; `send(prompt_text, prompt_ids) -> record` talks to a server."""
    messages: list[dict] = []
    records = []
    for turn, user_text in enumerate(sample.turns, start=1):
        messages.append({"role": "user", "content": user_text})
        prompt_text = target.render_prompt(messages)
        prompt_ids = target.encode(prompt_text)
        started = time.perf_counter()
        record = send(prompt_text, prompt_ids)
        record.update(id=sample.id, turn=turn, prompt_text=prompt_text, num_prompt_tokens=len(prompt_ids),
                      wall_s=time.perf_counter() - started, lossless=None)
        records.append(record)
        messages.append({"role": "assistant", "content": record.get("output_text") or ""})
    return records


def _run_servers(benchmark, target, servers: list[str], concurrency: int, progress: bool, make_send) -> list[dict]:
    if not servers:
        raise DFlashLabError("this backend drives running servers: pass --server URL (one or more)")
    concurrency = max(1, concurrency)
    assignments = list(zip(benchmark.samples, round_robin(servers)))
    results: list[list[dict]] = [None] * len(assignments)  # type: ignore[list-item]
    total = sum(len(s.turns) for s in benchmark.samples)
    with _bar(total, f"eval {benchmark.name}", progress) as bar, ThreadPoolExecutor(concurrency) as pool:
        def job(i):
            sample, server = assignments[i]
            results[i] = _run_sample_turns(sample, target, make_send(server.rstrip("/")))
            bar.update(len(sample.turns))

        list(pool.map(job, range(len(assignments))))
    return [record for sample_records in results for record in sample_records]


# -- sglang ---------------------------------------------------------------------------------------
def sglang_request(prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams = GREEDY) -> dict:
    """Body of SGLang's native `/generate`: exactly the tokens the builtin backend sees; greedy, or
    the sampling settings (top_k / top_p only when on: SGLang's own "off" values differ from
    ours). No seed: SGLang versions differ on a per-request seed key."""
    params = {"temperature": sampling.temperature, "max_new_tokens": max_new_tokens}
    if not sampling.greedy:
        if sampling.top_p < 1:
            params["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            params["top_k"] = sampling.top_k
    return {"input_ids": prompt_ids, "sampling_params": params}


def parse_sglang_response(body: dict, server: str | None = None) -> dict:
    """One `/generate` answer -> a response record. SGLang's `meta_info.completion_tokens` counts
    the prefill's token too, so `spec_accept_length = completion_tokens / spec_verify_ct` (ceiling
    B + 1, SPEC section 6). Counts are sanity-checked (`server` names it in the message)."""
    if isinstance(body, list):  # batched answers are lists; we send one prompt per request
        body = body[0]
    meta = body.get("meta_info") or {}
    if "completion_tokens" not in meta:
        raise DFlashLabError(f"SGLang answer without meta_info.completion_tokens: {json.dumps(body)[:200]}")
    completion = server_count(meta["completion_tokens"], "meta_info.completion_tokens", server)
    verify = meta.get("spec_verify_ct")
    if verify is None:
        raise DFlashLabError(
            "SGLang answer has no meta_info.spec_verify_ct: the server does not run speculative decoding; "
            "start it with --speculative-algorithm DFLASH --speculative-draft-model-path DIR"
        )
    verify = server_count(verify, "meta_info.spec_verify_ct", server)
    check_accepted(verify, completion, "completion tokens as verify steps (each step commits one or more)", server)
    accept = meta.get("spec_accept_length")
    if accept is None:
        accept = completion / verify if verify else None
    finish = meta.get("finish_reason")
    return {
        "output_ids": body.get("output_ids"),
        "output_text": body.get("text"),
        "completion_tokens": completion,
        "spec_verify_ct": verify,
        "spec_accept_length": float(accept) if accept is not None else None,
        "cycle_acceptance": None,  # SGLang reports counts, not per-cycle lengths
        "finish_reason": finish.get("type") if isinstance(finish, dict) else finish,
    }


def run_sglang(target, benchmark, max_new_tokens: int, servers: list[str], *, concurrency: int = 1,
               progress: bool = True, sampling: SamplingParams = GREEDY) -> list[dict]:
    def make_send(server):
        def send(prompt_text, prompt_ids):
            body = sglang_request(prompt_ids, max_new_tokens, sampling)
            return parse_sglang_response(_post_json(server + "/generate", body), server)
        return send

    return _run_servers(benchmark, target, servers, concurrency, progress, make_send)


# -- vllm -----------------------------------------------------------------------------------------
VLLM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
VLLM_DRAFTS = "vllm:spec_decode_num_drafts_total"
VLLM_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict:
    """The spec-decode counters of a `/metrics` page, summed over label sets (engines, models):
    `{"accepted": float, "drafts": float, "per_pos": {position: float}}`."""
    totals = {"accepted": 0.0, "drafts": 0.0, "per_pos": {}}
    for line in text.splitlines():
        match = _PROM_LINE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == VLLM_ACCEPTED:
            totals["accepted"] += value
        elif name == VLLM_DRAFTS:
            totals["drafts"] += value
        elif name == VLLM_PER_POS:
            position = int(dict(_PROM_LABEL.findall(labels)).get("position", -1))
            totals["per_pos"][position] = totals["per_pos"].get(position, 0.0) + value
    return totals


def diff_counters(before: dict, after: dict) -> dict:
    positions = set(before["per_pos"]) | set(after["per_pos"])
    return {
        "accepted": after["accepted"] - before["accepted"],
        "drafts": after["drafts"] - before["drafts"],
        "per_pos": {p: after["per_pos"].get(p, 0.0) - before["per_pos"].get(p, 0.0) for p in sorted(positions)},
    }


def check_vllm_counters(counters: dict, servers: list[str]) -> None:
    """The counter differences over a benchmark: never negative (a restarted server starts again at
    0), and no position accepted more often than there were drafts."""
    names = ", ".join(servers)
    values = {"accepted": counters["accepted"], "drafts": counters["drafts"],
              **{f"accepted at position {k}": v for k, v in counters["per_pos"].items()}}
    for name, value in values.items():
        if value < 0:
            raise DFlashLabError(f"vLLM server {names}: the {name} counter went down by {-value:g} during the "
                                 "benchmark (restarted?); rerun with servers that stay up")
    for k, v in counters["per_pos"].items():
        check_accepted(int(v), int(counters["drafts"]), f"drafts at position {k}", names)


def vllm_tau(counters: dict) -> float | None:
    """SPEC section 6: 1 + num_accepted_tokens / num_drafts."""
    return 1.0 + counters["accepted"] / counters["drafts"] if counters["drafts"] > 0 else None


def vllm_histogram(counters: dict) -> dict[str, int] | None:
    """Acceptance lengths from the per-position counters. per_pos[k] counts the drafts whose
    position k was accepted, i.e. with a >= k + 1; so count(a = j) = reach[j] - reach[j + 1] with
    reach[0] = drafts and reach[k + 1] = per_pos[k]. Keys are a + 1."""
    per_pos = counters["per_pos"]
    if not per_pos or counters["drafts"] <= 0:
        return None
    reach = [counters["drafts"]] + [per_pos.get(k, 0.0) for k in range(max(per_pos) + 1)] + [0.0]
    return {str(j + 1): int(round(reach[j] - reach[j + 1])) for j in range(len(reach) - 1)}


def vllm_request(prompt_ids: list[int], max_new_tokens: int, model: str | None,
                 sampling: SamplingParams = GREEDY, seed: int | None = None) -> dict:
    """Body of vLLM's `/v1/completions`: greedy, or the sampling settings and a per-request seed."""
    body = {"prompt": prompt_ids, "max_tokens": max_new_tokens, "temperature": sampling.temperature}
    if not sampling.greedy:
        if sampling.top_p < 1:
            body["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if seed is not None:
            body["seed"] = seed
    if model:
        body["model"] = model
    return body


def parse_vllm_completion(body: dict) -> dict:
    """One `/v1/completions` answer -> a response record (no per-request acceptance in vLLM)."""
    try:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
    except (KeyError, IndexError, TypeError) as exc:
        raise DFlashLabError(f"vLLM answer without choices[0]: {json.dumps(body)[:200]}") from exc
    return {
        "output_ids": choice.get("token_ids"),
        "output_text": choice.get("text"),
        "completion_tokens": int(usage.get("completion_tokens", 0)),
        "cycle_acceptance": None,
        "finish_reason": choice.get("finish_reason"),
    }


def _vllm_model(server: str) -> str | None:
    try:
        models = json.loads(_http("GET", server + "/v1/models", timeout=30)).get("data") or []
    except (DFlashLabError, json.JSONDecodeError):
        return None
    return models[0].get("id") if models else None


def read_vllm_counters(servers: list[str]) -> dict:
    total = {"accepted": 0.0, "drafts": 0.0, "per_pos": {}}
    for server in servers:
        one = parse_prometheus(_http("GET", server.rstrip("/") + "/metrics", timeout=30).decode())
        total["accepted"] += one["accepted"]
        total["drafts"] += one["drafts"]
        for k, v in one["per_pos"].items():
            total["per_pos"][k] = total["per_pos"].get(k, 0.0) + v
    return total


def run_vllm(target, benchmark, max_new_tokens: int, servers: list[str], *, concurrency: int = 1,
             progress: bool = True, sampling: SamplingParams = GREEDY) -> tuple[list[dict], dict]:
    """Returns the records and the counter difference over the benchmark (the servers must not
    serve anyone else meanwhile, or their requests count too)."""
    if not servers:
        raise DFlashLabError("the vllm backend drives running servers: pass --server URL (one or more)")
    models = {s.rstrip("/"): _vllm_model(s.rstrip("/")) for s in servers}
    before = read_vllm_counters(servers)

    def make_send(server):
        def send(prompt_text, prompt_ids):
            # a stable per-prompt seed (responses run concurrently, so no running index)
            seed = None if sampling.seed is None else sampling.seed + zlib.crc32(json.dumps(prompt_ids).encode())
            body = vllm_request(prompt_ids, max_new_tokens, models.get(server), sampling, seed)
            return parse_vllm_completion(_post_json(server + "/v1/completions", body))
        return send

    records = _run_servers(benchmark, target, servers, concurrency, progress, make_send)
    counters = diff_counters(before, read_vllm_counters(servers))
    check_vllm_counters(counters, servers)
    if counters["drafts"] <= 0:
        raise DFlashLabError(
            f"vLLM servers {', '.join(servers)} counted no speculative drafts; start them with "
            "--speculative-config '{\"method\": \"dflash\", ...}'"
        )
    return records, counters
