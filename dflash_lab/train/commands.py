"""`dflash-lab train`: the command line of the trainer (see trainer.py for the Python API)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.outputs import add_output

# What a run directory holds before its first checkpoint: starting again there loses nothing.
_RUN_LEFTOVERS = {"run.json", "config.yaml", "metrics.jsonl", "tb", "checkpoints", ".writer.lock"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a DFlash draft (CPU, GPU, or torchrun for several)",
        description="Train a DFlash draft on a labelled dataset. Dotted overrides (train.lr=1e-3) follow the "
                    "options. Multi-GPU: torchrun --nproc-per-node N -m dflash_lab train ...",
    )
    p.add_argument("--config", help="recipe YAML (with --resume: defaults to RUN_DIR/config.yaml)")
    p.add_argument("--data", help="labelled dataset: a directory of shard-*.jsonl or a .jsonl/.parquet file "
                                   "(with --resume: defaults to the run's own)")
    add_output(p, "--out", kind="dir", command="train", owned=_own_run, inputs=("config", "data", "target"),
               fix="pass --resume to continue the run there, or choose a new directory",
               required=True, help="run directory RUN_DIR")
    p.add_argument("--target", help="override target.name (embedded name, HF directory, .gguf, hub id)")
    p.add_argument("--max-steps", type=int, help="schedule length cap (train.max_steps)")
    p.add_argument("--stop-after", type=int, help="stop after N steps with a checkpoint, as an interruption would")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (train.save_every)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--resume-previous", action="store_true",
                   help="with --resume: when the latest checkpoint is broken, rename it to .broken-NAME and "
                        "resume from the one before it")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it as JSON, load no model")
    p.add_argument("--db", help="register the finished run in this registry database")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.set_defaults(handler=run_train)


def _recipe_from_args(args):
    from dflash_lab.train.recipe import load_recipe

    overrides = list(args.overrides or [])
    if args.target:
        overrides.append(f"target.name={json.dumps(args.target)}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    config = args.config
    if config is None:
        saved = Path(args.out) / "config.yaml"
        if args.resume and saved.is_file():
            config = saved
        elif not args.resume:
            raise DFlashLabError("--config is required (a recipe YAML, e.g. recipes/smollm2-135m/cpu.yaml)")
        else:
            raise DFlashLabError(f"--resume: {saved} not found; is --out a run directory?")
    return load_recipe(config, overrides), config


def _unstarted_run(out: Path) -> bool:
    """A run directory that holds no checkpoint yet (a run stopped before its first save)."""
    entries = list(out.iterdir())
    if not all(p.name in _RUN_LEFTOVERS for p in entries):
        return False
    ckpts = out / "checkpoints"
    return not ckpts.exists() or (ckpts.is_dir() and not any(ckpts.iterdir()))


def _own_run(out: Path, args) -> bool:
    """`train --resume` continues the run in --out; a new run may reuse a directory that never saved."""
    return bool(args.resume) or _unstarted_run(out)


def _verify_resume_point(out: Path, resume_previous: bool, rank: int | None = None,
                         wait_s: float = 600.0) -> Path | None:
    """Name a broken latest checkpoint before any model loads; with --resume-previous set it aside
    (renamed, never deleted) and check the one before it. Returns the checkpoint to resume from.

    Under torchrun this runs before a process group exists, so ranks cannot agree by a collective:
    only rank 0 renames (issue 23 item 2: every rank renaming raced into FileNotFoundError); the
    other ranks read the directory until its latest checkpoint verifies, i.e. until rank 0 has set
    the broken ones aside, for at most `wait_s` seconds."""
    import time

    from dflash_lab.train import state as S

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    deadline = time.monotonic() + wait_s
    while True:
        latest = S.latest_checkpoint(out)
        if latest is None or latest.name == "final":
            return latest
        try:
            S.verify_checkpoint(latest)
            return latest
        except (DFlashLabError, FileNotFoundError):
            if not resume_previous:
                if rank == 0 or latest.exists():
                    raise
                continue  # rank 0 moved it while this rank read it
            if rank != 0:
                if time.monotonic() > deadline:
                    raise DFlashLabError(f"--resume-previous: rank {rank} waited {wait_s:.0f} s for rank 0 to set "
                                         f"aside the broken checkpoint {latest}; see rank 0's error") from None
                time.sleep(0.05)
                continue
            moved = S.set_aside_broken(latest)
            print(f"[train] {latest} is broken; renamed it to {moved.name} and resuming from the one before",
                  file=sys.stderr)


def _iter_dataset(data: str):
    """The records of a labelled dataset, lazily for jsonl (shards are read one line at a time; a
    line that is not JSON is skipped here: read_records names it, this only looks at the roles)."""
    from dflash_lab.fileio import iter_jsonl
    from dflash_lab.train.data import read_records

    path = Path(data)
    shards = sorted(path.glob("shard-*.jsonl")) if path.is_dir() else []
    if shards:
        for shard in shards:
            yield from iter_jsonl(shard, "data")
    elif path.is_file() and path.suffix == ".jsonl":
        yield from iter_jsonl(path, "data")
    else:
        yield from read_records(path)  # parquet, or a missing path: its own message


def _first_assistant_problem(data: str) -> str | None:
    """None when some record ends with an assistant response; else why none does. Stops at the
    first good record, so a real dataset costs one line."""
    count, example = 0, None
    for row in _iter_dataset(data):
        count += 1
        messages = row.get("messages") if isinstance(row, dict) else None
        last = messages[-1] if isinstance(messages, list) and messages else None
        role = last.get("role") if isinstance(last, dict) else None
        if role == "assistant" and len(messages) >= 2:
            return None
        if example is None:
            example = f"the last message is {role!r}" if role else "no `messages` list of {role, content}"
    return f"none of its {count} records ends with an assistant response (e.g. {example})" if count else None


def _check_has_responses(data: str) -> None:
    problem = _first_assistant_problem(data)
    if problem:
        raise DFlashLabError(
            f"data {data}: {problem}; training needs labelled records. If this is a prompt set, label it "
            f"first: dflash-lab label --prompts {data} --target TARGET --out LABELS, then train --data LABELS")


def _local_fingerprint(spec: str) -> str | None:
    """The fingerprint `label` records for a target, for a local or embedded HF directory (cheap:
    names, sizes and config.json); None where it cannot be known without loading (hub ids, GGUF)."""
    from dflash_lab.models import embedded
    from dflash_lab.models.target import _dir_fingerprint

    if spec in embedded.EMBEDDED_TARGETS:
        path = embedded.model_dir(spec)  # not fetched here: an unfetched one is simply not compared
    else:
        path = Path(spec).expanduser()
    return _dir_fingerprint(path) if (path / "config.json").is_file() else None


def _check_labels_target(data: str, target_spec: str) -> None:
    """Labels are the target's own greedy answers: labels another target wrote teach the draft that
    target's distribution. Warn (once, before anything loads) when the dataset's meta.json names
    another target than the one this run trains for."""
    meta_file = Path(data).expanduser() / "meta.json"
    try:
        labelled = json.loads(meta_file.read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(labelled, dict):
        return
    theirs, ours = labelled.get("fingerprint"), _local_fingerprint(str(target_spec))
    same = theirs == ours if theirs and ours else labelled.get("name") in (None, str(target_spec))
    if not same:
        print(f"warning: --data {data} was labelled by target {labelled.get('name')!r} (its meta.json), this run "
              f"trains a draft for {target_spec!r}; a draft learns the labelling target's answers: label the "
              f"prompts with this target (dflash-lab label --target {target_spec}) unless this is what you want",
              file=sys.stderr)


def _mark_ended(out: Path, status: str, **extra) -> None:
    """run.json said `running`; a run that ended without finishing says how (rank 0 only):
    `interrupted` after Ctrl-C, `stopped` after --stop-after (both resume with --resume)."""
    from dflash_lab.fileio import atomic_write_text

    if int(os.environ.get("RANK", "0")) != 0:
        return
    run_json = out / "run.json"
    try:
        run = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(run, dict) or run.get("status") != "running":
        return
    run.update(status=status, **{status: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, **extra)
    atomic_write_text(run_json, json.dumps(run, indent=2) + "\n")


def _mark_interrupted(out: Path) -> None:
    _mark_ended(out, "interrupted")


def run_train(args) -> int:
    from dflash_lab.train.distributed import env_world_size
    from dflash_lab.train.recipe import resolve_batch

    if args.resume_previous and not args.resume:
        raise DFlashLabError("--resume-previous only applies with --resume")
    recipe, config_path = _recipe_from_args(args)
    micro, accum, global_batch = resolve_batch(recipe, env_world_size())
    if args.dry_run:
        resolved = recipe.model_dump(mode="json")
        resolved["resolved"] = {"world_size": env_world_size(), "micro_batch": micro, "grad_accum": accum,
                                "global_batch": global_batch}
        print(json.dumps(resolved, indent=2))
        return 0
    out = Path(args.out).expanduser()
    if not args.data and args.resume and (out / "run.json").is_file():
        try:
            args.data = json.loads((out / "run.json").read_text(encoding="utf-8"))["data"]["path"]  # the run's own data
        except (ValueError, KeyError, TypeError):
            raise DFlashLabError(f"--resume: {out / 'run.json'} is not readable run metadata; pass --data") from None
    if not args.data:
        raise DFlashLabError("--data is required: the labelled dataset from `dflash-lab label`")
    _check_has_responses(args.data)
    _check_labels_target(args.data, recipe.target.name)
    from dflash_lab.runlock import RunDirLock

    with RunDirLock(out, command="train"):  # one writer per run directory (rank 0 holds it)
        if args.resume:
            _verify_resume_point(out, args.resume_previous)
        path = _train_run(args, recipe, config_path, out)
    print(path)
    return 0


def _train_run(args, recipe, config_path, out: Path) -> Path:
    from dflash_lab.train.trainer import train

    try:
        path = train(recipe, args.data, args.out, resume=args.resume, stop_after=args.stop_after, db=args.db,
                     progress=not args.no_progress, recipe_path=str(config_path))
        if path is not None and path.name != "final":  # --stop-after: not running any more, not finished
            _mark_ended(out.resolve(), "stopped", stopped_at=path.name)
        return path
    except KeyboardInterrupt:
        _mark_interrupted(out.resolve())
        print(f"[train] interrupted; run.json says so. Continue with: dflash-lab train --out {args.out} --resume",
              file=sys.stderr)
        raise
