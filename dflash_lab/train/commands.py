"""`dflash-lab train` and `dflash-lab plan`: the command lines of the trainer (see trainer.py for the Python
API) and of the memory and cost plan (plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

from dflash_lab.errors import DFlashLabError


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
    p.add_argument("--out", required=True, help="run directory RUN_DIR")
    p.add_argument("--target", help="override target.name (embedded name, HF directory, .gguf, hub id)")
    p.add_argument("--max-steps", type=int, help="schedule length cap (train.max_steps)")
    p.add_argument("--stop-after", type=int, help="stop after N steps with a checkpoint, as an interruption would")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (train.save_every)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it as JSON, load no model")
    p.add_argument("--db", help="register the finished run in this registry database")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.set_defaults(handler=run_train)
    register_plan(subparsers)


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


def run_train(args) -> int:
    from dflash_lab.train.distributed import env_world_size
    from dflash_lab.train.recipe import resolve_batch

    recipe, config_path = _recipe_from_args(args)
    micro, accum, global_batch = resolve_batch(recipe, env_world_size())
    if args.dry_run:
        resolved = recipe.model_dump(mode="json")
        resolved["resolved"] = {"world_size": env_world_size(), "micro_batch": micro, "grad_accum": accum,
                                "global_batch": global_batch}
        print(json.dumps(resolved, indent=2))
        return 0
    if not args.data and args.resume and (Path(args.out) / "run.json").is_file():
        args.data = json.loads((Path(args.out) / "run.json").read_text())["data"]["path"]  # the run's own data
    if not args.data:
        raise DFlashLabError("--data is required: the labelled dataset from `dflash-lab label`")
    from dflash_lab.train.trainer import train

    path = train(recipe, args.data, args.out, resume=args.resume, stop_after=args.stop_after, db=args.db,
                 progress=not args.no_progress, recipe_path=str(config_path))
    print(path)
    return 0


def register_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="memory and cost of a recipe's training step, without a GPU",
        description="Build the recipe's target and draft with fake tensors, run one training micro-step of the "
                    "trainer's code at the recipe's shapes, and print the peak memory per GPU by kind, FLOPs per "
                    "optimizer step, the largest micro-batch that fits and the step time at a stated MFU.",
    )
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run uses (default 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default 80GB)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="fraction of GPU memory kept free for the CUDA context and fragmentation (default 0.1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of one GPU (default 989, H100/H200 SXM)")
    p.add_argument("--no-search", action="store_true", help="skip the search for the largest micro-batch")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.set_defaults(handler=run_plan)


def run_plan(args) -> int:
    from dflash_lab.train.plan import format_plan, make_plan, parse_memory, plan_json
    from dflash_lab.train.recipe import load_recipe

    if not 0 <= args.margin < 1:
        raise DFlashLabError(f"--margin {args.margin}: must be in [0, 1)")
    recipe = load_recipe(args.config, list(args.overrides or []))
    plan = make_plan(recipe, gpus=args.gpus, gpu_memory=parse_memory(args.gpu_memory), margin=args.margin,
                     mfu=args.mfu, gpu_tflops=args.gpu_tflops, recipe_name=str(args.config), search=not args.no_search)
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0
