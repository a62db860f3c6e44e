"""Server backends: the SGLang and vLLM parsers on bodies shaped as their docs show, and both
backends end to end against loopback fake servers (no real server, no network)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dflash_lab.errors import DFlashLabError
from dflash_lab.eval import backends, harness
from dflash_lab.eval.benchmarks import Benchmark, Sample
from dflash_lab.testing import tiny_target_dir

# SGLang native /generate answer (docs: "Sending requests" / native API; speculative fields in meta_info)
SGLANG_BODY = {
    "text": " The answer is 42.",
    "meta_info": {
        "id": "9f1c0c7e2a4d4f3f8d2b6a0e6f1d2c3b",
        "finish_reason": {"type": "stop", "matched": 151645},
        "prompt_tokens": 31,
        "completion_tokens": 40,
        "cached_tokens": 0,
        "spec_verify_ct": 8,
        "spec_accept_length": 5.0,
        "e2e_latency": 0.21,
    },
}

# vLLM /metrics (Prometheus text format; spec-decode counters of the v1 engine)
VLLM_METRICS = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="Qwen/Qwen3-4B"} 100.0
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="Qwen/Qwen3-4B"} 1500.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="Qwen/Qwen3-4B"} 250.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="Qwen/Qwen3-4B",position="0"} 80.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="Qwen/Qwen3-4B",position="1"} 60.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="Qwen/Qwen3-4B",position="2"} 50.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="Qwen/Qwen3-4B",position="3"} 60.0
"""

VLLM_COMPLETION = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "Qwen/Qwen3-4B",
    "choices": [{"index": 0, "text": " Paris.", "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
    "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3},
}


def test_parse_sglang_response():
    record = backends.parse_sglang_response(SGLANG_BODY)
    assert record["completion_tokens"] == 40 and record["spec_verify_ct"] == 8
    assert record["spec_accept_length"] == 5.0 and record["finish_reason"] == "stop"
    assert record["output_text"] == " The answer is 42."
    body = json.loads(json.dumps(SGLANG_BODY))
    del body["meta_info"]["spec_accept_length"]  # older servers: derived from the counts
    assert backends.parse_sglang_response(body)["spec_accept_length"] == 5.0
    del body["meta_info"]["spec_verify_ct"]
    with pytest.raises(DFlashLabError, match="DFLASH"):
        backends.parse_sglang_response(body)


def test_sglang_request_is_greedy():
    assert backends.sglang_request([1, 2], 2048) == {
        "input_ids": [1, 2], "sampling_params": {"temperature": 0, "max_new_tokens": 2048}}


def test_parse_prometheus_and_vllm_tau():
    counters = backends.parse_prometheus(VLLM_METRICS)
    assert counters["accepted"] == 250.0 and counters["drafts"] == 100.0
    assert counters["per_pos"] == {0: 80.0, 1: 60.0, 2: 50.0, 3: 60.0}
    assert backends.vllm_tau(counters) == pytest.approx(1 + 250 / 100)
    zero = {"accepted": 0.0, "drafts": 0.0, "per_pos": {}}
    diff = backends.diff_counters(zero, counters)
    assert diff["drafts"] == 100.0 and backends.vllm_tau(zero) is None


def test_vllm_histogram_from_positions():
    counters = {"accepted": 6.0, "drafts": 4.0, "per_pos": {0: 3.0, 1: 2.0, 2: 1.0}}
    # 4 drafts: 1 reached nothing, 1 accepted 1, 1 accepted 2, 1 accepted 3 -> lengths 1, 2, 3, 4
    assert backends.vllm_histogram(counters) == {"1": 1, "2": 1, "3": 1, "4": 1}
    hist = backends.vllm_histogram(counters)
    assert sum(int(k) * v for k, v in hist.items()) / sum(hist.values()) == pytest.approx(backends.vllm_tau(counters))


def test_parse_vllm_completion():
    record = backends.parse_vllm_completion(VLLM_COMPLETION)
    assert record["output_text"] == " Paris." and record["completion_tokens"] == 3
    with pytest.raises(DFlashLabError):
        backends.parse_vllm_completion({"error": "x"})


# -- loopback fake servers ------------------------------------------------------------------------
class FakeServer:
    """SGLang- and vLLM-shaped answers; every reply accepts 3 tokens per verify cycle."""

    def __init__(self):
        self.requests = []
        self.accepted = 0.0
        self.drafts = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload, content_type="application/json"):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/metrics":
                    self._send(f'vllm:spec_decode_num_drafts_total{{engine="0"}} {owner.drafts}\n'
                               f'vllm:spec_decode_num_accepted_tokens_total{{engine="0"}} {owner.accepted}\n',
                               "text/plain")
                elif self.path == "/v1/models":
                    self._send({"data": [{"id": "fake-model"}]})
                else:
                    self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, body))
                n = len(owner.requests)
                if self.path == "/generate":
                    self._send({"text": f"answer {n}", "meta_info": {
                        "completion_tokens": 12, "spec_verify_ct": 4, "spec_accept_length": 3.0,
                        "finish_reason": {"type": "length", "length": 12}}})
                elif self.path == "/v1/completions":
                    owner.drafts += 4
                    owner.accepted += 8
                    self._send({"choices": [{"text": f"answer {n}", "finish_reason": "length"}],
                                "usage": {"completion_tokens": 12}})
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    return harness.load_prompt_target(tiny_target_dir(tmp_path_factory.mktemp("t") / "target"), full=False)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _benchmarks():
    return [Benchmark("gsm8k", [Sample(str(i), i, (f"question {i}",)) for i in range(3)], "test"),
            Benchmark("mt-bench", [Sample("81", 0, ("turn one", "turn two"))], "test")]


