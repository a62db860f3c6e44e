"""Which draft does a running server decode with? (`eval --backend sglang|vllm --server URL`, issue 21)

An evaluation against a server measures whatever draft that server loaded, not the `--draft` named on
our command line. Before anything loads, every `--server` is asked:

- SGLang: `GET /get_server_info` returns its ServerArgs flattened (`model_path`,
  `speculative_algorithm`, `speculative_draft_model_path`, ...). Always on.
- vLLM: `GET /server_info?config_format=json` returns `{"vllm_config": {..., "speculative_config":
  {"method", "model", "num_speculative_tokens", ...}}}`, but vLLM registers that route only when
  the server runs with `VLLM_SERVER_DEV_MODE=1` (vllm/entrypoints/serve/dev/server_info, 0.32).
  Without it nothing the server exposes names its draft (`/v1/models` names the target; the
  spec-decode counters say only that some draft runs).

The server's draft path is compared with ours by resolved path, else (a copy, another mount) by the
sha256 of `model.safetensors` when the server's path is readable here. A different draft is refused
with both named. Where the server's draft cannot be known (vLLM without dev mode, a path not readable
here), one server evaluates one checkpoint: `eval` goes on with a warning, `eval-run` over several
checkpoints is refused. The result JSON records what each server said (`server_drafts`).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from dflash_lab.errors import DFlashLabError
from dflash_lab.validate import summarize_body

VERIFIED_ENGINES = ("sglang", "vllm")
DEV_MODE_HINT = ("start vLLM with VLLM_SERVER_DEV_MODE=1 (it then serves /server_info; keep such a server on "
                 "loopback: dev mode also opens admin routes)")


@dataclass
class ServerDraft:
    """What one server says about its draft, and whether it is the draft being evaluated."""

    url: str
    engine: str
    target: str | None
    draft_path: str | None
    """The draft directory the server loaded, as it reports it; None when it serves no draft or
    does not say (see `known`)."""
    known: bool
    """False when the server does not expose which draft it runs."""
    verified: bool
    how: str
    """How `verified` was decided: "same path", "same weights (sha256)", or why it could not be."""
    draft_sha256: str | None = None

    def describe(self) -> dict:
        return asdict(self)


# -- HTTP ------------------------------------------------------------------------------------------
def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); a refused or unroutable address is a user error naming the URL."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        base = url.split("/", 3)[:3]
        raise DFlashLabError(f"--server {'/'.join(base)} is not reachable ({getattr(exc, 'reason', exc)}); start "
                             "the server first (`dflash-lab serve-cmd` prints the command) or fix the URL") from None


def _get_json(url: str, timeout: float) -> dict | None:
    return _get_json_or_answer(url, timeout)[0]


def _get_json_or_answer(url: str, timeout: float) -> tuple[dict | None, str]:
    """(the JSON object, or None) and a one-line excerpt of what the server answered, for messages
    (an HTML page by its title: a plain web server's whole page is never printed)."""
    status, body = _get(url, timeout)
    answer = f"HTTP {status}: {summarize_body(body)}"
    if status != 200:
        return None, answer
    try:
        data = json.loads(body)
    except ValueError:
        return None, answer
    return (data if isinstance(data, dict) else None), answer


# -- what each engine says -------------------------------------------------------------------------
def _sglang_info(url: str, timeout: float) -> tuple[str | None, str | None, bool, str]:
    """(target, draft path or None, known, note) from SGLang's /get_server_info."""
    info, answer = _get_json_or_answer(url + "/get_server_info", timeout)
    if info is None or "model_path" not in info:
        raise DFlashLabError(f"--server {url} is not an SGLang server (/get_server_info answered {answer}, with "
                             "no model_path); pass --backend vllm or llamacpp if it is one of those, or fix the URL")
    algorithm = info.get("speculative_algorithm")
    draft = info.get("speculative_draft_model_path") if algorithm else None
    return info.get("model_path"), draft, True, f"speculative_algorithm {algorithm}"


def _vllm_info(url: str, timeout: float) -> tuple[str | None, str | None, bool, str]:
    """(target, draft path or None, known, note) from vLLM's /server_info (dev mode only)."""
    models, answer = _get_json_or_answer(url + "/v1/models", timeout)
    version = _get_json(url + "/version", timeout)
    if models is None or version is None or "version" not in version:
        raise DFlashLabError(f"--server {url} is not a vLLM server (/v1/models answered {answer}; a vLLM server also "
                             "answers /version); pass --backend sglang or llamacpp if it is one of those, or fix the URL")
    data = models.get("data") or []
    target = (data[0].get("root") or data[0].get("id")) if data and isinstance(data[0], dict) else None
    info = _get_json(url + "/server_info?config_format=json", timeout)
    config = info.get("vllm_config") if info else None
    if not isinstance(config, dict):
        return target, None, False, f"vLLM {version['version']} does not say which draft it runs: {DEV_MODE_HINT}"
    model_config = config.get("model_config")
    if isinstance(model_config, dict) and model_config.get("model"):
        target = model_config["model"]
    spec = config.get("speculative_config")
    if not isinstance(spec, dict):
        return target, None, True, "no speculative_config"
    return target, spec.get("model"), True, f"speculative method {spec.get('method')}"


def probe(url: str, engine: str, timeout: float = 30.0) -> tuple[str | None, str | None, bool, str]:
    """Reachable, the right kind of server, and what it says about its draft."""
    url = url.rstrip("/")
    if engine == "sglang":
        return _sglang_info(url, timeout)
    if engine == "vllm":
        return _vllm_info(url, timeout)
    raise DFlashLabError(f"server check: engine {engine!r} is not one of {', '.join(VERIFIED_ENGINES)}")


# -- comparing -------------------------------------------------------------------------------------
def _weights_sha(path: Path) -> str | None:
    from dflash_lab.models.checkpoint import WEIGHTS_NAME, checkpoint_sha256

    return checkpoint_sha256(path) if (path / WEIGHTS_NAME).is_file() else None


def check_server(url: str, engine: str, draft: str | Path | None, *, timeout: float = 30.0) -> ServerDraft:
    """Ask one server which draft it runs and compare it with `draft` (a directory; None for a
    baseline, which is only checked for reachability and kind). A server that runs another draft,
    or none while a draft is evaluated, is refused with both named."""
    url = url.rstrip("/")
    target, served, known, note = probe(url, engine, timeout)
    if draft is None:
        return ServerDraft(url, engine, target, served, known, False, f"no draft evaluated ({note})")
    ours = Path(draft).expanduser().resolve()
    ours_sha = _weights_sha(ours)
    if not known:
        return ServerDraft(url, engine, target, None, False, False, note, ours_sha)
    if not served:
        raise DFlashLabError(f"--server {url} decodes {target} without a draft ({note}), but --draft is {ours}: "
                             f"start the server with that draft (`dflash-lab serve-cmd --engine {engine} --target "
                             f"{target} --draft {ours}`)")
    theirs = Path(served).expanduser()
    if theirs.resolve() == ours:
        return ServerDraft(url, engine, target, served, True, True, "same path", ours_sha)
    theirs_sha = _weights_sha(theirs) if theirs.is_dir() else None
    if theirs_sha is not None and theirs_sha == ours_sha:
        return ServerDraft(url, engine, target, served, True, True, "same weights (sha256)", ours_sha)
    if theirs_sha is not None:
        raise DFlashLabError(
            f"--server {url} serves the draft {served} (weights sha256 {theirs_sha[:12]}), not --draft {ours} "
            f"(sha256 {(ours_sha or '-')[:12]}): its numbers would be recorded under the wrong draft; restart "
            f"the server with --draft {ours}, or evaluate {served}")
    return ServerDraft(url, engine, target, served, True, False,
                       f"the server's draft {served} is not the same path and is not readable here to compare "
                       "weights", ours_sha)


def check_servers(servers: list[str], engine: str, draft: str | Path | None) -> list[ServerDraft]:
    """`check_server` for every --server; warns on stderr about each that cannot be verified."""
    checks = [check_server(url, engine, draft) for url in servers]
    for check in checks:
        if draft is not None and not check.verified:
            print(f"warning: cannot verify that {check.url} serves {draft}: {check.how}. Its numbers are "
                  "recorded under this draft; evaluate one checkpoint per server start", file=sys.stderr)
    return checks


def require_one_checkpoint(checks_by_label: dict[str, list[ServerDraft]]) -> None:
    """eval-run against servers: every checkpoint must be the one the servers verifiably serve.
    Several checkpoints against one unverifiable server would record one draft's numbers under
    each of them (and `best` would pick among copies of one measurement)."""
    if not checks_by_label:
        return
    labels = list(checks_by_label)
    unverified = {c.url: c.how for checks in checks_by_label.values() for c in checks if not c.verified}
    if unverified and len(labels) > 1:
        url, why = next(iter(unverified.items()))
        raise DFlashLabError(
            f"eval-run: --server {url} cannot show which draft it serves ({why}), so it can evaluate one "
            f"checkpoint, not {len(labels)} ({', '.join(labels)}): pass --checkpoints LABEL for the one it "
            "serves, or make the server verifiable")
