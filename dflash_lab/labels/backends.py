"""Label generators behind one interface: `hf` (in-process transformers), `openai` (HTTP client for
OpenAI-compatible servers such as SGLang and vLLM), `vllm` (the offline vLLM engine).

Every backend decodes greedily (temperature 0) with thinking off, up to `max_new_tokens`:

    backend.check() -> dict                 preflight before any work (servers up, right model); info for meta.json
    backend.generate(jobs, emit)            calls emit(job, outcome) once per job, in completion order

The chat template is applied by ONE code path: `hf` renders `target.render_prompt(messages)`; `openai`
and `vllm` send the messages plus `target.template_kwargs()` (e.g. `{"enable_thinking": false}`), and
the engine renders them with the same template. The server must therefore serve the same template as
the target's tokenizer (the default when it loads the same model directory).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dflash_lab.errors import DFlashLabError
from dflash_lab.validate import summarize_body


@dataclass
class Job:
    """One prompt to label. `prompt_ids` is the rendered prompt's tokens (used by `hf`)."""

    id: str
    messages: list[dict]
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class Outcome:
    """What a backend produced for a job: a response, or an error (then the job goes to failed.jsonl)."""

    text: str | None = None
    finish_reason: str | None = None  # "stop" or "length"
    completion_tokens: int | None = None  # as the engine counts them (may include the stop token)
    server: str | None = None
    error: str | None = None


