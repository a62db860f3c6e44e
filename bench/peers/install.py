"""Each peer in its own venv: pinned versions, torch 2.13.0 CPU, `--no-deps` for the peer itself.

Idempotent: a stamp file in the venv names what was installed; a matching stamp skips the install.
The peers' own torch pins (SpecForge: torch 2.11 + sglang; speculators: torchvision -> CUDA torch)
are why the peer goes in `--no-deps` and its small dependencies are named here explicitly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
# what both peers import on the offline-training path (measured by hand, issue 25)
COMMON = ["transformers==5.8.1", "safetensors", "numpy<2.5", "tqdm", "pyyaml", "pydantic>=2", "psutil",
          "huggingface-hub", "datasets<=5.1.0", "accelerate", "typing-extensions", "requests"]
PEERS: dict[str, dict] = {
    "speculators": {"pin": "speculators==0.9.0",
                    "deps": ["pydantic-settings>=2", "loguru==0.7.3", "rich", "typer>=0.12", "click",
                             "httpx", "protobuf", "aiohttp", "openai>=2"],
                    "nodeps": ["hs-connectors==0.9.0"]},
    "specforge": {"pin": "specforge==0.2.0",
                  "deps": ["openai-harmony", "tensorboard", "einops"],
                  "nodeps": []},
}


def venv_dir(home: Path, name: str) -> Path:
    return home / "peers" / name


def python_of(home: Path, name: str) -> Path:
    return venv_dir(home, name) / "bin" / "python"


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", *args], check=True)


def install(home: Path, name: str) -> Path:
    """Install `name` (a key of PEERS) into its venv unless its stamp matches; returns the venv python."""
    spec = PEERS[name]
    venv = venv_dir(home, name)
    stamp = venv / "dflash-lab-peer.json"
    want = {"torch": TORCH, "common": COMMON, **spec}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return python_of(home, name)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py = python_of(home, name)
    # torch first (the local CPU wheel), so no later dependency can resolve a CUDA one
    _pip(py, TORCH)  # pip's find-links on this machine hold the +cpu wheel
    _pip(py, *COMMON, *spec["deps"])
    _pip(py, "--no-deps", spec["pin"], *spec["nodeps"])
    _check_cpu_only(py, name)
    stamp.write_text(json.dumps(want))
    return py


def _check_cpu_only(py: Path, name: str) -> None:
    """A CUDA wheel slipping in (nvidia-*, a +cuXXX torch) is an install error, not a slow benchmark."""
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                         check=True).stdout
    bad = [line for line in out.splitlines() if line.lower().startswith(("nvidia-", "triton", "sglang"))]
    torch_v = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if bad or not torch_v.startswith("2.13.0"):
        raise RuntimeError(f"{name} venv pulled a non-CPU stack: torch {torch_v}, {bad}; "
                           f"delete {py.parent.parent} and fix the dependency list in bench/peers/install.py")


if __name__ == "__main__":
    home = Path(sys.argv[1])
    for tool in sys.argv[2:] or list(PEERS):
        print(tool, install(home, tool), flush=True)