def test_sglang_backend_against_fake_server(renderer, server):
    results = harness.evaluate(renderer, "prompt-lookup", _benchmarks(), max_new_tokens=12, progress=False,
                               backend="sglang", servers=[server.url], concurrency=2)
    gsm = results["benchmarks"]["gsm8k"]
    assert gsm["tau_pooled"] == pytest.approx(3.0) and gsm["tau_per_request"] == pytest.approx(3.0)
    assert gsm["cycles"] == 12 and gsm["generated_tokens"] == 36 and gsm["lossless"] is None
    assert results["lossless_check"] is False
    sent = [body for path, body in server.requests]
    assert all(b["sampling_params"] == {"temperature": 0, "max_new_tokens": 12} for b in sent)
    # the server sees exactly the rendered prompt's tokens
    first = next(b for b in sent if b["input_ids"] == renderer.encode(gsm["responses"][0]["prompt_text"]))
    assert first
    mt = results["benchmarks"]["mt-bench"]["responses"]
    assert mt[1]["turn"] == 2 and f"<|im_start|>assistant\n{mt[0]['output_text']}<|im_end|>" in mt[1]["prompt_text"]


def test_vllm_backend_against_fake_server(renderer, server):
    server.drafts, server.accepted = 50.0, 10.0  # earlier traffic must not count
    results = harness.evaluate(renderer, "prompt-lookup", _benchmarks()[:1], max_new_tokens=12, progress=False,
                               backend="vllm", servers=[server.url])
    gsm = results["benchmarks"]["gsm8k"]
    assert gsm["tau_pooled"] == pytest.approx(1 + 24 / 12)
    assert gsm["cycles"] == 12 and gsm["tau_per_request"] is None
    assert all(body["model"] == "fake-model" and body["temperature"] == 0 for _, body in server.requests)


def test_unreachable_server_is_a_user_error(renderer):
    with pytest.raises(DFlashLabError, match="not reachable"):
        harness.evaluate(renderer, "prompt-lookup", _benchmarks()[:1], max_new_tokens=4, progress=False,
                         backend="sglang", servers=["http://127.0.0.1:9"])
    with pytest.raises(DFlashLabError, match="--server"):
        harness.evaluate(renderer, "prompt-lookup", _benchmarks()[:1], max_new_tokens=4, progress=False,
                         backend="sglang", servers=[])


def test_server_requests_carry_the_sampling_settings():
    from dflash_lab.decoding.sampling import SamplingParams

    hot = SamplingParams(0.7, top_p=0.8, top_k=20, seed=3)
    assert backends.sglang_request([1, 2], 64, hot) == {
        "input_ids": [1, 2], "sampling_params": {"temperature": 0.7, "max_new_tokens": 64, "top_p": 0.8, "top_k": 20}}
    assert backends.vllm_request([1, 2], 64, "m", hot, seed=11) == {
        "prompt": [1, 2], "max_tokens": 64, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "seed": 11, "model": "m"}
    # off switches are not sent (each server has its own "off" value)
    plain = SamplingParams(1.0)
    assert backends.sglang_request([1], 8, plain)["sampling_params"] == {"temperature": 1.0, "max_new_tokens": 8}
    assert backends.vllm_request([1], 8, None, plain) == {"prompt": [1], "max_tokens": 8, "temperature": 1.0}


# -- the near-tie verdict the engines share (llama.cpp, vLLM) ------------------------------------------
def test_plain_tie_verdict_runner_up_within_tolerance_or_deeper_in_a_longer_list():
    """With the plain step's top two (fp32): numerical only when the speculative token is plain's
    runner-up within the tolerance. With a longer list (vLLM in bf16): any of plain's candidates
    within the tolerance of the first place; never when plain's own token is not the first place."""
    spec, plain = [5, 7, 9], [5, 8, 9]
    verdict, report = backends.plain_tie_verdict(spec, plain, 1, [(8, -1.0), (7, -1.04)], 0.05)
    assert verdict == "numerical" and report["greedy"]["margin"] == pytest.approx(0.04)
    assert report["speculative"] == {"token": 7, "gap": pytest.approx(0.04)}
    assert backends.plain_tie_verdict(spec, plain, 1, [(8, -1.0), (7, -1.06)], 0.05)[0] is False
    assert backends.plain_tie_verdict(spec, plain, 1, [(8, -1.0), (6, -1.01)], 0.05)[0] is False  # not in the top 2
    deeper = [(8, -1.0), (6, -1.2), (7, -1.5), (3, -3.0)]
    verdict, report = backends.plain_tie_verdict(spec, plain, 1, deeper, 1.0)
    assert verdict == "numerical" and report["speculative"]["gap"] == pytest.approx(0.5)
    assert report["greedy"]["top2_ids"] == [8, 6]  # the report keeps the top two
    assert backends.plain_tie_verdict(spec, plain, 1, deeper, 0.4)[0] is False
    assert backends.plain_tie_verdict(spec, plain, 1, [(6, -1.0), (7, -1.1), (8, -1.2)], 1.0)[0] is False
    assert backends.plain_tie_verdict([5], plain, 1, deeper, 1.0)[0] is False  # the speculative run ended
