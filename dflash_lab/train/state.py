"""The on-disk format of a training checkpoint: where each component's state goes, written
atomically, read back for exact resume. The one module that knows the files; `checkpointer.py`
collects the components' states and hands them here.

A checkpoint directory `RUN_DIR/checkpoints/step-<N>/` (or `final/`) holds, by component name of
the state dict (`write_checkpoint` / `read_checkpoint`):
    "draft"      {"config", "weights", "optimizer"}:
                   config.json, model.safetensors   the draft, as SGLang/vLLM/z-lab load it
                                    (`models.checkpoint.write_draft_files`), in the target's dtype
                                    (config.json `dtype` says which)
                   training_state/master.safetensors   the fp32 weights, when model.safetensors is not fp32
                   training_state/optimizer.safetensors   AdamW moments and step counts (flattened names)
                   training_state/optimizer.json   param groups (lr, betas, ...) and the tensor layout
    "rng"        training_state/rng.json (python, numpy), rng.safetensors (torch, cuda.<i>)
    any other    trainer_state.json: its keys at the top level ("progress": step, total_steps,
                 budget_fixed; "checkpoint": best_heldout_tau, epoch_end, metrics, seed), or under
                 the key IN_TRAINER_STATE names ("loader" -> data_position, "metrics" ->
                 metrics_window); `epoch` (1-based, of the data position) is written beside them
so the directory is servable as it is: vLLM and SGLang load every `*.safetensors` at its top level
(issue 21). Checkpoints written before that keep the training files at the top level; `state_dir`
finds them either way, so old runs still resume.
The whole directory is built under a temporary name and renamed into place, so a kill never leaves
a half-written checkpoint under a real name. Nothing is unpickled on load. The module also finds
a run's checkpoints (list, latest, best, by epoch end), checks one before a resume reads it, sets a
broken one aside and prunes old ones: all of that reads these files too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import follow_umask_tree
from dflash_lab.fileio import names_write_errors
from dflash_lab.models.checkpoint import read_draft_config, read_tensors, write_draft_files

STATE_NAME = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
MASTER_NAME = "master.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

IN_TRAINER_STATE = {"loader": "data_position", "metrics": "metrics_window"}
"""Components whose state sits under one key of trainer_state.json (the others: at its top level)."""
_FILES = ("draft", "rng")  # the components with files of their own
_KEY_ORDER = ("step", "total_steps", "budget_fixed", "best_heldout_tau", "epoch", "epoch_end", "data_position",
              "metrics", "seed", "metrics_window")  # trainer_state.json's keys, as the trainer has always written them


def state_dir(ckpt: Path) -> Path:
    """Where a checkpoint keeps its training-only files: `training_state/`, or the checkpoint
    itself for one written before issue 21."""
    sub = Path(ckpt) / TRAINING_STATE_DIR
    return sub if sub.is_dir() else Path(ckpt)


# -- writing ---------------------------------------------------------------------------------------
@names_write_errors("checkpoint", fix="free disk space, then resume: dflash-lab train --out RUN_DIR --resume")
def write_checkpoint(path: Path, states: dict[str, dict], dtype: torch.dtype | None = None) -> Path:
    """Checkpoint `path` of the components' states ({name: state_dict()}), atomically (temp dir,
    then rename over any old one). `dtype`: the served draft's dtype (the target's); the fp32
    weights training resumes from are kept in training_state/master.safetensors when that dtype
    is not fp32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_root / "ckpt"
        training = tmp / TRAINING_STATE_DIR  # out of the servers' top-level *.safetensors glob
        training.mkdir(parents=True)
        if "draft" in states:
            _write_draft(tmp, states["draft"], dtype)
        if "rng" in states:
            _write_split(training, "rng", states["rng"])
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state_of(states), indent=2) + "\n")
        follow_umask_tree(tmp)  # safetensors writes 0600: teammates and servers must read checkpoints
        _replace(tmp, path)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return path


def _write_draft(folder: Path, state: dict, dtype: torch.dtype | None) -> None:
    write_draft_files(folder, state["config"], state["weights"], dtype=dtype)
    training = folder / TRAINING_STATE_DIR
    if dtype is not None and dtype != torch.float32:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state["weights"].items()},
                  str(training / MASTER_NAME))
    opt_tensors, opt_meta = optimizer_tensors(state["optimizer"])
    save_file(opt_tensors, str(training / "optimizer.safetensors"))
    (training / "optimizer.json").write_text(json.dumps(opt_meta))


def _write_split(folder: Path, stem: str, state: dict) -> None:
    """`state`'s tensors to STEM.safetensors, the rest to STEM.json."""
    (folder / f"{stem}.json").write_text(json.dumps({k: v for k, v in state.items() if not torch.is_tensor(v)}))
    save_file({k: v for k, v in state.items() if torch.is_tensor(v)}, str(folder / f"{stem}.safetensors"))


