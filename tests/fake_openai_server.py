"""A small OpenAI-compatible chat server for tests and benchmarks (127.0.0.1, ephemeral port).

It speaks `/v1/models` and `/v1/chat/completions` over real HTTP (aiohttp.web in a background thread,
or its own process with `python tests/fake_openai_server.py --port P`). The answer comes from a
generator: `hf_generator(target_dir)` renders the messages with the request's `chat_template_kwargs`
and decodes greedily with the target (like SGLang or vLLM would); `echo_generator` is an instant,
deterministic fake. Faults for tests: `fail_first` (HTTP 500 for the first N requests), `hang_first`
(sleep `hang_s` before answering the first N requests), `delay_s` (every request).

`engine` makes it answer like a speculative server (issue 21: which draft does it serve?):
- "sglang": `/get_server_info` (ServerArgs flattened: model_path, speculative_algorithm,
  speculative_draft_model_path) and a `/generate` that reports 3 tokens per verify cycle;
- "vllm": `/version`, and `/server_info?config_format=json` (vllm_config.speculative_config.model)
  only with `vllm_dev_mode` (vLLM registers it only under VLLM_SERVER_DEV_MODE=1).
`draft` is the draft directory it claims to serve (None: plain decoding).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

from aiohttp import web


def echo_generator(payload: dict) -> tuple[str, str, int]:
    """Deterministic: the answer depends only on the messages and max_tokens."""
    content = payload["messages"][-1]["content"]
    digest = hashlib.sha256(repr(payload["messages"]).encode()).hexdigest()[:12]
    words = ["answer", digest] + content.split()[:6]
    limit = int(payload.get("max_tokens") or 16)
    reason = "length" if len(words) > limit else "stop"
    return " ".join(words[:limit]), reason, min(len(words), limit)


echo_generator.blocking = False  # instant: answered on the event loop, no thread hop


def hf_generator(target_dir: str):
    """Greedy answers of a local HF target, rendered as a server renders them."""
    from dflash_lab.decoding.speculative import greedy_generate
    from dflash_lab.models.target import load_target

    target = load_target(target_dir)
    lock = threading.Lock()

    def generate(payload: dict) -> tuple[str, str, int]:
        text = target.tokenizer.apply_chat_template(
            payload["messages"], tokenize=False, add_generation_prompt=True,
            **(payload.get("chat_template_kwargs") or {}))
        with lock:
            result = greedy_generate(target, target.encode(text), int(payload["max_tokens"]), target.stop_token_ids)
        ids = result.output_ids
        stops = set(target.stop_token_ids)
        body = ids[:-1] if ids and ids[-1] in stops else ids
        return target.decode(body), result.finish_reason, len(ids)

    return generate


class FakeOpenAIServer:
    def __init__(self, generate=echo_generator, models=("tiny",), *, fail_first: int = 0, hang_first: int = 0,
                 hang_s: float = 30.0, delay_s: float = 0.0, port: int = 0, engine: str | None = None,
                 draft: str | None = None, vllm_dev_mode: bool = True):
        self.generate = generate
        self.engine = engine
        self.draft = draft
        self.vllm_dev_mode = vllm_dev_mode
        self.models = list(models)
        self.fail_first = fail_first
        self.hang_first = hang_first
        self.hang_s = hang_s
        self.delay_s = delay_s
        self.port = port
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.payloads: list[dict] = []
        self._loop = None
        self._thread = None
        self._runner = None
        self._started = threading.Event()

    # handlers ----------------------------------------------------------------------------------
    async def _models(self, request):
        owner = {"owned_by": self.engine} if self.engine else {}
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "root": m, **owner}
                                                             for m in self.models]})

    async def _sglang_server_info(self, request):
        return web.json_response({"model_path": self.models[0], "speculative_algorithm": "DFLASH" if self.draft else None,
                                  "speculative_draft_model_path": self.draft, "version": "fake-sglang"})

    async def _sglang_generate(self, request):
        payload = await request.json()
        self.requests += 1
        self.payloads.append(payload)
        tokens = int(payload["sampling_params"]["max_new_tokens"])
        meta = {"completion_tokens": tokens, "finish_reason": {"type": "length", "length": tokens}}
        if self.draft:
            meta.update(spec_verify_ct=max(1, tokens // 3), spec_accept_length=3.0)
        return web.json_response({"text": f"answer {self.requests}", "meta_info": meta})

    async def _vllm_version(self, request):
        return web.json_response({"version": "fake-vllm"})

    async def _vllm_server_info(self, request):
        spec = {"method": "dflash", "model": self.draft, "num_speculative_tokens": 15} if self.draft else None
        config = {"model_config": {"model": self.models[0]}, "speculative_config": spec}
        if request.query.get("config_format") != "json":
            return web.json_response({"vllm_config": str(config)})
        return web.json_response({"vllm_config": config})

    async def _chat(self, request):
        payload = await request.json()
        self.requests += 1
        number = self.requests
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.payloads.append(payload)
            if payload.get("model") not in self.models:
                return web.json_response({"error": {"message": "model not found"}}, status=404)
            if number <= self.fail_first:
                return web.json_response({"error": {"message": "injected failure"}}, status=500)
            if number <= self.fail_first + self.hang_first:
                await asyncio.sleep(self.hang_s)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if getattr(self.generate, "blocking", True):
                loop = asyncio.get_running_loop()
                text, reason, tokens = await loop.run_in_executor(None, self.generate, payload)
            else:
                text, reason, tokens = self.generate(payload)
            return web.json_response({
                "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
                "model": payload["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
            })
        finally:
            self.in_flight -= 1

    # lifecycle ---------------------------------------------------------------------------------
    def _serve(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        if self.engine == "sglang":
            app.router.add_get("/get_server_info", self._sglang_server_info)
            app.router.add_post("/generate", self._sglang_generate)
        elif self.engine == "vllm":
            app.router.add_get("/version", self._vllm_version)
            if self.vllm_dev_mode:
                app.router.add_get("/server_info", self._vllm_server_info)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> str:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake server did not start")
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


if __name__ == "__main__":  # a standalone instant server (the benchmark runs it in its own process)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    server = FakeOpenAIServer(models=[args.model], port=args.port)
    server.start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
