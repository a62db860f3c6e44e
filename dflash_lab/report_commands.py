"""`dflash-lab report`: the journey report of `report.py` from the run registry the evals wrote."""

from __future__ import annotations

from pathlib import Path

from dflash_lab import registry
from dflash_lab.outputs import add_output


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="the journey report: progression, gap to a reference, charts")
    p.add_argument("--runs", required=True, help="comma list of run names, in journey order")
    p.add_argument("--reference", help="reference run name (e.g. z-lab-m0)")
    add_output(p, "--out", kind="dir", command="report", owned=lambda path, args: _has_report(path), inputs=("db",),
               fix="choose a new --out folder (it gets report.md and its charts)",
               required=True, help="output folder (report.md + PNGs)")
    p.add_argument("--benchmarks", help="comma list (default: every benchmark all runs share)")
    p.add_argument("--metric", choices=["tau_pooled", "tau_per_request"], default="tau_pooled")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--db", default=registry.DEFAULT_DB)
    p.set_defaults(handler=cmd_report)


def _has_report(folder: Path) -> bool:
    return (folder / "report.md").is_file()


def cmd_report(args) -> int:
    from dflash_lab.errors import DFlashLabError
    from dflash_lab.eval.benchmarks import parse_benchmark_names
    from dflash_lab.report import write_report

    benches = parse_benchmark_names(args.benchmarks) if args.benchmarks else None
    if not Path(args.db).exists():
        raise DFlashLabError(f"registry {args.db} does not exist; pass --db with the database the evals wrote")
    path = write_report(args.runs, args.reference, args.out, args.db, baselines=not args.no_baselines,
                        benchmarks=benches, metric=args.metric)
    print(path.read_text())
    print(f"wrote {path}")
    return 0