# -- hf ------------------------------------------------------------------------------------------
class HFBackend:
    """In-process transformers generation, batched with left padding and a KV cache.

    Prompts are sorted by length (longest first, so an out-of-memory shows up at once) and batched
    `batch_size` at a time. Batch size 1 runs without padding and is token-for-token the same as
    `greedy_generate`. With padding the attention kernels see a different shape and a masked row, so
    in low precision (bf16) or on near-ties a logit can move by a rounding error and flip an argmax;
    in fp32 the tests find no difference on tiny targets.
    """

    name = "hf"

    def __init__(self, target, max_new_tokens: int, batch_size: int = 8):
        if batch_size < 1:
            raise DFlashLabError(f"--batch-size must be >= 1, got {batch_size}")
        self.target = target
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_ids = list(target.stop_token_ids)
        tokenizer = target.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)

    def check(self) -> dict:
        return {"device": str(self.target.device), "dtype": str(self.target.dtype).replace("torch.", ""),
                "batch_size": self.batch_size}

    def _generate_batch(self, batch: list[Job]) -> list[tuple[list[int], str]]:
        import torch
        from transformers import GenerationConfig

        device = self.target.device
        width = max(len(job.prompt_ids) for job in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):  # LEFT padding: every prompt ends at the last column
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            attention[row, width - len(job.prompt_ids):] = 1
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids or None, pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            out = self.target.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
            )
        results = []
        stops = set(self.stop_ids)
        for row in out[:, width:].tolist():
            ids, reason = [], "length"
            for token in row:
                ids.append(token)
                if token in stops:
                    reason = "stop"
                    break
            results.append((ids[: self.max_new_tokens], reason))
        return results

    def generate(self, jobs: list[Job], emit) -> None:
        order = sorted(jobs, key=lambda job: len(job.prompt_ids), reverse=True)
        stops = set(self.stop_ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for job, (ids, reason) in zip(batch, self._generate_batch(batch)):
                text_ids = ids[:-1] if ids and ids[-1] in stops else ids
                emit(job, Outcome(text=self.target.decode(text_ids), finish_reason=reason,
                                  completion_tokens=len(ids)))


# -- openai ----------------------------------------------------------------------------------------
def normalize_server(url: str) -> str:
    """`http://host:port`, `http://host:port/`, `http://host:port/v1` -> `http://host:port`."""
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    if not base.startswith(("http://", "https://")):
        raise DFlashLabError(f"--server {url!r}: give a URL such as http://127.0.0.1:30000")
    return base


RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """Async client for one or many OpenAI-compatible servers (`/v1/chat/completions`).

    At most `concurrency` requests in flight per server; each attempt goes to the server with the
    most free slots (and not the one that just failed, where there is a choice), so load follows
    server speed. 5xx/429, timeouts and connection errors are retried with exponential backoff
    (`backoff * 2**k` seconds); a request is given up after `retries + 1` attempts and recorded as failed.
    """

    name = "openai"

    def __init__(self, servers: list[str], model: str, max_new_tokens: int, template_kwargs: dict | None = None,
                 concurrency: int = 16, timeout: float = 600.0, retries: int = 4, backoff: float = 0.5,
                 check_timeout: float = 10.0):
        if not servers:
            raise DFlashLabError("the openai backend needs at least one --server URL (see `dflash-lab serve-cmd`)")
        if concurrency < 1:
            raise DFlashLabError(f"--concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise DFlashLabError(f"--timeout must be > 0 seconds, got {timeout}")
        self.servers = [normalize_server(url) for url in servers]
        if len(set(self.servers)) != len(self.servers):
            raise DFlashLabError(f"--server lists a URL twice: {self.servers}")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.template_kwargs = dict(template_kwargs or {})
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.check_timeout = check_timeout
        self.in_flight = [0] * len(self.servers)
        self.done_per_server = [0] * len(self.servers)

    # preflight ----------------------------------------------------------------------------------
    def check(self) -> dict:
        asyncio.run(self._check())
        return {"servers": list(self.servers), "model": self.model, "concurrency": self.concurrency,
                "timeout": self.timeout, "retries": self.retries}

    async def _check(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.check_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for base in self.servers:
                try:
                    async with session.get(f"{base}/v1/models") as resp:
                        body = await resp.text()
                        if resp.status != 200:
                            raise DFlashLabError(
                                f"server {base}: GET /v1/models answered HTTP {resp.status} ({summarize_body(body)}); "
                                "is it an OpenAI-compatible server (SGLang, vLLM)?")
                        data = await resp.json(content_type=None)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    raise DFlashLabError(
                        f"server {base} is not reachable ({type(exc).__name__}: {exc or 'timed out'}); start it "
                        "(`dflash-lab serve-cmd` prints the command) or fix --server") from None
                except ValueError:
                    raise DFlashLabError(f"server {base}: /v1/models did not return JSON; is it an "
                                         "OpenAI-compatible server?") from None
                if not isinstance(data, dict) or not isinstance(data.get("data", []), list):
                    raise DFlashLabError(
                        f"server {base}: GET /v1/models answered a JSON {type(data).__name__}, not an object with a "
                        "`data` list of models; is --server an OpenAI-compatible server (SGLang, vLLM)?")
                names = [str(m.get("id")) for m in (data.get("data") or []) if isinstance(m, dict)]
                if self.model not in names:
                    raise DFlashLabError(
                        f"server {base} serves {names}, not {self.model!r}; pass --model with the served "
                        "name, or start the server with the right --target")

    # generation --------------------------------------------------------------------------------
    def _payload(self, job: Job) -> dict:
        payload = {"model": self.model, "messages": job.messages, "temperature": 0,
                   "max_tokens": self.max_new_tokens, "stream": False}
        if self.template_kwargs:
            payload["chat_template_kwargs"] = self.template_kwargs
        return payload

    def _pick(self, avoid: int | None) -> int:
        free = [(self.in_flight[i] / self.concurrency, i) for i in range(len(self.servers))]
        if avoid is not None and len(free) > 1:
            free = [item for item in free if item[1] != avoid]
        return min(free)[1]

    async def _one(self, session, job: Job) -> Outcome:
        import aiohttp

        payload = self._payload(job)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        error, server = "no attempt", None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            server = self._pick(server)
            base = self.servers[server]
            self.in_flight[server] += 1
            try:
                async with session.post(f"{base}/v1/chat/completions", json=payload, timeout=timeout) as resp:
                    body = await resp.text()
                    if resp.status in RETRYABLE_STATUS:
                        error = f"HTTP {resp.status} from {base}: {summarize_body(body)}"
                        continue
                    if resp.status != 200:  # a client error (bad request, context too long): retrying won't help
                        return Outcome(error=f"HTTP {resp.status} from {base}: {summarize_body(body)}", server=base)
                    return self._parse(body, base)
            except asyncio.TimeoutError:
                error = f"timed out after {self.timeout:g} s on {base}"
            except (aiohttp.ClientError, OSError) as exc:
                error = f"connection error on {base}: {type(exc).__name__}: {exc}"
            finally:
                self.in_flight[server] -= 1
        return Outcome(error=f"{error} (gave up after {self.retries + 1} attempts)", server=self.servers[server])

    @staticmethod
    def _parse(body: str, base: str) -> Outcome:
        import json

        try:
            data = json.loads(body)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            reason = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError):
            return Outcome(error=f"unexpected response from {base}: {summarize_body(body)}", server=base)
        if not isinstance(text, str):
            return Outcome(error=f"response from {base} has no text content: {summarize_body(body)}", server=base)
        if reason not in ("stop", "length"):
            return Outcome(error=f"finish_reason {reason!r} from {base}", server=base)
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Outcome(text=text, finish_reason=reason, completion_tokens=int(tokens) if tokens is not None else None,
                       server=base)

    def generate(self, jobs: list[Job], emit) -> None:
        asyncio.run(self._generate(jobs, emit))

    async def _generate(self, jobs: list[Job], emit) -> None:
        import collections

        import aiohttp

        queue = collections.deque(jobs)
        index = {base: i for i, base in enumerate(self.servers)}

        async def worker(session):
            while queue:
                job = queue.popleft()
                outcome = await self._one(session, job)
                if outcome.error is None and outcome.server in index:
                    self.done_per_server[index[outcome.server]] += 1
                emit(job, outcome)

        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [asyncio.create_task(worker(session))
                       for _ in range(min(len(jobs), self.concurrency * len(self.servers)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()

    def progress_postfix(self) -> dict:
        if len(self.servers) == 1:
            return {}
        return {f"s{i}": n for i, n in enumerate(self.done_per_server)}


# -- vllm -----------------------------------------------------------------------------------------
class VLLMBackend:
    """The offline vLLM engine in-process (`pip install 'dflash-lab[vllm]'`). Prompts go through
    `LLM.chat` with the target's chat template kwargs, in chunks so results reach disk as they finish."""

    name = "vllm"

    def __init__(self, model_path: str, max_new_tokens: int, template_kwargs: dict | None = None,
                 chunk_size: int = 512, dtype: str = "auto", **engine_kwargs):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise DFlashLabError(
                "the vllm backend needs vLLM, which is not installed: pip install 'dflash-lab[vllm]' "
                "(or use --backend hf, or --backend openai with a running server)") from None
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.template_kwargs = dict(template_kwargs or {})
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.engine_kwargs = engine_kwargs
        self._llm = None

    def check(self) -> dict:
        import vllm

        return {"vllm_version": getattr(vllm, "__version__", "?"), "model_path": self.model_path}

    def generate(self, jobs: list[Job], emit) -> None:
        from vllm import LLM, SamplingParams

        if self._llm is None:
            self._llm = LLM(model=self.model_path, dtype=self.dtype, seed=0, **self.engine_kwargs)
        params = SamplingParams(temperature=0, max_tokens=self.max_new_tokens)
        for start in range(0, len(jobs), self.chunk_size):
            chunk = jobs[start:start + self.chunk_size]
            outputs = self._llm.chat([job.messages for job in chunk], params, use_tqdm=False,
                                     chat_template_kwargs=self.template_kwargs or None)
            for job, out in zip(chunk, outputs):
                first = out.outputs[0]
                reason = first.finish_reason if first.finish_reason in ("stop", "length") else None
                if reason is None:
                    emit(job, Outcome(error=f"vllm finish_reason {first.finish_reason!r}"))
                else:
                    emit(job, Outcome(text=first.text, finish_reason=reason,
                                      completion_tokens=len(first.token_ids)))



# -- llamacpp -------------------------------------------------------------------------------------
class LlamaCppBackend:
    """llama.cpp in-process (xllamacpp): one server on a free loopback port, started by `check()`
    and stopped when `generate()` ends, so there is no URL to manage. Prompts go to `/completion` as
    the exact tokens our template rendered (`Job.prompt_ids`), so the text equals the `hf` backend's
    on the F32 GGUF target (tests/integration/test_llamacpp.py). `threads`: the server's CPU threads;
    `parallel`: requests in flight, which llama.cpp decodes together in one batch (its slots), so
    batch 16 labels about 2x faster than batch 1 here (BENCHMARKS.md, section 4). Batched and
    single decoding may differ at near-ties, as hf's batches do."""

    name = "llamacpp"

    def __init__(self, target_gguf, max_new_tokens: int, threads: int = 1, parallel: int = 1,
                 ctx_size: int = 4096):
        from dflash_lab.eval.llamacpp import require_xllamacpp

        require_xllamacpp()
        self.target_gguf = target_gguf
        self.max_new_tokens = max_new_tokens
        self.threads = threads
        self.parallel = max(1, parallel)
        self.ctx_size = ctx_size
        self._server = None

    def check(self) -> dict:
        from dflash_lab.eval.llamacpp import EngineConfig, LlamaServer

        if self._server is None:
            self._server = LlamaServer(EngineConfig(model=self.target_gguf, threads=self.threads,
                                                    parallel=self.parallel, ctx_size=self.ctx_size))
            self._server.start()
        return {"target_gguf": str(self.target_gguf), "threads": self.threads, "parallel": self.parallel}

    def _one(self, job: Job) -> Outcome:
        from dflash_lab.eval.llamacpp import post_completion

        try:
            record = post_completion(self._server.url, job.prompt_ids, self.max_new_tokens)
        except DFlashLabError as exc:
            return Outcome(error=str(exc), server=self._server.url)
        return Outcome(text=record["output_text"], finish_reason=record["finish_reason"],
                       completion_tokens=record["completion_tokens"], server=self._server.url)

    def generate(self, jobs: list[Job], emit) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.check()
        try:
            with ThreadPoolExecutor(self.parallel) as pool:
                for job, outcome in zip(jobs, pool.map(self._one, jobs)):
                    emit(job, outcome)
        finally:
            self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
