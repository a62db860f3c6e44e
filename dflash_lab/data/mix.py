"""`prompts build`: read sources, filter, dedup, subtract earlier sets, decontaminate, sample quotas.

Pipeline per prompt (the first rule that fires removes it, and is counted under that reason):
reject (malformed row) -> filtered (source filters) -> excluded (id in an `exclude` manifest) ->
duplicate (id already seen `repeat_cap` times) -> contaminated (decontam.py) -> candidate.
Candidates are then sampled per quota (the rest is `not_sampled`). For every source
``read == rejected + filtered + excluded + duplicate + contaminated + not_sampled + kept``.

Sampling is seeded and independent of input order: each candidate gets the key
``blake2b(seed:id:occurrence)``; a quota of n takes the n smallest keys of its pool, and the output
is written in key order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dflash_lab.data import sources as S
from dflash_lab.data.decontam import Decontaminator, Hit, load_bench_dir, load_extra_file
from dflash_lab.data.manifest import (
    IDS_NAME, MANIFEST_NAME, MANIFEST_VERSION, load_manifest_ids, write_ids, write_manifest,
)
from dflash_lab.data.recipe import Recipe, load_recipe, parse_recipe, resolve_path
from dflash_lab.data.records import (
    CATEGORIES, AtomicWriter, canonical_line, prompt_id, sha256_file, write_jsonl,
)
from dflash_lab.data.shaping import shape_code
from dflash_lab.errors import DFlashLabError
from dflash_lab.outputs import check_not_input

PROMPTS_JSONL = "prompts.jsonl"
PROMPTS_PARQUET = "prompts.parquet"
REJECTS_NAME = "rejects.jsonl"
N_EXAMPLES = 3


def sample_key(seed: int, pid: str, occ: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{pid}:{occ}".encode(), digest_size=8).digest(), "big")


# ------------------------------------------------------------------------------------------ filters


def make_filter(f):
    """A function (text, tag, difficulty) -> reason or None for a Filters block (None if empty)."""
    checks = []
    if f.tags is not None:
        keep = {str(t) for t in f.tags}
        checks.append(lambda t, tag, d: None if tag is not None and str(tag) in keep else "tag")
    if f.exclude_tags is not None:
        drop = {str(t) for t in f.exclude_tags}
        checks.append(lambda t, tag, d: "tag" if tag is not None and str(tag) in drop else None)
    if f.min_chars is not None or f.max_chars is not None:
        lo = f.min_chars or 0
        hi = f.max_chars if f.max_chars is not None else float("inf")
        checks.append(lambda t, tag, d: None if lo <= len(t) <= hi else "length")
    if f.regex is not None:
        rx = re.compile(f.regex)
        checks.append(lambda t, tag, d: None if rx.search(t) else "regex")
    if f.exclude_regex is not None:
        xr = re.compile(f.exclude_regex)
        checks.append(lambda t, tag, d: "regex" if xr.search(t) else None)
    if f.difficulty_in is not None:
        allowed = {str(v) for v in f.difficulty_in}
        checks.append(lambda t, tag, d: None if d is not None and str(d) in allowed else "difficulty")
    if f.min_difficulty is not None or f.max_difficulty is not None:
        dlo = f.min_difficulty if f.min_difficulty is not None else float("-inf")
        dhi = f.max_difficulty if f.max_difficulty is not None else float("inf")

        def diff_range(t, tag, d):
            try:
                return None if dlo <= float(d) <= dhi else "difficulty"
            except (TypeError, ValueError):
                return "difficulty"

        checks.append(diff_range)
    if not checks:
        return None

    def run(text, tag, diff):
        for c in checks:
            r = c(text, tag, diff)
            if r:
                return r
        return None

    return run


# ------------------------------------------------------------------------------------------ reading


@dataclass
class SourceStats:
    category: str
    read: int = 0
    rejected: int = 0
    filtered: int = 0
    filtered_by: dict = field(default_factory=dict)
    excluded: int = 0
    duplicate: int = 0
    contaminated: int = 0
    not_sampled: int = 0
    kept: int = 0
    upsampled: int = 0

    def as_dict(self):
        d = dict(self.__dict__)
        if not d["filtered_by"]:
            d.pop("filtered_by")
        return d


def _iter_items(spec, base_dir: Path, rejects: S.RejectLog):
    """Yield (text, tag, difficulty); text None means 'filtered' with the reason in tag."""
    name = spec.name
    if spec.hf is not None:
        file_label = f"hf:{spec.hf.dataset}" + (f"/{spec.hf.config}" if spec.hf.config else "") + f":{spec.hf.split}"
        path = None
    else:
        path = resolve_path(spec.path, base_dir)
        S.require_exists(path, name)
        file_label = str(path)

    if spec.shape == "function-completion" and spec.code_field is None:
        from dflash_lab.data.shaping import iter_python_files

        for n_files, f in enumerate(iter_python_files(path)):
            if spec.limit is not None and n_files >= spec.limit:
                break
            try:
                code = f.read_bytes().decode("utf-8")
                prompts = shape_code(code)
            except UnicodeDecodeError as exc:
                rejects.add(name, str(f), None, f"invalid UTF-8 at byte {exc.start}")
                yield S.RowError, None, None
                continue
            except (SyntaxError, ValueError, RecursionError) as exc:
                rejects.add(name, str(f), getattr(exc, "lineno", None), f"Python does not parse ({exc.__class__.__name__})")
                yield S.RowError, None, None
                continue
            if not prompts:
                yield None, "no_documented_function", None
            for p in prompts:
                yield p, None, None
        return

    extract = S.RowExtractor(spec)

    pending = []  # rows the reader itself rejected (bad JSON, invalid UTF-8)

    def on_error(line, reason):
        rejects.add(name, file_label, line, reason)

    def reader_error(line, reason):
        on_error(line, reason)
        pending.append(line)

    n = 0
    for line, row in S.iter_rows(spec, path, reader_error):
        while pending:
            pending.pop()
            yield S.RowError, None, None
        pass_reject = False
        if spec.limit is not None and n >= spec.limit:
            break
        n += 1
        if spec.shape == "function-completion":
            try:
                code = S._as_text(S._get_field(row, spec.code_field) if isinstance(row, dict) else None, f"field {spec.code_field!r}")
                prompts = shape_code(code, min_doc_chars=20)
            except S.RowError as exc:
                on_error(line, str(exc))
                pass_reject = True
            except (SyntaxError, ValueError, RecursionError) as exc:
                on_error(line, f"code does not parse ({exc.__class__.__name__})")
                pass_reject = True
            if pass_reject:
                yield S.RowError, None, None
                continue
            if not prompts:
                yield None, "no_documented_function", None
            tag = row.get(spec.tag_field) if spec.tag_field else None
            for p in prompts:
                yield p, tag, None
            continue
        try:
            text, tag, diff = extract(row)
        except S.RowError as exc:
            on_error(line, str(exc))
            yield S.RowError, None, None
            continue
        yield text, tag, diff
    while pending:
        pending.pop()
        yield S.RowError, None, None


# ------------------------------------------------------------------------------------------ parallel jsonl

PARALLEL_MIN_BYTES = 16 << 20
CHUNK_BYTES = 4 << 20
_W: dict = {}  # worker state, inherited through fork


def _chunks(path: Path, size: int) -> list[tuple[int, int]]:
    bounds = [0]
    total = path.stat().st_size
    with open(path, "rb") as fh:
        while bounds[-1] + size < total:
            fh.seek(bounds[-1] + size)
            fh.readline()
            pos = fh.tell()
            if pos >= total:
                break
            bounds.append(pos)
    bounds.append(total)
    return list(zip(bounds[:-1], bounds[1:]))


def _scan_chunk(rng: tuple[int, int]):
    """Worker: parse, extract, filter, hash and decontaminate one byte range of a jsonl file."""
    spec, path, dec, filt, seed = _W["spec"], _W["path"], _W["dec"], _W["filt"], _W["seed"]
    extract = S.RowExtractor(spec)
    out = []
    loads = json.loads
    with open(path, "rb") as fh:
        fh.seek(rng[0])
        data = fh.read(rng[1] - rng[0])
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append((0, i, f"invalid UTF-8 at byte {exc.start}"))
            continue
        except ValueError as exc:
            out.append((0, i, f"bad JSON ({exc.msg})"))
            continue
        try:
            text, tag, diff = extract(row)
        except S.RowError as exc:
            out.append((0, i, str(exc)))
            continue
        if filt is not None:
            why = filt(text, tag, diff)
            if why:
                out.append((1, i, why))
                continue
        pid = prompt_id(text)
        hit = dec.check(text, pid) if dec is not None else None
        out.append((2, i, text, pid, None if hit is None else (hit.benchmark, hit.rule), sample_key(seed, pid, 0)))
    return len(lines), out


def _iter_items_parallel(spec, path: Path, rejects: S.RejectLog, dec, workers: int, seed: int):
    """Like _iter_items for a big jsonl file, with the per-row work spread over processes."""
    import multiprocessing as mp

    from tqdm import tqdm

    _W.update(spec=spec, path=str(path), dec=dec, filt=make_filter(spec.filters), seed=seed)
    ranges = _chunks(path, CHUNK_BYTES)
    line0 = 0
    try:
        with mp.get_context("fork").Pool(workers) as pool, tqdm(
            total=len(ranges), desc=path.name, unit="chunk", disable=None, leave=False
        ) as bar:
            for n_lines, out in pool.imap(_scan_chunk, ranges):
                for item in out:
                    kind = item[0]
                    if kind == 2:
                        yield item[2], None, None, item[3], item[4], item[5]
                    elif kind == 1:
                        yield None, item[2], None, None, None, None
                    else:
                        rejects.add(spec.name, str(path), line0 + item[1] + 1, item[2])
                        yield S.RowError, None, None, None, None, None
                line0 += n_lines
                bar.update(1)
    finally:
        _W.clear()


# ------------------------------------------------------------------------------------------ sampling


def _resolve(q, base: int | None, pool: int) -> int:
    if isinstance(q, float):
        return int(round(q * (base if base is not None else pool)))
    return int(q)


class _Sampler:
    def __init__(self, recipe: Recipe, pools: dict, stats: dict):
        self.r = recipe
        self.pools = pools  # source -> list of (key, pid, occ, text), sorted by key
        self.stats = stats
        self.shortfalls = []
        self.picked: dict[str, list] = {}  # source -> picked entries (incl. upsampled copies)

    def _take(self, entries: list, n: int, what: str) -> list:
        if n <= len(entries):
            return entries[:n]
        got = list(entries)
        if self.r.upsample and self.r.repeat_cap > 1 and entries:
            counts: dict[str, int] = {}
            for e in entries:
                counts[e[1]] = counts.get(e[1], 0) + 1
            uniq = []
            seen = set()
            for e in entries:
                if e[1] not in seen:
                    seen.add(e[1])
                    uniq.append(e)
            progressed = True
            while len(got) < n and progressed:
                progressed = False
                for e in uniq:
                    if len(got) >= n:
                        break
                    c = counts[e[1]]
                    if c < self.r.repeat_cap:
                        counts[e[1]] = c + 1
                        got.append((e[0], e[1], c, e[3], e[4], True))  # an upsampled copy
                        progressed = True
        if len(got) < n:
            if not self.r.allow_shortfall:
                extra = f" (each repeated at most repeat_cap={self.r.repeat_cap} times)" if self.r.upsample else ""
                raise DFlashLabError(
                    f"quota for {what} asks for {n} prompts but the sources hold {len(got)}{extra} after filters, "
                    "dedup, exclusion and decontamination; lower the quota or set `allow_shortfall: true` in the recipe"
                )
            self.shortfalls.append({"quota": what, "asked": n, "got": len(got)})
        return got

    def _allocate(self, srcs: list, n_group: int | None, what: str) -> None:
        qs = self.r.quotas.sources
        fixed = [s for s in srcs if s in qs]
        free = [s for s in srcs if s not in qs]
        used = 0
        for s in fixed:
            n_s = _resolve(qs[s], n_group, len(self.pools[s]))
            self.picked[s] = self._take(self.pools[s], n_s, f"source {s!r}")
            used += n_s
        if n_group is None:
            for s in free:
                self.picked[s] = list(self.pools[s])
            return
        rest = n_group - used
        if rest < 0:
            raise DFlashLabError(
                f"the source quotas of {what} add up to {used}, more than its quota {n_group}; fix quotas in the recipe"
            )
        if not free:
            if rest > 0:
                if not self.r.allow_shortfall:
                    raise DFlashLabError(
                        f"quota for {what} is {n_group} but its sources all have quotas adding up to {used}; "
                        "give one source no quota, or make the numbers agree"
                    )
                self.shortfalls.append({"quota": what, "asked": n_group, "got": used})
            return
        merged = sorted((e for s in free for e in self.pools[s]), key=lambda e: e[0])
        got = self._take(merged, rest, what + (f" (sources {', '.join(free)})" if len(free) > 1 else ""))
        for s in free:
            self.picked[s] = []
        for e in got:
            self.picked[e[4]].append(e)

    def run(self, by_cat: dict[str, list[str]]) -> None:
        q = self.r.quotas
        total = q.total
        listed = [c for c in CATEGORIES if c in q.categories and c in by_cat]
        for c in q.categories:
            if c not in by_cat and _resolve(q.categories[c], total, 0) > 0 and not self.r.allow_shortfall:
                raise DFlashLabError(f"quota for category {c!r} but no source has category {c!r}; add a source or drop the quota")
        used = 0
        for c in listed:
            pool_size = sum(len(self.pools[s]) for s in by_cat[c])
            n_c = _resolve(q.categories[c], total, pool_size)
            used += n_c
            self._allocate(by_cat[c], n_c, f"category {c!r}")
        rest_srcs = [s for c in CATEGORIES if c in by_cat and c not in listed for s in by_cat[c]]
        if rest_srcs:
            if total is None:
                self._allocate(rest_srcs, None, "unlisted categories")
            else:
                if total - used < 0:
                    raise DFlashLabError(f"category quotas add up to {used}, more than quotas.total {total}")
                self._allocate(rest_srcs, total - used, "the rest of quotas.total")
        elif total is not None and listed and used != total and not self.r.allow_shortfall:
            raise DFlashLabError(f"category quotas add up to {used} but quotas.total is {total}; make them agree")


# ------------------------------------------------------------------------------------------ build


def _bench_fingerprints(dec_cfg, base_dir: Path) -> list[dict]:
    from dflash_lab.data.decontam import BENCH_FILES, BENCHMARKS

    out = []
    if dec_cfg.bench_dir:
        bdir = resolve_path(dec_cfg.bench_dir, base_dir)
        for b in dec_cfg.benchmarks or BENCHMARKS:
            out.append(S.fingerprint_path(bdir / BENCH_FILES[b]))
    for f in dec_cfg.extra_files:
        out.append(S.fingerprint_path(resolve_path(f, base_dir)))
    return out


def output_files(out_dir: Path) -> list[Path]:
    """Every file `build_mix` writes into `out_dir`."""
    return [out_dir / name for name in (PROMPTS_JSONL, PROMPTS_PARQUET, REJECTS_NAME, IDS_NAME, MANIFEST_NAME)]


def recipe_inputs(recipe: Recipe, base_dir: Path) -> list[Path]:
    """Every local file a recipe reads: sources, excluded manifests, decontamination files."""
    paths = [resolve_path(s.path, base_dir) for s in recipe.sources if s.path]
    for m in recipe.exclude:
        mp = resolve_path(m, base_dir)
        paths += [mp / MANIFEST_NAME, mp / IDS_NAME] if mp.is_dir() else [mp, mp.parent / IDS_NAME]
    dec = recipe.decontaminate
    if dec is not None:
        paths += [resolve_path(f, base_dir) for f in dec.extra_files]
    return paths


def build_mix(
    recipe: Recipe | dict | str | Path,
    out_dir: str | Path,
    *,
    strict: bool = False,
    base_dir: str | Path | None = None,
    bench_texts: dict[str, list[str]] | None = None,
    kind: str = "mix",
    workers: int | None = None,
) -> dict:
    """Build a prompt set from a recipe (object, dict, or YAML path) into ``out_dir``; returns the manifest.

    Writes prompts.jsonl (or prompts.parquet), rejects.jsonl, ids.txt and manifest.json, each atomically.
    Relative paths in the recipe resolve against ``base_dir`` (default: the recipe file's folder, or cwd).
    ``bench_texts`` ({benchmark: [texts]}) adds to the recipe's decontamination benchmarks.
    ``workers``: processes for big local jsonl files (default: the CPU count, at most 8; 1 = none).
    The result does not depend on it.
    """
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    recipe_path = None
    if isinstance(recipe, (str, Path)):
        recipe_path = Path(recipe)
        recipe = load_recipe(recipe_path)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    if base_dir is None:
        base_dir = recipe_path.parent if recipe_path is not None else Path.cwd()
    base_dir = Path(base_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DFlashLabError(f"--out {out_dir} exists and is not a folder; pick another path")
    check_not_input(output_files(out_dir), recipe_inputs(recipe, base_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = recipe.seed

    # exclusion ----------------------------------------------------------------------------
    excl: set[str] = set()
    excl_info = []
    for m in recipe.exclude:
        mp = resolve_path(m, base_dir)
        ids = load_manifest_ids(mp)
        excl |= ids
        mpath = mp / "manifest.json" if mp.is_dir() else mp
        excl_info.append({"path": str(mpath), "sha256": sha256_file(mpath), "ids": len(ids)})

    # decontamination ----------------------------------------------------------------------
    dec = None
    dec_cfg = recipe.decontaminate
    texts: dict[str, list[str]] = {}
    if dec_cfg is not None:
        if dec_cfg.bench_dir:
            texts.update(load_bench_dir(resolve_path(dec_cfg.bench_dir, base_dir), dec_cfg.benchmarks))
        for f in dec_cfg.extra_files:
            fp = resolve_path(f, base_dir)
            texts.setdefault(fp.stem, []).extend(load_extra_file(fp))
    if bench_texts:
        for k, v in bench_texts.items():
            texts.setdefault(k, []).extend(v)
    if texts:
        ngram, thr, minw = (dec_cfg.ngram, dec_cfg.threshold, dec_cfg.min_words) if dec_cfg else (13, 0.0, 8)
        dec = Decontaminator(texts, ngram=ngram, threshold=thr, min_words=minw)
    dec_removed = {b: 0 for b in sorted(texts)}
    dec_rules: dict[str, int] = {}
    dec_examples: dict[str, list] = {}

    # read ---------------------------------------------------------------------------------
    rejects = S.RejectLog(strict=strict)
    cap = recipe.repeat_cap
    occ: dict[str, int] = {}
    dirty: set[str] = set()
    pools: dict[str, list] = {}
    stats: dict[str, SourceStats] = {}
    inputs = []
    by_cat: dict[str, list[str]] = {}
    for spec in recipe.sources:
        st = stats[spec.name] = SourceStats(category=spec.category)
        by_cat.setdefault(spec.category, []).append(spec.name)
        filt = make_filter(spec.filters)
        pool = pools[spec.name] = []
        fby = st.filtered_by
        items = None
        if (workers > 1 and spec.hf is None and spec.shape is None and spec.limit is None):
            path = resolve_path(spec.path, base_dir)
            S.require_exists(path, spec.name)
            if S.detect_format(path, spec.format) == "jsonl" and path.stat().st_size >= PARALLEL_MIN_BYTES:
                items = _iter_items_parallel(spec, path, rejects, dec, workers, seed)
        if items is None:
            items = ((t, tag, d, None, None, None) for t, tag, d in _iter_items(spec, base_dir, rejects))
        for text, tag, diff, pid, pre_hit, key0 in items:
            st.read += 1
            if text is S.RowError:
                st.rejected += 1
                continue
            if text is None:
                st.filtered += 1
                fby[tag] = fby.get(tag, 0) + 1
                continue
            checked = pid is not None
            if not checked:
                if filt is not None:
                    why = filt(text, tag, diff)
                    if why:
                        st.filtered += 1
                        fby[why] = fby.get(why, 0) + 1
                        continue
                pid = prompt_id(text)
            if pid in excl:
                st.excluded += 1
                continue
            c = occ.get(pid, 0)
            if c >= cap:
                st.duplicate += 1
                continue
            occ[pid] = c + 1
            if dec is not None:
                if pid in dirty:
                    st.contaminated += 1
                    continue
                if checked:
                    hit = None if pre_hit is None else Hit(pre_hit[0], pre_hit[1])
                else:
                    hit = dec.check(text, pid)
                if hit is not None:
                    dirty.add(pid)
                    st.contaminated += 1
                    dec_removed[hit.benchmark] = dec_removed.get(hit.benchmark, 0) + 1
                    dec_rules[hit.rule] = dec_rules.get(hit.rule, 0) + 1
                    ex = dec_examples.setdefault(hit.benchmark, [])
                    if len(ex) < N_EXAMPLES:
                        ex.append({"source": spec.name, "rule": hit.rule, "text": text[:300]})
                    continue
            key = key0 if (c == 0 and key0 is not None) else sample_key(seed, pid, c)
            pool.append((key, pid, c, text, spec.name, False))
        pool.sort(key=lambda e: e[0])
        if spec.hf is not None:
            inputs.append({"source": spec.name, **S.fingerprint_hf(spec.hf)})
        else:
            inputs.append({"source": spec.name, **S.fingerprint_path(resolve_path(spec.path, base_dir))})

    # sample -------------------------------------------------------------------------------
    sampler = _Sampler(recipe, pools, stats)
    sampler.run(by_cat)
    selected = []
    for spec in recipe.sources:
        st = stats[spec.name]
        picked = sampler.picked.get(spec.name, [])
        copies = sum(1 for e in picked if e[5])
        st.upsampled = copies
        st.kept = len(picked) - copies
        st.not_sampled = len(pools[spec.name]) - st.kept
        for e in picked:
            selected.append((e[0], e[2], e[1], spec.category, spec.name, e[3]))
    selected.sort(key=lambda e: (e[0], e[1], e[2]))

    # write --------------------------------------------------------------------------------
    if recipe.format == "jsonl":
        out_name = PROMPTS_JSONL
        digest = hashlib.sha256()
        with AtomicWriter(out_dir / out_name, "wb") as fh:
            buf = []
            for e in selected:
                buf.append(canonical_line(e[2], e[3], e[4], e[5]))
                if len(buf) >= 4096:
                    data = ("\n".join(buf) + "\n").encode("utf-8", "surrogatepass")
                    digest.update(data)
                    fh.write(data)
                    buf = []
            if buf:
                data = ("\n".join(buf) + "\n").encode("utf-8", "surrogatepass")
                digest.update(data)
                fh.write(data)
        out_sha = digest.hexdigest()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out_name = PROMPTS_PARQUET
        table = pa.table({
            "id": [e[2] for e in selected],
            "category": [e[3] for e in selected],
            "source": [e[4] for e in selected],
            "messages": [[{"role": "user", "content": e[5]}] for e in selected],
        })
        with AtomicWriter(out_dir / out_name, "wb") as fh:
            pq.write_table(table, fh)
        out_sha = sha256_file(out_dir / out_name)
    for stale in {PROMPTS_JSONL, PROMPTS_PARQUET} - {out_name}:
        if (out_dir / stale).exists():
            (out_dir / stale).unlink()
    write_jsonl(out_dir / REJECTS_NAME, rejects.rows)
    ids_ref = write_ids(out_dir, (e[2] for e in selected))

    # manifest -----------------------------------------------------------------------------
    removed = {r: 0 for r in ("rejected", "filtered", "excluded", "duplicate", "contaminated", "not_sampled")}
    read = kept = ups = 0
    for name, st in stats.items():
        for r in removed:
            removed[r] += getattr(st, r)
        read += st.read
        kept += st.kept
        ups += st.upsampled
        if st.read != st.kept + sum(getattr(st, r) for r in removed):
            raise RuntimeError(f"internal accounting error for source {name}: {st}")  # pragma: no cover
    by_category: dict[str, int] = {}
    by_source: dict[str, int] = {}
    for e in selected:
        by_category[e[3]] = by_category.get(e[3], 0) + 1
        by_source[e[4]] = by_source.get(e[4], 0) + 1
    from dflash_lab import __version__

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "name": recipe.name,
        "dflash_lab_version": __version__,
        "seed": seed,
        "recipe_path": str(recipe_path) if recipe_path else None,
        "recipe_sha256": sha256_file(recipe_path) if recipe_path else None,
        "recipe": recipe.model_dump(mode="json"),
        "inputs": inputs,
        "exclude": excl_info,
        "output": {"path": out_name, "format": recipe.format, "rows": len(selected), "sha256": out_sha},
        "ids": ids_ref,
        "rejects": {"path": REJECTS_NAME, "rows": len(rejects.rows)},
        "counts": {
            "read": read,
            "kept": kept,
            "upsampled": ups,
            "removed": removed,
            "by_category": dict(sorted(by_category.items())),
            "by_source": by_source,
        },
        "sources": {name: st.as_dict() for name, st in stats.items()},
        "shortfalls": sampler.shortfalls,
        "decontamination": None if dec is None else {
            "ngram": dec.n,
            "threshold": dec.threshold,
            "min_words": dec_cfg.min_words if dec_cfg else 8,
            "inputs": _bench_fingerprints(dec_cfg, base_dir) if dec_cfg else [],
            "by_rule": dict(sorted(dec_rules.items())),
            "benchmarks": {
                b: {"texts": dec.sizes.get(b, 0), "removed": dec_removed.get(b, 0), "examples": dec_examples.get(b, [])}
                for b in sorted(dec_removed)
            },
        },
    }
    write_manifest(out_dir, manifest)
    return manifest
