"""Against a real vLLM (issue 21 items 1, 4 and 5), when its engine environment exists
(`~/.cache/dflash-lab/engines/vllm`, or $DFLASH_LAB_HOME/engines/vllm: the managed environment the
vLLM install route creates; vLLM cannot live in the project's own venv on a CPU machine).

One server per module: the embedded target (fetched by us: the usual tied HF layout, without which
vLLM prints token 0) with a DFlash draft and VLLM_SERVER_DEV_MODE=1, on loopback.
- `label --backend openai` against it, and the in-process `label --backend vllm` run by the engine's
  Python, give the `hf` backend's labels (fp32, greedy; a speculative server is lossless);
- `eval`'s server check reads the draft from vLLM's /server_info and verifies it; another draft is
  refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dflash_lab.cli import main
from dflash_lab.labels.runner import iter_records
from dflash_lab.models.embedded import fetch
from dflash_lab.testing import vllm_engine_or_skip, write_jsonl

REPO = Path(__file__).resolve().parents[2]
TARGET = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.",
           "Write a haiku about the sea.", "How many legs does a spider have?"]
MAX_NEW = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def engine() -> Path:
    """vLLM's python (the managed environment or $DFLASH_LAB_VLLM_PYTHON), or every test skips."""
    return vllm_engine_or_skip()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine_env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """"served" is a training checkpoint directory as the trainer writes it (`save_checkpoint`: the
    weights, trainer_state.json and the optimizer/RNG state), handed to vLLM as it is (issue 21 item
    2: vLLM loads every top-level *.safetensors of a draft directory)."""
    import torch

    from dflash_lab.models.checkpoint import load_draft
    from dflash_lab.models.target import load_target
    from dflash_lab.train.checkpointer import save_checkpoint
    from dflash_lab.train.state import TRAINING_STATE_DIR

    root = tmp_path_factory.mktemp("vllm-drafts")
    for name, seed in (("init", 0), ("other", 1)):
        assert main(["draft", "init", "--target", TARGET, "--num-layers", "1", "--seed", str(seed),
                     "--out", str(root / name)]) == 0
    draft = load_draft(root / "init", load_target(TARGET))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-4)
    for p in draft.parameters():  # one step: the optimizer has state to save, as after training
        p.grad = torch.zeros_like(p)
    optimizer.step()
    served = save_checkpoint(root / "served", draft, optimizer, {"step": 1})
    assert (served / TRAINING_STATE_DIR / "optimizer.safetensors").is_file()
    assert sorted(p.name for p in served.glob("*.safetensors")) == ["model.safetensors"]
    return {"served": served, "other": root / "other"}


@pytest.fixture(scope="module")
def server(drafts, tmp_path_factory):
    """vLLM's OpenAI server for the fetched target with the draft (what `vllm serve` starts)."""
    port = _free_port()
    spec = json.dumps({"method": "dflash", "model": str(drafts["served"]), "num_speculative_tokens": 15})
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with open(log, "w") as handle:
        # `python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` script asks for the
        # metadata of a distribution named "vllm" and exits (it is installed as "vllm-cpu")
        proc = subprocess.Popen([str(vllm_engine_or_skip()), "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", str(fetch(TARGET)), "--host", "127.0.0.1",
                                 "--port", str(port), "--dtype", "float32", "--enforce-eager",
                                 "--served-model-name", TARGET, "--max-model-len", "2048",
                                 "--speculative-config", spec],
                                env=_engine_env(), stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"vLLM did not start in 600 s: {log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def prompts_and_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-labels")
    prompts = write_jsonl(root / "p.jsonl", [{"id": f"p{i}", "messages": [{"role": "user", "content": t}]}
                                             for i, t in enumerate(PROMPTS)])
    assert main(["label", "--prompts", str(prompts), "--target", TARGET, "--out", str(root / "hf"),
                 "--max-new-tokens", str(MAX_NEW), "--dtype", "float32", "--no-progress"]) == 0
    return prompts, _answers(root / "hf")


def _answers(out: Path) -> dict:
    return {r["id"]: (r["messages"][-1]["content"], r.get("finish_reason")) for r in iter_records(out)}


def test_labels_through_a_vllm_server_equal_hf(server, prompts_and_hf, tmp_path):
    prompts, hf = prompts_and_hf
    assert main(["label", "--prompts", str(prompts), "--target", TARGET, "--backend", "openai", "--server", server,
                 "--out", str(tmp_path / "api"), "--max-new-tokens", str(MAX_NEW), "--no-progress"]) == 0
    assert _answers(tmp_path / "api") == hf


def test_labels_through_in_process_vllm_equal_hf(prompts_and_hf, tmp_path):
    prompts, hf = prompts_and_hf
    proc = subprocess.run([str(vllm_engine_or_skip()), "-m", "dflash_lab", "label", "--prompts", str(prompts),
                           "--target", TARGET, "--backend", "vllm", "--out", str(tmp_path / "vllm"),
                           "--max-new-tokens", str(MAX_NEW), "--no-progress"],
                          env=_engine_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _answers(tmp_path / "vllm") == hf


def test_the_server_check_reads_the_draft_from_vllm(server, drafts):
    from dflash_lab.errors import DFlashLabError
    from dflash_lab.eval.server_check import check_server

    check = check_server(server, "vllm", drafts["served"])
    assert check.known and check.verified and check.how == "same path", check
    with pytest.raises(DFlashLabError, match="not --draft"):
        check_server(server, "vllm", drafts["other"])