def _replace(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def trainer_state_of(states: dict[str, dict]) -> dict:
    """trainer_state.json of the components' states: every state without files of its own, at
    the top level or under its IN_TRAINER_STATE key, with `epoch` beside the data position."""
    out = {}
    for name, state in states.items():
        if name in IN_TRAINER_STATE:
            out[IN_TRAINER_STATE[name]] = state
        elif name not in _FILES:
            out.update(state)
    if "data_position" in out:
        out["epoch"] = out["data_position"]["epoch"] + 1  # epoch_checkpoint and people read it
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as safetensors tensors (`state.<param>.<key>`) and JSON (the
    param groups and which fields are tensors)."""
    tensors = {}
    layout = {}
    for idx, state in sd["state"].items():
        layout[str(idx)] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
                layout[str(idx)][key] = "tensor"
            else:
                layout[str(idx)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "layout": layout}


# -- reading ---------------------------------------------------------------------------------------
def read_checkpoint(ckpt: Path, names) -> dict[str, dict]:
    """The states of components `names` as checkpoint `ckpt` holds them (the inverse of
    `write_checkpoint`; either layout). A file that cannot be read is a broken checkpoint."""
    ckpt = Path(ckpt)
    trainer_state = read_trainer_state(ckpt)
    out = {}
    for name in names:
        if name == "draft":
            out[name] = _read_draft(ckpt)
        elif name == "rng":
            out[name] = _read_split(ckpt, "rng")
        elif name in IN_TRAINER_STATE:
            out[name] = trainer_state.get(IN_TRAINER_STATE[name]) or {}
        else:
            out[name] = trainer_state
    return out


def _read_draft(ckpt: Path) -> dict:
    """{"weights": the fp32 master copy when there is one, else the served weights; "optimizer"}."""
    weights = master_weights(ckpt) or read_tensors(ckpt, read_draft_config(ckpt))
    return {"weights": weights, "optimizer": _read_optimizer(ckpt)}


def _read_optimizer(ckpt: Path) -> dict:
    where = state_dir(ckpt)
    meta = _read_json(ckpt, "optimizer.json", where)
    try:
        file = where / "optimizer.safetensors"
        tensors = load_file(str(file)) if file.exists() else {}
        state = {}
        for idx, fields in meta["layout"].items():
            state[int(idx)] = {k: (tensors[f"state.{idx}.{k}"] if v == "tensor" else v) for k, v in fields.items()}
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]  # JSON lists
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise broken_checkpoint(ckpt, f"optimizer state unreadable ({type(exc).__name__}: {exc})") from None
    return {"state": state, "param_groups": groups}


def _read_split(ckpt: Path, stem: str) -> dict:
    where = state_dir(ckpt)
    meta = _read_json(ckpt, f"{stem}.json", where)
    try:
        tensors = load_file(str(where / f"{stem}.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise broken_checkpoint(ckpt, f"{stem}.safetensors unreadable ({type(exc).__name__}: {exc})") from None
    return {**meta, **tensors}


def master_weights(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The fp32 training weights of a checkpoint (None when model.safetensors is itself fp32)."""
    file = state_dir(ckpt) / MASTER_NAME
    return load_file(str(file)) if file.is_file() else None


def read_trainer_state(ckpt: Path) -> dict:
    file = Path(ckpt) / STATE_NAME
    if not file.is_file():
        raise DFlashLabError(f"checkpoint {ckpt}: no {STATE_NAME}; not a training checkpoint of dflash-lab")
    state = _read_json(Path(ckpt), STATE_NAME)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise broken_checkpoint(Path(ckpt), f"{STATE_NAME} holds no step number")
    return state


# -- checking a checkpoint before resuming from it ---------------------------------------------------
def broken_checkpoint(ckpt: Path, detail: str) -> DFlashLabError:
    """The message for a checkpoint that cannot be resumed: which one, why, and how to go on from
    the one before it."""
    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent
    steps = [p for _, p in _step_checkpoints(run_dir)]
    earlier = steps[:steps.index(ckpt)] if ckpt in steps else steps  # `final` comes after every step
    if earlier:
        fix = (f"`--resume` can start from the one before it ({earlier[-1].name}): rerun with --resume-previous "
               f"(it renames {ckpt.name} to .broken-{ckpt.name}), or move {ckpt} aside yourself")
    else:
        fix = "there is no earlier checkpoint to resume from: start a new run in another --out directory"
    return DFlashLabError(f"checkpoint {ckpt} is broken: {detail}; {fix}")


def _read_json(ckpt: Path, name: str, where: Path | None = None):
    """JSON file `name` of checkpoint `ckpt`, read from `where` (default: the checkpoint itself)."""
    where = Path(ckpt) if where is None else Path(where)
    shown = name if where == Path(ckpt) else f"{where.name}/{name}"
    try:
        return json.loads((where / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise broken_checkpoint(ckpt, f"{shown} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise broken_checkpoint(ckpt, f"{shown} is not valid JSON ({exc})") from None


def verify_checkpoint(ckpt: Path) -> None:
    """Open every file resume reads (headers only for safetensors: a truncated file fails there),
    so a broken checkpoint is named before the model loads rather than as a traceback after."""
    ckpt = Path(ckpt)
    where = state_dir(ckpt)
    read_trainer_state(ckpt)
    for name in ("optimizer.json", "rng.json"):
        _read_json(ckpt, name, where)
    _read_json(ckpt, "config.json")
    files = [ckpt / "model.safetensors", where / "optimizer.safetensors", where / "rng.safetensors",
             where / MASTER_NAME]
    for file in files:
        shown = file.name if file.parent == ckpt else f"{where.name}/{file.name}"
        if file.name not in ("optimizer.safetensors", MASTER_NAME) and not file.is_file():
            raise broken_checkpoint(ckpt, f"{shown} is missing")
        if not file.is_file():
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                list(handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise broken_checkpoint(ckpt, f"{shown} is unreadable, probably truncated ({exc})") from None


def set_aside_broken(ckpt: Path) -> Path:
    """Rename a broken checkpoint to `.broken-NAME` beside it (kept, never deleted): list_checkpoints
    no longer sees it, so resume starts from the one before."""
    ckpt = Path(ckpt)
    dest = ckpt.with_name(f".broken-{ckpt.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f".broken-{ckpt.name}.{n}")
    os.replace(ckpt, dest)
    return dest


def _step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / STATE_NAME).is_file() and (child / "model.safetensors").is_file():
                found.append((int(m.group(1)), child))
    found.sort()
    return found


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete `step-N` checkpoint, oldest first (plus final, last)."""
    root = Path(run_dir) / "checkpoints"
    found = _step_checkpoints(run_dir)
    final = root / "final"
    if (final / STATE_NAME).is_file():
        found.append((read_trainer_state(final)["step"], final))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    return max(ckpts, key=lambda sp: (sp[0], sp[1].name == "final"))[1]


def best_checkpoint(run_dir: str | os.PathLike, metric: str = "heldout_tau") -> Path:
    """The checkpoint with the highest held-out simulated tau (ties: the later step); checkpoints
    without the metric are considered only when none has it (then the latest)."""
    ckpts = list_checkpoints(Path(run_dir))
    if not ckpts:
        raise DFlashLabError(f"run {run_dir}: no checkpoints under {Path(run_dir) / 'checkpoints'}")
    scored = []
    for step, path in ckpts:
        value = read_trainer_state(path).get("metrics", {}).get(metric)
        if value is not None:
            scored.append((float(value), step, path.name == "final", path))
    if not scored:
        return latest_checkpoint(Path(run_dir))
    return max(scored, key=lambda t: t[:3])[3]


def epoch_checkpoint(run_dir: str | os.PathLike, epoch: int) -> Path:
    """The checkpoint written at the end of epoch `epoch` (1-based)."""
    for _, path in list_checkpoints(Path(run_dir)):
        st = read_trainer_state(path)
        if st.get("epoch_end") and st.get("epoch") == epoch:
            return path
    raise DFlashLabError(f"run {run_dir}: no checkpoint marks the end of epoch {epoch} (see trainer_state.json)")


def resolve_init(init: str) -> Path | None:
    """`scratch` -> None; `best:RUN_DIR`; `epoch-E:RUN_DIR`; else a checkpoint directory."""
    if init in ("scratch", "", None):
        return None
    if init.startswith("best:"):
        return best_checkpoint(init[5:])
    m = re.match(r"^epoch-(\d+):(.+)$", init)
    if m:
        return epoch_checkpoint(m.group(2), int(m.group(1)))
    path = Path(init).expanduser()
    if not path.is_dir():
        raise DFlashLabError(f"draft.init {init!r}: no such checkpoint directory; use scratch, a directory, "
                             "best:RUN_DIR or epoch-E:RUN_DIR")
    return path


def prune_checkpoints(run_dir: Path, keep_last: int | None, protect: Path | None = None,
                      keep_epoch_ends: bool = True) -> None:
    """Keep the `keep_last` newest step checkpoints (never `protect`, e.g. the best so far, and,
    with `keep_epoch_ends`, never an epoch-end checkpoint: a later stage's `init: epoch-E:RUN` may
    name it)."""
    if not keep_last:
        return
    steps = [(s, p) for s, p in list_checkpoints(run_dir)
             if p.name != "final" and not (keep_epoch_ends and read_trainer_state(p).get("epoch_end"))]
    for _, path in steps[:-keep_last]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
