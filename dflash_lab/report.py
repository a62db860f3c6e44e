"""The journey report: how tau moved from run to run, how much of the gap to a reference draft
each run closed, the best checkpoint of every run, and the baselines (prompt-lookup tau,
target-only throughput), as `report.md` plus PNG charts.

Only results measured under the same harness settings are compared (see
`dflash_lab.eval.harness.harness_settings`); when the runs were measured differently the report
stops and names the settings that differ.

Gap arithmetic (per benchmark and for the average): gap = reference - first run;
closed = (run - first run) / gap. "m1.9 closes 43% of the 1.07-point gap" means
(m1.9 - m1) / (ref - m1) = 0.43 with ref - m1 = 1.07.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dflash_lab import registry
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval.benchmarks import BENCHMARKS
from dflash_lab.eval.harness import settings_differences

METRICS = ("tau_pooled", "tau_per_request")


@dataclass
class RunSummary:
    name: str
    kind: str
    draft: str = "-"  # which draft this is ("DFlash2, block 8"), so v1 and DFlash2 runs share one table
    best_label: str | None = None  # checkpoint with the best average
    taus: dict[str, float] = field(default_factory=dict)  # benchmark -> tau of the best checkpoint
    best_per_benchmark: dict[str, tuple[str, float]] = field(default_factory=dict)
    per_checkpoint: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    greedy_tokens_per_s: dict[str, float] = field(default_factory=dict)

    @property
    def avg(self) -> float | None:
        return sum(self.taus.values()) / len(self.taus) if self.taus else None


@dataclass
class Journey:
    benchmarks: list[str]
    settings: dict[str, dict]  # benchmark -> settings used
    runs: list[RunSummary]
    reference: RunSummary | None
    baselines: dict[str, RunSummary]
    metric: str


def _global(settings: dict) -> dict:
    """Settings that must agree across benchmarks too (the data hash is per benchmark)."""
    return {k: v for k, v in settings.items() if k != "bench_data"}


def _load_rows(con, name: str) -> tuple[dict, list[dict]]:
    run = dict(registry.get_run(con, name))
    rows = []
    for ckpt in registry.checkpoints_of(con, run["id"]):
        for result in registry.results_of(con, ckpt["id"]):
            result["label"] = ckpt["label"]
            result["path"] = ckpt["path"]
            rows.append(result)
    return run, rows


ARCH_NAMES = {"dflash": "v1", "dflash2": "DFlash2"}


def draft_arch(run: dict, checkpoint_path: str | None) -> str | None:
    """"v1" or "DFlash2": the run's recipe says (`draft.arch`), else the checkpoint's config.json
    (a reference draft has no recipe); None when neither is readable (e.g. a moved checkpoint)."""
    try:
        recipe = json.loads(run.get("recipe_json") or "null")
    except json.JSONDecodeError:
        recipe = None
    if isinstance(recipe, dict) and isinstance(recipe.get("draft"), dict):
        return ARCH_NAMES.get(recipe["draft"].get("arch", "dflash"), recipe["draft"].get("arch"))
    config = Path(checkpoint_path or "") / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return "DFlash2" if "DFlash2DraftModel" in architectures else "v1"


def draft_label(arch: str | None, block_size: int | None) -> str:
    parts = [arch or "", f"block {block_size}" if block_size else ""]
    return ", ".join(p for p in parts if p) or "-"


def _choose_settings(benchmarks: list[str], named_rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per benchmark, the newest settings under which every run has a result; an error naming the
    differing settings when there is none."""
    chosen: dict[str, dict] = {}
    for bench in benchmarks:
        per_run = {}
        for name, rows in named_rows.items():
            keyed = {r["settings_key"]: r for r in rows if r["benchmark"] == bench}
            if not keyed:
                raise DFlashLabError(f"run {name} has no {bench} result; evaluate it (dflash-lab eval-run {name}) "
                                     "or leave the benchmark out with --benchmarks")
            per_run[name] = keyed
        common = set.intersection(*(set(k) for k in per_run.values()))
        if not common:
            names = list(per_run)
            first = max(per_run[names[0]].values(), key=lambda r: r["created"] or "")
            for other in names[1:]:
                if not set(per_run[other]) & set(per_run[names[0]]):
                    second = max(per_run[other].values(), key=lambda r: r["created"] or "")
                    diff = settings_differences(first["settings"], second["settings"])
                    raise DFlashLabError(
                        f"{bench}: runs {names[0]} and {other} were measured under different harness settings "
                        f"({'; '.join(diff)}); re-evaluate them under the same settings before comparing"
                    )
            raise DFlashLabError(f"{bench}: no harness settings under which all of {', '.join(names)} were "
                                 "measured; re-evaluate them under the same settings before comparing")
        newest = max(common, key=lambda k: max(per_run[n][k]["created"] or "" for n in per_run))
        chosen[bench] = next(iter(per_run.values()))[newest]["settings"]
    first_bench = benchmarks[0]
    for bench in benchmarks[1:]:
        diff = settings_differences(_global(chosen[first_bench]), _global(chosen[bench]))
        if diff:
            raise DFlashLabError(f"benchmarks {first_bench} and {bench} were measured under different harness "
                                 f"settings ({'; '.join(diff)}); re-evaluate under one setting")
    return chosen


