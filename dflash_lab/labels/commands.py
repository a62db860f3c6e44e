"""CLI: `label`, `labels audit`, `serve-cmd`."""

from __future__ import annotations

import json
import sys

from dflash_lab.errors import DFlashLabError
from dflash_lab.labels.runner import DEFAULT_MAX_NEW_TOKENS
from dflash_lab.outputs import add_output


def _is_label_dir(path, args) -> bool:
    from dflash_lab.labels.runner import is_label_dir

    return is_label_dir(path)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "label", help="generate the target's greedy responses for a prompt set (the training labels)",
        description="Label a prompt set with the target's own greedy answers (T=0, thinking off). Resumable: "
                    "rerun the same command after a crash; --retry-failed re-attempts failed.jsonl.")
    p.add_argument("--prompts", required=True, help="prompt-set directory (prompts build) or a .jsonl with `messages`")
    p.add_argument("--target", required=True, help="embedded name, HF directory, .gguf file or hub id")
    p.add_argument("--backend", choices=["hf", "openai", "vllm", "llamacpp"], default="hf",
                   help="llamacpp: an in-process llama.cpp server on the target's F32 GGUF (pip install 'dflash-lab[llamacpp]')")
    add_output(p, "--out", kind="dir", command="label", owned=_is_label_dir, inputs=("prompts", "target"),
               fix="choose a new --out directory (a rerun resumes only in the directory it wrote)",
               required=True, help="output directory (shards + meta.json)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="openai backend: server base URL, repeat for several (e.g. http://127.0.0.1:30000)")
    p.add_argument("--model", default=None, help="openai backend: the served model name (default: --target)")
    p.add_argument("--concurrency", type=int, default=16, help="openai backend: requests in flight per server")
    p.add_argument("--timeout", type=float, default=600.0, help="openai backend: seconds per request")
    p.add_argument("--retries", type=int, default=4, help="openai backend: retries per request (5xx, timeouts)")
    p.add_argument("--batch-size", type=int, default=8, help="hf backend: prompts per generate() batch; "
                                                               "llamacpp: requests decoded together (parallel slots)")
    p.add_argument("--device", default="cpu", help="hf backend: cpu or cuda[:i]")
    p.add_argument("--dtype", default="auto", help="hf and vllm backends: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16")
    p.add_argument("--retry-failed", action="store_true", help="re-attempt exactly the ids in OUT/failed.jsonl")
    p.add_argument("--limit", type=int, default=None, help="read only the first N prompt rows")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard file")
    p.add_argument("--flush-seconds", type=float, default=60.0, help="write a shard at least this often")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_label)

    labels = subparsers.add_parser("labels", help="inspect labelled datasets")
    sub = labels.add_subparsers(dest="labels_command", metavar="ACTION")
    a = sub.add_parser("audit", help="per-category lengths, capped fraction, LaTeX markers, \\boxed, code fences")
    a.add_argument("dir", help="a directory written by `dflash-lab label`")
    a.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    a.set_defaults(handler=_audit)
    labels.set_defaults(handler=lambda args: (labels.print_help(), 2)[1])

    s = subparsers.add_parser("serve-cmd", help="print the commands that start one SGLang/vLLM server per GPU, "
                                                "or a llama.cpp server (CPU)",
                              description="Print launch commands for N OpenAI-compatible servers (one per GPU, "
                                          "ports P..P+N-1), or for one llama.cpp server, and the matching "
                                          "`dflash-lab label` / `eval` command.")
    s.add_argument("--engine", choices=["sglang", "vllm", "llamacpp"], required=True,
                   help="llamacpp: llama-server for a target GGUF and an exported draft GGUF (CPU is enough)")
    s.add_argument("--target", required=True, help="model path or hub id the servers load (llamacpp: a .gguf file, "
                                                   "or the embedded name for its F32 GGUF)")
    s.add_argument("--gpus", type=int, default=1, help="sglang/vllm: one server per GPU (llamacpp: one server)")
    s.add_argument("--port", type=int, default=None, help="first port (sglang 30000, vllm 8000, llamacpp 8080)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 to serve other machines)")
    s.add_argument("--draft", default=None, help="serve with speculative decoding: a DFlash draft directory "
                                                 "(sglang/vllm), an exported draft GGUF (llamacpp)")
    s.set_defaults(handler=_serve_cmd)


def _label(args) -> int:
    from dflash_lab.labels.runner import run_labels

    try:
        stats = run_labels(
            args.prompts, args.target, args.out, backend=args.backend, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, servers=args.server, model=args.model, concurrency=args.concurrency,
            timeout=args.timeout, retries=args.retries, retry_failed=args.retry_failed, limit=args.limit,
            shard_size=args.shard_size, flush_seconds=args.flush_seconds, device=args.device, dtype=args.dtype,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"[label] interrupted: the records written to {args.out} are kept; rerun the same command to "
              "resume where it stopped", file=sys.stderr)
        raise
    print(f"[label] {args.out}: {stats.summary()}")
    if stats.failed and not stats.done:
        raise DFlashLabError(nothing_labelled_message(args.out, stats))
    if stats.failed:
        print(f"[label] {stats.failed} failed (see {args.out}/failed.jsonl); rerun with --retry-failed to retry")
    return 0


def nothing_labelled_message(out: str, stats) -> str:
    """Every prompt of this run failed: how many, why (by reason, with the first detail), what next."""
    from pathlib import Path

    from dflash_lab.labels.runner import read_jsonl_tolerant

    reasons = [f"{n} {what}" for n, what in ((stats.failed_bad_input, "bad input"),
                                             (stats.failed_too_long, "prompt too long"),
                                             (stats.failed_backend, "backend error")) if n]
    failed = read_jsonl_tolerant(Path(out) / "failed.jsonl")
    first = f"; first: {failed[0].get('id')}: {str(failed[0].get('detail'))[:200]}" if failed else ""
    return (f"label --out {out}: nothing was labelled, all {stats.failed} prompts failed ({', '.join(reasons)}"
            f"{first}); see {out}/failed.jsonl, fix the prompts or the target/server, then rerun with --retry-failed")


def _audit(args) -> int:
    from dflash_lab.labels.audit import audit_labels, format_audit

    report = audit_labels(args.dir)
    print(json.dumps(report, indent=2) if args.json else format_audit(report))
    return 0


def _serve_cmd(args) -> int:
    from dflash_lab.labels.serve import (check_ports, check_serve_draft, check_serve_target, next_step_hint,
                                         serve_commands)
    from dflash_lab.models import embedded

    target = args.target
    served_name = target
    check_ports(args.engine, args.port, args.gpus)
    if args.draft is not None:  # before the target: an embedded one may be fetched
        check_serve_draft(args.draft, args.engine, target)
    if args.engine == "llamacpp":
        if target in embedded.EMBEDDED_TARGETS:
            target = str(embedded.gguf_path(target, "f32"))  # the numbers our own loop computes with
        extra = ["--alias", served_name]
    else:
        if target in embedded.EMBEDDED_TARGETS:
            target = str(embedded.fetch(target))  # the servers need the converted directory
        extra = ["--served-model-name", served_name]
    check_serve_target(target, args.engine)
    python = "python"
    if args.engine == "vllm":  # the managed environment's interpreter, when this machine has one
        from dflash_lab.engines.vllm_env import engine_python

        python = str(engine_python() or "python")
    for line in serve_commands(args.engine, target, args.gpus, args.port, draft=args.draft, host=args.host,
                               extra_args=extra, python=python):
        print(line)
    print(next_step_hint(args.engine, args.target, args.gpus, args.port, args.host, draft=args.draft), file=sys.stderr)
    return 0
