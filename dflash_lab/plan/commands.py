"""`dflash-lab plan`: the memory and cost of a recipe's training step, without a GPU."""

from __future__ import annotations

from dflash_lab.errors import DFlashLabError


def register(subparsers) -> None:
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
    from dflash_lab.plan import format_plan, make_plan, parse_memory, plan_json
    from dflash_lab.train.recipe import load_recipe

    if not 0 <= args.margin < 1:
        raise DFlashLabError(f"--margin {args.margin}: must be in [0, 1)")
    recipe = load_recipe(args.config, list(args.overrides or []))
    plan = make_plan(recipe, gpus=args.gpus, gpu_memory=parse_memory(args.gpu_memory), margin=args.margin,
                     mfu=args.mfu, gpu_tflops=args.gpu_tflops, recipe_name=str(args.config), search=not args.no_search)
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0