def _summarise_run(run: dict, rows: list[dict], benchmarks: list[str], keys: dict[str, str], metric: str) -> RunSummary:
    summary = RunSummary(run["name"], run["kind"])
    by_ckpt: dict[str, dict[str, dict]] = {}
    for r in rows:
        if keys.get(r["benchmark"]) == r["settings_key"]:
            by_ckpt.setdefault(r["label"], {})[r["benchmark"]] = r
    complete = {label: res for label, res in by_ckpt.items()
                if all(b in res and res[b][metric] is not None for b in benchmarks)}
    for label, res in complete.items():
        summary.per_checkpoint[label] = {b: res[b][metric] for b in benchmarks}
    if not complete:
        return summary
    best = max(complete, key=lambda label: sum(summary.per_checkpoint[label].values()))
    summary.best_label = best
    first_row = complete[best][benchmarks[0]]
    summary.draft = draft_label(draft_arch(run, first_row.get("path")), first_row.get("block_size"))
    for bench in benchmarks:
        row = complete[best][bench]
        summary.taus[bench] = row[metric]
        if row["acceptance_histogram"]:
            summary.histograms[bench] = row["acceptance_histogram"]
        if row["tokens_per_s"] is not None:
            summary.tokens_per_s[bench] = row["tokens_per_s"]
        if row["greedy_tokens_per_s"] is not None:
            summary.greedy_tokens_per_s[bench] = row["greedy_tokens_per_s"]
        label = max(complete, key=lambda lb: summary.per_checkpoint[lb][bench])
        summary.best_per_benchmark[bench] = (label, summary.per_checkpoint[label][bench])
    return summary


def collect(runs: list[str], reference: str | None, db=registry.DEFAULT_DB, *, benchmarks: list[str] | None = None,
            metric: str = "tau_pooled", baselines: bool = True) -> Journey:
    """Read the registry into a `Journey` (one settings per benchmark for every run compared)."""
    if metric not in METRICS:
        raise DFlashLabError(f"unknown metric {metric!r}; use {', '.join(METRICS)}")
    if not runs:
        raise DFlashLabError("no runs to report: pass --runs NAME,NAME,...")
    with registry.connect(db) as con:
        loaded = {name: _load_rows(con, name) for name in [*runs, *([reference] if reference else [])]}
        baseline_rows = {}
        if baselines:
            for name in registry.BASELINE_RUNS.values():
                if con.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
                    baseline_rows[name] = _load_rows(con, name)
    if benchmarks is None:
        present = [set(r["benchmark"] for r in rows) for _, rows in loaded.values()]
        benchmarks = [b for b in BENCHMARKS if all(b in p for p in present)]
        if not benchmarks:
            raise DFlashLabError(f"runs {', '.join(loaded)} share no evaluated benchmark; evaluate them first")
    settings = _choose_settings(benchmarks, {n: rows for n, (_, rows) in loaded.items()})
    from dflash_lab.eval.harness import settings_key

    keys = {b: settings_key(s) for b, s in settings.items()}
    summaries = {n: _summarise_run(run, rows, benchmarks, keys, metric) for n, (run, rows) in loaded.items()}
    base = {n: _summarise_run(run, rows, benchmarks, keys, metric) for n, (run, rows) in baseline_rows.items()}
    # throughput baselines need only the tokens/s, not every benchmark's tau
    for n, (run, rows) in baseline_rows.items():
        for r in rows:
            if keys.get(r["benchmark"]) == r["settings_key"] and r["tokens_per_s"] is not None:
                base[n].tokens_per_s.setdefault(r["benchmark"], r["tokens_per_s"])
                if r[metric] is not None:
                    base[n].taus.setdefault(r["benchmark"], r[metric])
    return Journey(benchmarks, settings, [summaries[n] for n in runs], summaries.get(reference) if reference else None,
                   base, metric)


