"""Draft checkpoints in the format SGLang and vLLM load as `DFlashDraftModel` (SPEC section 2).

A directory with `config.json` (Qwen3 fields + `architectures: ["DFlashDraftModel"]`, `block_size`,
`num_target_layers`, `dflash_config: {mask_token_id, target_layer_ids}`) and `model.safetensors`
(tensor names without a `model.` prefix, no embed_tokens, no lm_head). z-lab's published drafts use
the same format and load here too. Weights are read with safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import follow_umask_tree, make_temp_dir, read_user_text, sha256_file
from dflash_lab.models.draft import DFlashDraftModel, DraftConfig, validate_against_target
from dflash_lab.models.dflash2 import DFlash2Config, DFlash2DraftModel, is_dflash2_config_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_draft(model: DFlashDraftModel, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
               extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors atomically (a temp directory renamed into place).

    `extra_files` maps file names to text written beside them (e.g. training metadata). An existing
    non-empty `out_dir` is refused unless `overwrite` (a user's `--force`): this function cannot know what a
    folder holds, and swapping one away once deleted a whole training run. A file there is always
    refused. The folder and files get the umask's permissions.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DFlashLabError(f"draft {out} is a file, not a folder; a draft checkpoint is written as a folder: "
                             "choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DFlashLabError(f"draft {out} already exists; nothing was changed: choose a new folder "
                             "(or pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.")
    try:
        write_draft_files(tmp, model.config.to_json_dict(), model.state_dict(), dtype=dtype)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        follow_umask_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_draft_files(folder: Path, config: dict, weights: dict[str, torch.Tensor], *,
                      dtype: torch.dtype | None = None) -> None:
    """config.json (`config`, the draft config's JSON fields, plus the weights' `dtype`) and
    model.safetensors (`weights` in `dtype` when given) into the existing folder `folder`: the files
    of a draft as the engines load it. `save_draft` and the trainer's checkpoints both write them here."""
    tensors = {}
    for name, tensor in weights.items():
        tensor = tensor.detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous().cpu()
    config = {**config, "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")}
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt"})


def is_draft_dir(path: str | os.PathLike) -> bool:
    """A folder holding a DFlash draft checkpoint (config.json naming a DFlash architecture + weights)."""
    path = Path(path)
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    return (path / WEIGHTS_NAME).is_file() and isinstance(archs, list) and any("DFlash" in str(a) for a in archs)


# Fields a draft config must give as positive integers; a string or a zero here used to reach torch
# (a traceback) or a baffling "draft 576 != target 576" comparison.
_POSITIVE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "vocab_size", "num_target_layers", "block_size")


def _check_config_types(raw: dict, source: Path) -> None:
    dflash = raw.get("dflash_config")
    if dflash is not None and not isinstance(dflash, dict):
        raise DFlashLabError(f"draft {source}: dflash_config must be an object, got {type(dflash).__name__}")
    merged = {**(dflash or {}), **raw}
    for key in _POSITIVE_INT_FIELDS:
        if key not in merged or (key == "head_dim" and merged[key] is None):
            continue
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise DFlashLabError(f"draft {source}: {key} must be an integer, got {value!r} "
                                 f"({type(value).__name__}); fix the file or re-export the checkpoint")
        if value < 1:
            raise DFlashLabError(f"draft {source}: {key} must be >= 1, got {value}; fix the file or re-export "
                                 "the checkpoint")
    heads, kv = merged.get("num_attention_heads"), merged.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise DFlashLabError(f"draft {source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv}; fix the file or re-export the checkpoint")
    for key in ("mask_token_id",):
        value = merged.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DFlashLabError(f"draft {source}: {key} must be an integer >= 0, got {value!r}")
    ids = merged.get("target_layer_ids")
    if ids is not None and (not isinstance(ids, list)
                            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise DFlashLabError(f"draft {source}: target_layer_ids must be a list of layer numbers >= 0, got {ids!r}")


def read_draft_config(path: str | os.PathLike) -> DraftConfig:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise DFlashLabError(f"draft {path}: no {CONFIG_NAME}; a draft checkpoint is a directory with "
                             f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(read_user_text(cfg_file, "draft"))
    except json.JSONDecodeError as exc:
        raise DFlashLabError(f"draft {cfg_file}: not valid JSON ({exc}); re-export the checkpoint") from exc
    if not isinstance(raw, dict):
        raise DFlashLabError(f"draft {cfg_file}: the top level must be a JSON object of config fields, got a "
                             f"{type(raw).__name__}; re-export the checkpoint")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if archs and not any("DFlash" in str(a) for a in archs):
        raise DFlashLabError(f"draft {cfg_file}: architectures {archs} is not a DFlash draft (expected DFlashDraftModel)")
    _check_config_types(raw, cfg_file)
    if is_dflash2_config_dict(raw):
        return DFlash2Config.from_json_dict(raw, source=str(cfg_file))
    return DraftConfig.from_json_dict(raw, source=str(cfg_file))


def draft_class(cfg: DraftConfig) -> type[DFlashDraftModel]:
    """The model class a config builds: DFlash2 for a DFlash2Config, else v1."""
    return DFlash2DraftModel if isinstance(cfg, DFlash2Config) else DFlashDraftModel


def expected_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a draft with this config, by checkpoint name."""
    model = torch.device("meta")
    with model:
        draft = draft_class(cfg)(cfg)
    return {name: tuple(t.shape) for name, t in draft.state_dict().items()}


def read_tensors(path: str | os.PathLike, cfg: DraftConfig) -> dict[str, torch.Tensor]:
    """Load and check the weights: a truncated file, a missing, unexpected or misshapen tensor each
    give a message naming the file and the tensor."""
    wfile = Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise DFlashLabError(f"draft {path}: no {WEIGHTS_NAME}")
    try:
        with safe_open(str(wfile), framework="pt") as handle:
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise DFlashLabError(
            f"draft {wfile}: unreadable safetensors file ({exc}); it is probably truncated or corrupt: "
            "copy or export it again"
        ) from exc
    # Some exporters prefix names with `model.`; the serving format has none.
    if names and all(n.startswith("model.") for n in names):
        tensors = {n.removeprefix("model."): t for n, t in tensors.items()}
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {"embed_tokens.weight", "lm_head.weight"})
    misshapen = [f"{n}: file {tuple(tensors[n].shape)} vs config {expected[n]}"
                 for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if misshapen:
            parts.append("shape mismatch " + "; ".join(misshapen[:4]))
        raise DFlashLabError(f"draft {wfile} does not match its {CONFIG_NAME}: " + ", ".join(parts))
    return {n: t for n, t in tensors.items() if n in expected}


def load_draft(path: str | os.PathLike, target=None, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> DFlashDraftModel:
    """Load a draft directory (ours or z-lab's), validated against `target` when given."""
    path = Path(path)
    if not path.is_dir():
        raise DFlashLabError(f"draft {path}: no such directory")
    cfg = read_draft_config(path)
    if target is not None:
        validate_against_target(cfg, target, source=f"draft {path}")
    tensors = read_tensors(path, cfg)
    if dtype is None:
        dtype = target.dtype if target is not None else next(iter(tensors.values())).dtype
    with torch.device("meta"):
        model = draft_class(cfg)(cfg)
    model.load_state_dict({n: t.to(dtype) for n, t in tensors.items()}, assign=True, strict=True)
    return model.to(device).eval()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of the weights file: the identity of a draft in results and the registry."""
    return sha256_file(Path(path) / WEIGHTS_NAME)
