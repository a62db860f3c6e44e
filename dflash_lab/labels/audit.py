"""`dflash-lab labels audit DIR`: what the labels look like, per category.

Per category (and "all"): samples, mean and median response tokens, the length-capped fraction
(finish_reason == "length"), mean LaTeX markers per response, the fraction with `\\boxed{`, and the
fraction with a fenced code block. Written to DIR/audit.md and DIR/audit.json.

LaTeX markers: the substrings in LATEX_MARKERS, each occurrence counted (non-overlapping, per marker;
a `$$` counts as two `$`). The seed's audit of Qwen3-4B math labels read a mean of ~1,716 tokens,
~85 markers, 78.8% `\\boxed`, ~22% length-capped.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from dflash_lab.errors import DFlashLabError

LATEX_MARKERS = (
    "\\frac", "\\dfrac", "\\tfrac", "\\(", "\\)", "\\[", "\\]", "$", "\\boxed", "\\cdot", "\\times", "\\sqrt",
    "^{", "_{", "\\left", "\\right", "\\begin{", "\\end{", "\\sum", "\\int", "\\pi", "\\leq", "\\geq", "\\neq",
    "\\text{",
)
FENCE_RE = re.compile(r"^[ \t]*```", re.MULTILINE)


def latex_markers(text: str) -> int:
    return sum(text.count(marker) for marker in LATEX_MARKERS)


def has_code_fence(text: str) -> bool:
    return FENCE_RE.search(text) is not None


def _summary(rows: list[dict]) -> dict:
    tokens = [r["response_tokens"] for r in rows]
    texts = [r["messages"][-1]["content"] for r in rows]
    n = len(rows)
    return {
        "samples": n,
        "mean_response_tokens": round(statistics.fmean(tokens), 1) if n else 0.0,
        "median_response_tokens": float(statistics.median(tokens)) if n else 0.0,
        "length_capped_fraction": round(sum(r["finish_reason"] == "length" for r in rows) / n, 4) if n else 0.0,
        "mean_latex_markers": round(statistics.fmean(latex_markers(t) for t in texts), 2) if n else 0.0,
        "boxed_fraction": round(sum("\\boxed{" in t for t in texts) / n, 4) if n else 0.0,
        "code_fence_fraction": round(sum(has_code_fence(t) for t in texts) / n, 4) if n else 0.0,
    }


def audit_labels(out_dir: str | Path, write: bool = True) -> dict:
    """Compute the audit of a labelled dataset directory; write audit.md/audit.json when `write`."""
    from dflash_lab.labels.runner import atomic_write, iter_records, read_jsonl_tolerant, read_label_meta

    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise DFlashLabError(f"{out_dir}: not a directory; point at a directory written by `dflash-lab label`")
    meta = read_label_meta(out_dir)
    if meta is None:
        raise DFlashLabError(f"{out_dir}: no meta.json; point at a directory written by `dflash-lab label`")
    by_category: dict[str, list[dict]] = {}
    everything = []
    for record in iter_records(out_dir):
        by_category.setdefault(record.get("category", "chat"), []).append(record)
        everything.append(record)
    report = {
        "dir": str(out_dir),
        "target": meta.get("target"),
        "max_new_tokens": meta.get("max_new_tokens"),
        "failed": len(read_jsonl_tolerant(out_dir / "failed.jsonl")),
        "latex_markers": list(LATEX_MARKERS),
        "categories": {name: _summary(rows) for name, rows in sorted(by_category.items())},
        "all": _summary(everything),
    }
    if write:
        atomic_write(out_dir / "audit.json", json.dumps(report, indent=2) + "\n")
        atomic_write(out_dir / "audit.md", format_audit(report))
    return report


def format_audit(report: dict) -> str:
    header = ["category", "samples", "mean tok", "median tok", "capped", "LaTeX/resp", "\\boxed", "code fence"]
    lines = [f"# Label audit: {report['dir']}", "",
             f"target {(report.get('target') or {}).get('name')}, max_new_tokens {report.get('max_new_tokens')}, "
             f"failed prompts {report['failed']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in [*report["categories"].items(), ("all", report["all"])]:
        lines.append(
            f"| {name} | {s['samples']} | {s['mean_response_tokens']:.1f} | {s['median_response_tokens']:.1f} | "
            f"{s['length_capped_fraction']:.1%} | {s['mean_latex_markers']:.1f} | {s['boxed_fraction']:.1%} | "
            f"{s['code_fence_fraction']:.1%} |")
    lines += ["", "LaTeX markers counted: " + " ".join(f"`{m}`" for m in report["latex_markers"]), ""]
    return "\n".join(lines)
