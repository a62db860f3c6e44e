"""The mix recipe (YAML), validated with pydantic; unknown keys are errors that name the key.

See docs/prompts.md for the format. ``load_recipe(path)`` / ``validate_recipe(path)`` parse and
validate without reading any data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import read_user_text

Category = Literal["math", "code", "chat"]
Number = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HFSpec(_Strict):
    """A Hugging Face dataset: ``load_dataset(dataset, config, split=split, revision=revision)``."""

    dataset: str
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_files: Optional[Union[str, list[str]]] = None
    streaming: bool = False


class Filters(_Strict):
    tags: Optional[list[str]] = None  # keep rows whose tag column is one of these
    exclude_tags: Optional[list[str]] = None  # drop rows whose tag column is one of these
    min_chars: Optional[int] = Field(default=None, ge=0)
    max_chars: Optional[int] = Field(default=None, ge=0)
    regex: Optional[str] = None  # keep only prompts where re.search matches
    exclude_regex: Optional[str] = None  # drop prompts where re.search matches
    difficulty_in: Optional[list[Union[str, int, float]]] = None
    min_difficulty: Optional[float] = None
    max_difficulty: Optional[float] = None

    @field_validator("regex", "exclude_regex")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return v


class SourceSpec(_Strict):
    name: str
    preset: Optional[str] = None
    path: Optional[str] = None  # local .jsonl / .json / .parquet file, or .py file / folder for shape
    hf: Optional[HFSpec] = None
    format: Literal["auto", "jsonl", "json", "parquet"] = "auto"
    prompt_field: Optional[str] = None  # a column (dotted path allowed: "a.b")
    messages_field: Optional[str] = None  # list of turns; the first user turn is the prompt
    tag_field: Optional[str] = None  # column with a source tag (e.g. NuminaMath `source`)
    difficulty_field: Optional[str] = None
    category: Optional[Category] = None
    shape: Optional[Literal["function-completion"]] = None
    code_field: Optional[str] = None  # with shape on a dataset: the column holding Python code
    filters: Filters = Field(default_factory=Filters)
    limit: Optional[int] = Field(default=None, ge=0)  # read at most this many rows

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") is not None:
            from dflash_lab.data.sources import PRESETS

            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
            merged = dict(PRESETS[name])
            if "hf" in data and isinstance(data["hf"], dict) and isinstance(merged.get("hf"), dict):
                merged["hf"] = {**merged["hf"], **data["hf"]}
                data = {k: v for k, v in data.items() if k != "hf"}
            if "filters" in data and isinstance(data["filters"], dict) and isinstance(merged.get("filters"), dict):
                merged["filters"] = {**merged["filters"], **data["filters"]}
                data = {k: v for k, v in data.items() if k != "filters"}
            if data.get("path") is not None:
                merged.pop("hf", None)
            merged.update(data)
            data = merged
        return data

    @model_validator(mode="after")
    def _check(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `path` or `hf` (or a `preset`)")
        if self.shape is None:
            if (self.prompt_field is None) == (self.messages_field is None):
                raise ValueError(f"source {self.name!r}: give exactly one of `prompt_field` or `messages_field`")
            if self.category is None:
                raise ValueError(f"source {self.name!r}: `category` is required (math, code or chat)")
        else:
            if self.category is None:
                self.category = "code"
            if self.hf is not None and self.code_field is None:
                raise ValueError(f"source {self.name!r}: shape on a dataset needs `code_field` (the code column)")
            if self.path is not None and self.code_field is None and not _looks_like_python(self.path):
                raise ValueError(
                    f"source {self.name!r}: shape with a data file needs `code_field`; "
                    "or point `path` at a .py file or a folder of .py files"
                )
        return self


def _looks_like_python(path: str) -> bool:
    return path.endswith(".py") or not Path(path).suffix


class Quotas(_Strict):
    """Counts (int) or fractions (float in (0, 1]).

    total: the mix size; category fractions are fractions of it, and categories without a quota
    share what the listed ones leave. Without total, a category fraction is a fraction of that
    category's available pool, and unlisted categories keep everything.
    A source fraction is a fraction of its category's quota (or of its own pool when the category
    has none). Sources without a quota in a category with one share what is left.
    """

    total: Optional[int] = Field(default=None, ge=0)
    categories: dict[Category, Number] = Field(default_factory=dict)
    sources: dict[str, Number] = Field(default_factory=dict)

    @field_validator("categories", "sources")
    @classmethod
    def _numbers(cls, v):
        for key, q in v.items():
            if isinstance(q, bool) or q < 0:
                raise ValueError(f"quota for {key!r} must be a count >= 0 or a fraction in (0, 1], got {q!r}")
            if isinstance(q, float) and not (0 < q <= 1):
                raise ValueError(f"quota for {key!r}: a fraction must be in (0, 1], got {q!r}; write counts as integers")
        return v


class Decontam(_Strict):
    bench_dir: Optional[str] = None  # gsm8k/math500/humaneval/mbpp/mt_bench files (docs/prompts.md)
    benchmarks: Optional[list[str]] = None  # subset of the five; default: all five
    ngram: int = Field(default=13, ge=1)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    min_words: int = Field(default=8, ge=1)
    extra_files: list[str] = Field(default_factory=list)


class Recipe(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    seed: int = 0
    sources: list[SourceSpec] = Field(min_length=1)
    quotas: Quotas = Field(default_factory=Quotas)
    exclude: list[str] = Field(default_factory=list)  # manifest.json paths of earlier runs
    decontaminate: Optional[Decontam] = None
    repeat_cap: int = Field(default=1, ge=1)  # each prompt at most k times in the output
    upsample: bool = False  # fill a quota above the pool by repeating prompts (<= repeat_cap each)
    allow_shortfall: bool = False
    format: Literal["jsonl", "parquet"] = "jsonl"

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.sources]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dups)}")
        for key in self.quotas.sources:
            if key not in names:
                raise ValueError(f"quotas.sources names {key!r}, which is not a source; sources: {', '.join(names)}")
        if self.decontaminate and self.decontaminate.benchmarks:
            from dflash_lab.data.decontam import BENCHMARKS

            for b in self.decontaminate.benchmarks:
                if b not in BENCHMARKS:
                    raise ValueError(f"decontaminate.benchmarks: unknown {b!r}; known: {', '.join(BENCHMARKS)}")
        return self


def _format_error(path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            key = err["loc"][-1] if err["loc"] else "?"
            where = ".".join(str(x) for x in err["loc"][:-1]) or "top level"
            lines.append(f"unknown key {key!r} at {where}; remove it or fix its spelling (see docs/prompts.md)")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return f"recipe {path}: " + "; ".join(lines)


def parse_recipe(data: dict, path: str | os.PathLike = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise DFlashLabError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise DFlashLabError(_format_error(path, exc)) from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; reads no data. Raises DFlashLabError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise DFlashLabError(f"recipe {path} not found; pass the path of a mix YAML with --config")
    try:
        data = yaml.safe_load(read_user_text(path, "recipe"))
    except yaml.YAMLError as exc:
        raise DFlashLabError(f"recipe {path}: not valid YAML ({exc})") from None
    return parse_recipe(data, path)


validate_recipe = load_recipe


def resolve_path(p: str, base_dir: Path) -> Path:
    """Recipe paths: ``~`` and ``$VARS`` expand; relative paths are relative to the recipe's folder."""
    q = Path(os.path.expanduser(os.path.expandvars(p)))
    return q if q.is_absolute() else (base_dir / q)