# -- tables ---------------------------------------------------------------------------------------
def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def progression_rows(journey: Journey) -> list[list[str]]:
    rows, previous = [], None
    for run in journey.runs:
        avg = run.avg
        delta = None if previous is None or avg is None else avg - previous
        rows.append([run.name, run.draft, run.best_label or "-", *[_f(run.taus.get(b)) for b in journey.benchmarks],
                     _f(avg), "-" if delta is None else f"{delta:+.2f}"])
        previous = avg if avg is not None else previous
    if journey.reference is not None:
        ref = journey.reference
        rows.append([f"{ref.name} (reference)", ref.draft, ref.best_label or "-",
                     *[_f(ref.taus.get(b)) for b in journey.benchmarks], _f(ref.avg), ""])
    return rows


def progression_table(runs=None, db=registry.DEFAULT_DB, reference: str | None = None, *,
                      journey: Journey | None = None, metric: str = "tau_pooled") -> str:
    """The progression table as markdown text: per run each benchmark's tau (best checkpoint),
    the average and the change of the average from the previous run. The draft column says which
    architecture and block size each run is, so v1 and DFlash2 runs compare in one table (tau is
    tokens per verify cycle for both: a block-8 DFlash2 draft can accept at most 8 per cycle)."""
    if journey is None:
        journey = collect(list(runs), reference, db, metric=metric, baselines=False)
    return _table(["run", "draft", "best checkpoint", *journey.benchmarks, "avg", "delta avg"],
                  progression_rows(journey))


def closed_fraction(first: float, run: float, reference: float) -> float | None:
    """(run - first) / (reference - first); None when the first run is already at or past the reference."""
    gap = reference - first
    return (run - first) / gap if gap > 0 else None


def gap_table(journey: Journey) -> str:
    ref, first = journey.reference, journey.runs[0]
    columns = [*journey.benchmarks, "avg"]

    def value(summary, col):
        return summary.avg if col == "avg" else summary.taus.get(col)

    rows = [["gap (reference - " + first.name + ")",
             *[_f(None if value(ref, c) is None or value(first, c) is None else value(ref, c) - value(first, c))
               for c in columns]]]
    for run in journey.runs:
        cells = []
        for col in columns:
            r, f0, rf = value(run, col), value(first, col), value(ref, col)
            if r is None or f0 is None or rf is None:
                cells.append("-")
                continue
            frac = closed_fraction(f0, r, rf)
            cells.append(f"{r - rf:+.2f} ({'n/a' if frac is None else f'{frac:.0%}'} closed)")
        rows.append([run.name, *cells])
    return _table(["run (tau - reference, gap closed)", *columns], rows)


def gap_sentence(journey: Journey) -> str:
    ref, first, last = journey.reference, journey.runs[0], journey.runs[-1]
    if ref is None or ref.avg is None or first.avg is None or last.avg is None:
        return ""
    frac = closed_fraction(first.avg, last.avg, ref.avg)
    gap = ref.avg - first.avg
    if frac is None:
        return f"{first.name} already matches {ref.name} on average (gap {gap:+.2f})."
    return (f"{last.name} closes {frac:.0%} of the {gap:.2f}-point gap between {first.name} ({first.avg:.2f}) "
            f"and {ref.name} ({ref.avg:.2f}); it remains {ref.avg - last.avg:.2f} below.")


def best_checkpoint_table(journey: Journey) -> str:
    rows = []
    for run in journey.runs + ([journey.reference] if journey.reference else []):
        per_bench = ", ".join(f"{b}: {lb} ({v:.2f})" for b, (lb, v) in run.best_per_benchmark.items())
        all_ckpts = "; ".join(f"{lb} {sum(v.values()) / len(v):.2f}" for lb, v in run.per_checkpoint.items())
        rows.append([run.name, run.best_label or "-", _f(run.avg), per_bench or "-", all_ckpts or "-"])
    return _table(["run", "best (avg)", "avg", "best per benchmark", "every checkpoint (avg)"], rows)


