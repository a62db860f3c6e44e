"""Checks of command-line values that several commands share, made before any work.

`check_common_args(args)` runs in `dflash_lab.cli.main` for every command, so a new command with a
`--device` or a `--server` option is checked without anyone wiring it in:

- `device`: a device name torch knows here (`auto`, `cpu`, `cuda[:N]`, `xpu[:N]`, `mps`); `tpu`
  used to reach torch as a traceback;
- `server`: the syntax of every server URL (a scheme, a host, a port in range); whether a server
  answers is the serving code's check, before the target loads.
"""

from __future__ import annotations

import re
import urllib.parse

from dflash_lab.errors import DFlashLabError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def check_device(value: str, flag: str = "--device") -> str:
    if not isinstance(value, str) or not DEVICE_RE.match(value):
        raise DFlashLabError(f"{flag} {value!r}: not a device this program runs on; choose auto, cpu, cuda, "
                             "cuda:N or mps")
    return value


def check_server_url(url: str, flag: str = "--server") -> str:
    """A server base URL such as http://127.0.0.1:30000 (its syntax only; nothing is contacted)."""
    text = str(url).strip()
    if "://" not in text:
        raise DFlashLabError(f"{flag} {url!r}: a URL needs its scheme; pass http://{text}")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise DFlashLabError(f"{flag} {url!r}: use an http:// or https:// URL, e.g. http://127.0.0.1:30000")
    try:
        port = parts.port
    except ValueError:
        raise DFlashLabError(f"{flag} {url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise DFlashLabError(f"{flag} {url!r}: no host; pass e.g. http://127.0.0.1:30000")
    if port is not None and not 1 <= port <= 65535:
        raise DFlashLabError(f"{flag} {url!r}: the port must be a number from 1 to 65535")
    return text


def check_port(port: int, flag: str = "--port") -> int:
    if not 1 <= port <= 65535:
        raise DFlashLabError(f"{flag} {port}: a port is a number from 1 to 65535")
    return port


def check_common_args(args) -> None:
    """The shared checks of a parsed command line (see the module docstring)."""
    device = getattr(args, "device", None)
    if isinstance(device, str):
        check_device(device)
    servers = getattr(args, "server", None)
    for url in servers if isinstance(servers, list) else [servers] if isinstance(servers, str) else []:
        check_server_url(url)


def check_backend_options(args) -> None:
    """eval/eval-run: options that only one backend reads are refused with the others, not ignored.
    `--threads` goes to llama.cpp unchecked (0 aborted the whole process inside it); `--device` and
    `--dtype` place the builtin backend's target: a server or llama.cpp runs where and in what
    precision it was started, and a results file must not claim otherwise. The one exception:
    `--backend vllm` without `--server` starts vLLM itself, in float32 or bfloat16 (`--dtype`)."""
    backend = getattr(args, "backend", "builtin")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise DFlashLabError(f"--threads must be >= 1 (CPU threads of the in-process llama.cpp), got {threads}")
    if backend == "vllm" and not getattr(args, "server", None) and getattr(args, "dtype", "auto") == "float16":
        raise DFlashLabError("--dtype float16: the vllm backend runs float32 (the exact lossless check) or bfloat16 "
                             "(Gated DeltaNet targets on a CPU); pass one of them, or leave --dtype out")
    if backend != "builtin":
        own_dtype = backend == "vllm" and not getattr(args, "server", None)  # eval starts vLLM in --dtype
        given = [f"--{name} {getattr(args, name)}" for name in ("device", "dtype")
                 if getattr(args, name, "auto") not in (None, "auto") and not (name == "dtype" and own_dtype)]
        if given:
            where = ("runs on the CPU with the GGUF's own types (choose them with --gguf f32|q4_1|FILE)"
                     if backend == "llamacpp" else "runs where and in the precision its server was started")
            raise DFlashLabError(f"{' '.join(given)}: these place the builtin backend's target; --backend {backend} "
                                 f"{where}: drop {' and '.join(g.split()[0] for g in given)}")


def summarize_body(body: bytes | str, limit: int = 160) -> str:
    """A server's answer as a short one-line excerpt for an error message: an HTML page (a plain web
    server, a proxy's error page) by its title, anything else with its whitespace folded and cut."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    if re.search(r"<\s*(!doctype\s+html|html|head|body)\b", text[:2000], re.IGNORECASE):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        heading = title or re.search(r"<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL)
        name = " ".join(re.sub(r"<[^>]+>", "", heading.group(1)).split()) if heading else ""
        return f"an HTML page{f' titled {name[:limit]!r}' if name else ''}, not an API answer"
    folded = " ".join(text.split())
    return folded[:limit] + ("..." if len(folded) > limit else "")
