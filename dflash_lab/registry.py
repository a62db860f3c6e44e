"""The run registry: one SQLite file (default `./dflash-lab.db`) that remembers

    runs         training runs (name, recipe, parent checkpoint of a warm start, data manifest hash,
                 loss, schedule), reference drafts (kind "reference", e.g. z-lab-m0) and baselines
                 (kind "baseline": prompt-lookup, target-only)
    checkpoints  every saved checkpoint of a run (path, step, epoch, sha256 of the weights)
    results      one row per checkpoint x benchmark x harness settings (tau_pooled,
                 tau_per_request, cycles, histogram, throughput, ...)

Lineage: a run's `parent` is the checkpoint directory it warm-started from; the parent run is the
run owning that checkpoint (matched by path, else by weights sha256). Everything is idempotent:
registering a run or an eval again updates the rows in place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from dflash_lab.errors import DFlashLabError

DEFAULT_DB = "dflash-lab.db"
BASELINE_RUNS = {"prompt-lookup": "prompt-lookup", "none": "target-only"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL DEFAULT 'training',   -- training | reference | baseline
    run_dir TEXT,
    recipe_json TEXT,
    recipe_path TEXT,
    parent TEXT,                              -- warm-start checkpoint directory (or null)
    data_path TEXT,
    data_manifest_sha256 TEXT,
    loss TEXT,
    schedule_json TEXT,
    target_json TEXT,
    status TEXT,
    created TEXT,
    registered TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    label TEXT NOT NULL,                      -- step-<N> | final | reference | prompt-lookup | none
    path TEXT,
    step INTEGER,
    epoch REAL,
    sha256 TEXT,
    metrics_json TEXT,
    UNIQUE(run_id, label)
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints(id),
    benchmark TEXT NOT NULL,
    settings_key TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    tau_pooled REAL,
    tau_per_request REAL,
    cycles INTEGER,
    generated_tokens INTEGER,
    histogram_json TEXT,
    lossless INTEGER,
    wall_s REAL,
    tokens_per_s REAL,
    greedy_tokens_per_s REAL,
    block_size INTEGER,
    num_samples INTEGER,
    results_path TEXT,
    created TEXT,
    UNIQUE(checkpoint_id, benchmark, settings_key)
);
"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def connect(db: str | os.PathLike = DEFAULT_DB):
    """A connection with the schema in place; commits on success."""
    path = Path(db).expanduser()
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(str(path), timeout=30)
    except sqlite3.Error as exc:
        raise DFlashLabError(f"registry {path}: cannot open ({exc}); pass --db with a writable path") from exc
    con.row_factory = sqlite3.Row
    try:
        con.executescript(SCHEMA)
        yield con
        con.commit()
    except sqlite3.DatabaseError as exc:
        raise DFlashLabError(f"registry {path}: {exc}; is it a dflash-lab database?") from exc
    finally:
        con.close()


def _upsert_run(con, name: str, kind: str, **fields) -> int:
    row = con.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
    fields = {k: v for k, v in fields.items()}
    if row is None:
        cols = ["name", "kind", "registered", *fields]
        con.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [name, kind, _now(), *fields.values()])
        return int(con.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()[0])
    if fields:
        con.execute(f"UPDATE runs SET kind = ?, {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                    [kind, *fields.values(), row[0]])
    return int(row[0])


def _upsert_checkpoint(con, run_id: int, label: str, path: str | None, step=None, epoch=None, sha256=None,
                       metrics=None) -> int:
    con.execute(
        "INSERT INTO checkpoints (run_id, label, path, step, epoch, sha256, metrics_json) VALUES (?,?,?,?,?,?,?) "
        "ON CONFLICT(run_id, label) DO UPDATE SET path=excluded.path, step=excluded.step, epoch=excluded.epoch, "
        "sha256=excluded.sha256, metrics_json=excluded.metrics_json",
        (run_id, label, path, step, epoch, sha256, json.dumps(metrics) if metrics is not None else None),
    )
    return int(con.execute("SELECT id FROM checkpoints WHERE run_id = ? AND label = ?", (run_id, label)).fetchone()[0])


def _j(value):
    return json.dumps(value) if value is not None else None


def _step_of(label: str) -> int | None:
    match = re.fullmatch(r"step-(\d+)", label)
    return int(match.group(1)) if match else None


def register_run(run_dir: str | os.PathLike, db: str | os.PathLike = DEFAULT_DB) -> int:
    """Record a training run directory (its run.json and every checkpoint under checkpoints/).
    Idempotent; returns the run id."""
    from dflash_lab.models.checkpoint import checkpoint_sha256

    run_dir = Path(run_dir).expanduser().resolve()
    meta_file = run_dir / "run.json"
    if not meta_file.is_file():
        raise DFlashLabError(f"run {run_dir}: no run.json; pass a training run directory (dflash-lab train --out)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise DFlashLabError(f"run {meta_file}: not valid JSON ({exc})") from exc
    name = meta.get("name") or run_dir.name
    data = meta.get("data") or {}
    loss = meta.get("loss")
    with connect(db) as con:
        run_id = _upsert_run(
            con, name, "training", run_dir=str(run_dir), recipe_json=_j(meta.get("recipe")),
            recipe_path=meta.get("recipe_path"), parent=meta.get("parent"), data_path=data.get("path"),
            data_manifest_sha256=data.get("manifest_sha256"),
            loss=loss if isinstance(loss, str) or loss is None else json.dumps(loss),
            schedule_json=_j(meta.get("schedule")), target_json=_j(meta.get("target")),
            status=meta.get("status"), created=meta.get("created"),
        )
        ckpt_root = run_dir / "checkpoints"
        for ckpt in sorted(ckpt_root.iterdir()) if ckpt_root.is_dir() else []:
            if not (ckpt / "model.safetensors").is_file() or ckpt.name.startswith(".") or ckpt.is_symlink():
                continue
            state = {}
            if (ckpt / "trainer_state.json").is_file():
                state = json.loads((ckpt / "trainer_state.json").read_text())
            step = state.get("step", _step_of(ckpt.name))
            _upsert_checkpoint(con, run_id, ckpt.name, str(ckpt.resolve()), step, state.get("epoch"),
                               checkpoint_sha256(ckpt), state.get("metrics"))
    return run_id


def register_reference(name: str, draft_dir: str | os.PathLike, db: str | os.PathLike = DEFAULT_DB) -> int:
    """Record an external draft (e.g. z-lab's) as a one-checkpoint run of kind "reference";
    returns the checkpoint id."""
    from dflash_lab.models.checkpoint import checkpoint_sha256, read_draft_config

    path = Path(draft_dir).expanduser().resolve()
    read_draft_config(path)
    with connect(db) as con:
        run_id = _upsert_run(con, name, "reference", run_dir=str(path), status="external")
        return _upsert_checkpoint(con, run_id, "reference", str(path), sha256=checkpoint_sha256(path))


def _baseline_checkpoint(con, drafter: str) -> int:
    run_id = _upsert_run(con, BASELINE_RUNS[drafter], "baseline", status="baseline")
    return _upsert_checkpoint(con, run_id, drafter, None)


def ensure_run(name: str, kind: str = "training", db: str | os.PathLike = DEFAULT_DB, *, parent: str | None = None,
               loss: str | None = None) -> int:
    """Create (or update) a run row without a run directory (notebooks, imported history)."""
    with connect(db) as con:
        return _upsert_run(con, name, kind, parent=parent, loss=loss)


def ensure_checkpoint(run_name: str, label: str, db: str | os.PathLike = DEFAULT_DB, *, path: str | None = None,
                      step: int | None = None, epoch: float | None = None, sha256: str | None = None) -> int:
    """Create (or update) a checkpoint of a registered run; returns its id."""
    with connect(db) as con:
        run = get_run(con, run_name)
        return _upsert_checkpoint(con, int(run["id"]), label, path, step, epoch, sha256)


def find_checkpoint(con, path: str | None = None, sha256: str | None = None):
    if path:
        row = con.execute("SELECT * FROM checkpoints WHERE path = ?", (str(Path(path).resolve()),)).fetchone()
        if row:
            return row
    if sha256:
        return con.execute("SELECT * FROM checkpoints WHERE sha256 = ? ORDER BY id", (sha256,)).fetchone()
    return None


def record_eval(results: dict, db: str | os.PathLike = DEFAULT_DB, *, name: str | None = None,
                checkpoint_id: int | None = None, results_path: str | None = None) -> list[int]:
    """Store the per-benchmark numbers of an `evaluate()` results dict; returns the result ids.

    The checkpoint is `checkpoint_id`, else the registered checkpoint with the draft's path or
    sha256, else a new reference run named `name` (default `draft-<sha8>`); prompt-lookup and
    none are recorded under the baseline runs "prompt-lookup" and "target-only".
    """
    with connect(db) as con:
        if checkpoint_id is None:
            drafter = results.get("drafter")
            if drafter in BASELINE_RUNS:
                checkpoint_id = _baseline_checkpoint(con, drafter)
            else:
                draft = results.get("draft") or {}
                row = find_checkpoint(con, draft.get("path"), draft.get("sha256"))
                if name is not None:  # the named run owns this draft
                    named = con.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
                    if named is None:
                        row = None
                    else:
                        row = con.execute("SELECT * FROM checkpoints WHERE run_id = ? AND sha256 = ?",
                                          (named[0], draft.get("sha256"))).fetchone()
                        if row is None:
                            row = {"id": _upsert_checkpoint(con, named[0], "reference", draft.get("path"),
                                                            sha256=draft.get("sha256"))}
                if row is None:
                    run_name = name or f"draft-{(draft.get('sha256') or 'unknown')[:8]}"
                    run_id = _upsert_run(con, run_name, "reference", run_dir=draft.get("path"), status="external")
                    checkpoint_id = _upsert_checkpoint(con, run_id, "reference", draft.get("path"),
                                                       sha256=draft.get("sha256"))
                else:
                    checkpoint_id = int(row["id"])
        ids = []
        for bench_name, bench in results["benchmarks"].items():
            lossless = bench.get("lossless")
            con.execute(
                "INSERT INTO results (checkpoint_id, benchmark, settings_key, settings_json, tau_pooled, "
                "tau_per_request, cycles, generated_tokens, histogram_json, lossless, wall_s, tokens_per_s, "
                "greedy_tokens_per_s, block_size, num_samples, results_path, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(checkpoint_id, benchmark, settings_key) DO UPDATE SET "
                "tau_pooled=excluded.tau_pooled, tau_per_request=excluded.tau_per_request, cycles=excluded.cycles, "
                "generated_tokens=excluded.generated_tokens, histogram_json=excluded.histogram_json, "
                "lossless=excluded.lossless, wall_s=excluded.wall_s, tokens_per_s=excluded.tokens_per_s, "
                "greedy_tokens_per_s=excluded.greedy_tokens_per_s, block_size=excluded.block_size, "
                "num_samples=excluded.num_samples, results_path=excluded.results_path, created=excluded.created",
                (checkpoint_id, bench_name, bench["settings_key"], json.dumps(bench["settings"], sort_keys=True),
                 bench.get("tau_pooled"), bench.get("tau_per_request"), bench.get("cycles"),
                 bench.get("generated_tokens"), _j(bench.get("acceptance_histogram")),
                 None if lossless is None else int(bool(lossless)), bench.get("wall_s"), bench.get("tokens_per_s"),
                 bench.get("greedy_tokens_per_s"), results.get("block_size"), bench.get("num_samples"),
                 results_path, results.get("created") or _now()),
            )
            ids.append(int(con.execute(
                "SELECT id FROM results WHERE checkpoint_id = ? AND benchmark = ? AND settings_key = ?",
                (checkpoint_id, bench_name, bench["settings_key"])).fetchone()[0]))
    return ids


# -- queries --------------------------------------------------------------------------------------
def get_run(con, name: str):
    row = con.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
    if row is None:
        known = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY id")]
        raise DFlashLabError(f"no run named {name!r} in the registry; known runs: {', '.join(known) or '(none)'}")
    return row


def list_runs(db: str | os.PathLike = DEFAULT_DB) -> list[dict]:
    with connect(db) as con:
        rows = con.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id) AS num_checkpoints, "
            "(SELECT COUNT(*) FROM results x JOIN checkpoints c ON x.checkpoint_id = c.id WHERE c.run_id = r.id) "
            "AS num_results FROM runs r ORDER BY r.id").fetchall()
        return [dict(r) for r in rows]


def checkpoints_of(con, run_id: int) -> list[dict]:
    rows = con.execute("SELECT * FROM checkpoints WHERE run_id = ?", (run_id,)).fetchall()
    # step order, final last
    return sorted((dict(r) for r in rows), key=lambda r: (r["label"] == "final", r["step"] or 0, r["label"]))


def results_of(con, checkpoint_id: int, settings_key: str | None = None) -> list[dict]:
    query = "SELECT * FROM results WHERE checkpoint_id = ?"
    args: list = [checkpoint_id]
    if settings_key:
        query += " AND settings_key = ?"
        args.append(settings_key)
    rows = [dict(r) for r in con.execute(query + " ORDER BY id", args)]
    for r in rows:
        r["settings"] = json.loads(r["settings_json"])
        r["acceptance_histogram"] = json.loads(r["histogram_json"]) if r["histogram_json"] else None
    return rows


def lineage(name: str, db: str | os.PathLike = DEFAULT_DB) -> list[dict]:
    """The run and its ancestors, newest first: each entry `{"run", "parent_checkpoint", "parent_label"}`.
    A parent that is not a registered checkpoint ends the chain (its path is still shown)."""
    chain = []
    seen = set()
    with connect(db) as con:
        run = get_run(con, name)
        while run is not None and run["id"] not in seen:
            seen.add(run["id"])
            entry = {"run": run["name"], "parent_checkpoint": run["parent"], "parent_label": None}
            chain.append(entry)
            parent = None
            if run["parent"]:
                ckpt = find_checkpoint(con, run["parent"])
                if ckpt is None and Path(run["parent"]).is_dir() and (Path(run["parent"]) / "model.safetensors").exists():
                    from dflash_lab.models.checkpoint import checkpoint_sha256

                    ckpt = find_checkpoint(con, None, checkpoint_sha256(run["parent"]))
                if ckpt is not None:
                    parent = con.execute("SELECT * FROM runs WHERE id = ?", (ckpt["run_id"],)).fetchone()
                    entry["parent_label"] = f"{parent['name']}/{ckpt['label']}"
            run = parent
    return chain


def show_run(name: str, db: str | os.PathLike = DEFAULT_DB) -> dict:
    """Everything known about a run: its row, lineage, checkpoints and their results."""
    chain = lineage(name, db)
    with connect(db) as con:
        run = dict(get_run(con, name))
        ckpts = checkpoints_of(con, run["id"])
        for ckpt in ckpts:
            ckpt["results"] = results_of(con, ckpt["id"])
    for key in ("recipe_json", "schedule_json", "target_json"):
        if run.get(key):
            run[key.removesuffix("_json")] = json.loads(run.pop(key))
    return {"run": run, "lineage": chain, "checkpoints": ckpts}