def baseline_table(journey: Journey) -> str:
    bench = journey.benchmarks
    rows = []
    lookup = journey.baselines.get("prompt-lookup")
    if lookup and lookup.taus:
        rows.append(["prompt-lookup tau", *[_f(lookup.taus.get(b)) for b in bench], _f(lookup.avg)])
    # target-only tokens/s: the baseline run, else the greedy side of the lossless checks
    greedy: dict[str, float] = dict(journey.baselines["target-only"].tokens_per_s) if "target-only" in journey.baselines else {}
    for run in journey.runs:
        for b, v in run.greedy_tokens_per_s.items():
            greedy.setdefault(b, v)
    if greedy:
        rows.append(["target-only tokens/s (plain greedy)", *[_f(greedy.get(b), 1) for b in bench], ""])
    for run in journey.runs + ([journey.reference] if journey.reference else []):
        if run.tokens_per_s:
            cells = []
            for b in bench:
                spec, base = run.tokens_per_s.get(b), greedy.get(b)
                cells.append("-" if spec is None else f"{spec:.1f}" + (f" ({spec / base:.2f}x)" if base else ""))
            rows.append([f"{run.name} tokens/s (x target-only)", *cells, ""])
    if not rows:
        return "(no baselines recorded: evaluate with --drafter prompt-lookup and --drafter none)"
    return _table(["baseline", *bench, "avg"], rows)


# -- charts ---------------------------------------------------------------------------------------
def histogram_bars(named: list[tuple[str, dict[str, int]]]) -> list[tuple[str, list[float], list[float], float]]:
    """Grouped bars of acceptance-length histograms: per run (name, x positions, fractions of its
    cycles, bar width), one bar per length 1..max (lengths never reached are 0-high bars), the runs
    side by side within each length."""
    if not named:
        return []
    top = max(int(k) for _, hist in named for k in hist)
    width = 0.8 / len(named)
    bars = []
    for i, (name, hist) in enumerate(named):
        total = sum(hist.values()) or 1
        xs = [k - 0.4 + width * (i + 0.5) for k in range(1, top + 1)]
        bars.append((name, xs, [hist.get(str(k), 0) / total for k in range(1, top + 1)], width))
    return bars


def _charts(journey: Journey, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    series = journey.runs + ([journey.reference] if journey.reference else [])
    lookup = journey.baselines.get("prompt-lookup")
    if lookup and len(lookup.taus) == len(journey.benchmarks):
        series = series + [lookup]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(journey.benchmarks), 4))
    width = 0.8 / max(len(series), 1)
    for i, run in enumerate(series):
        xs = [j + i * width - 0.4 + width / 2 for j in range(len(journey.benchmarks))]
        ax.bar(xs, [run.taus.get(b, 0) for b in journey.benchmarks], width, label=run.name)
    ax.set_xticks(range(len(journey.benchmarks)), journey.benchmarks)
    ax.set_ylabel(journey.metric.replace("_", " "))
    ax.set_title("tau per benchmark")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "tau_per_benchmark.png", dpi=110)
    plt.close(fig)
    written.append("tau_per_benchmark.png")

    with_hist = [b for b in journey.benchmarks if any(b in run.histograms for run in series)]
    if with_hist:
        fig, axes = plt.subplots(1, len(with_hist), figsize=(3.2 * len(with_hist), 3), squeeze=False)
        for ax, bench in zip(axes[0], with_hist):
            named = [(run.name, run.histograms[bench]) for run in series if run.histograms.get(bench)]
            for name, xs, heights, width in histogram_bars(named):
                ax.bar(xs, heights, width, label=name)
            ax.set_title(bench)
            ax.set_xlabel("acceptance length a+1")
        axes[0][0].set_ylabel("fraction of cycles")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "acceptance_lengths.png", dpi=110)
        plt.close(fig)
        written.append("acceptance_lengths.png")
    return written


def write_report(runs, reference: str | None, out_dir, db=registry.DEFAULT_DB, baselines: bool = True, *,
                 benchmarks: list[str] | None = None, metric: str = "tau_pooled") -> Path:
    """Write `out_dir/report.md` and its charts; returns the report path."""
    runs = [r.strip() for r in (runs.split(",") if isinstance(runs, str) else runs) if r.strip()]
    journey = collect(runs, reference, db, benchmarks=benchmarks, metric=metric, baselines=baselines)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = _charts(journey, out_dir)
    settings = _global(journey.settings[journey.benchmarks[0]])
    parts = [
        "# DFlash journey report",
        "",
        f"Metric: `{metric}` of each run's best checkpoint (by average over the benchmarks). "
        "Harness settings (the same for every number below): "
        + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".",
        "",
        "## Progression",
        "",
        progression_table(journey=journey),
        "",
    ]
    if journey.reference is not None:
        parts += [f"## Gap to the reference {journey.reference.name}", "", gap_table(journey), "",
                  gap_sentence(journey), ""]
    parts += ["## Best checkpoints", "", best_checkpoint_table(journey), ""]
    if baselines:
        parts += ["## Baselines", "", baseline_table(journey), ""]
    parts += ["## Charts", ""] + [f"![{name}]({name})" for name in charts] + [""]
    path = out_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
