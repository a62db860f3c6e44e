"""manifest.json of a prompt set, its id list (ids.txt), and the `prompts stats` table.

The manifest points at ``ids.txt`` (sorted unique ids, one per line, beside it) by relative path
with its sha256; ``load_manifest_ids`` verifies the hash and loads 300K ids in well under a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dflash_lab.data.records import AtomicWriter, atomic_write_text
from dflash_lab.errors import DFlashLabError

MANIFEST_NAME = "manifest.json"
IDS_NAME = "ids.txt"
MANIFEST_VERSION = 1


def write_ids(out_dir: Path, ids) -> dict:
    data = "".join(f"{i}\n" for i in sorted(set(ids))).encode("ascii")
    with AtomicWriter(out_dir / IDS_NAME, "wb") as fh:
        fh.write(data)
    return {"path": IDS_NAME, "count": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
    return path


def _manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path: str | Path) -> dict:
    """A manifest.json (or the folder holding one)."""
    p = _manifest_path(path)
    if not p.is_file():
        raise DFlashLabError(f"manifest {p} not found; pass a prompt set folder or its manifest.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DFlashLabError(f"manifest {p} is not valid JSON ({exc}); rebuild the prompt set") from None
    if not isinstance(data, dict) or "ids" not in data:
        raise DFlashLabError(f"{p} is not a dflash-lab prompts manifest (no `ids` entry)")
    return data


def load_manifest_ids(path: str | Path) -> set[str]:
    """The set of ids a prompt set emitted (checks the id file's sha256)."""
    p = _manifest_path(path)
    man = load_manifest(p)
    ref = man["ids"]
    ids_path = p.parent / ref["path"]
    if not ids_path.is_file():
        raise DFlashLabError(f"{p} points at {ids_path}, which is missing; copy it beside the manifest")
    data = ids_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise DFlashLabError(f"{ids_path} does not match the sha256 in {p}; it was changed after the build")
    return set(data.decode("ascii").split())


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


REASONS = ("rejected", "filtered", "excluded", "duplicate", "contaminated", "not_sampled")


def format_stats(manifest: dict) -> str:
    c = manifest["counts"]
    out = [
        f"prompt set: {manifest.get('name') or '-'}  ({manifest.get('kind', 'mix')}, seed {manifest.get('seed')})",
        f"output: {manifest['output']['path']}  rows {manifest['output']['rows']}  sha256 {manifest['output']['sha256'][:16]}...",
        f"read {c['read']}  kept {c['kept']}  removed {sum(c['removed'].values())}"
        + (f"  (+{c['upsampled']} repeated rows)" if c.get("upsampled") else ""),
        "",
        _table([[k, v] for k, v in sorted(c["by_category"].items())], ["category", "rows"]),
        "",
    ]
    rows = []
    for name, s in manifest.get("sources", {}).items():
        rows.append([name, s.get("category", "-"), s["read"]] + [s.get(r, 0) for r in REASONS] + [s["kept"]])
    if rows:
        out += [_table(rows, ["source", "category", "read", *REASONS, "kept"]), ""]
    dec = manifest.get("decontamination")
    if dec:
        out.append(f"decontamination: {dec['ngram']}-grams, threshold {dec['threshold']}")
        brow = [[b, d["texts"], d["removed"]] for b, d in dec["benchmarks"].items()]
        out += [_table(brow, ["benchmark", "texts", "removed"]), ""]
    return "\n".join(out).rstrip() + "\n"
