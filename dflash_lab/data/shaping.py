"""Function-completion prompts in HumanEval's shape, built from Python source with ``ast``.

A top-level function with a docstring becomes its imports + signature + docstring, in a Python
code block (like HumanEval's ``prompt`` field), after an instruction to complete the function.
Code is parsed, never imported or executed.
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from pathlib import Path
from typing import Iterable, Iterator

INSTRUCTIONS = (
    "Complete the following Python function.",
    "Complete the implementation of this Python function so that it does what its docstring says.",
    "Finish writing the Python function below. Keep the signature and docstring.",
    "Implement the body of the following Python function.",
    "Write the rest of this Python function according to its docstring.",
)


def _pick(options, key: str) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "big")
    return options[h % len(options)]


def _import_lines(tree: ast.Module, lines: list[str]) -> list[tuple[set[str], str]]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.end_lineno == node.lineno:
            if isinstance(node, ast.ImportFrom) and (node.module == "__future__" or node.level):
                continue
            names = {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
            if names:
                out.append((names, lines[node.lineno - 1].strip()))
    return out


def function_stubs(
    code: str,
    *,
    min_doc_chars: int = 30,
    max_doc_chars: int = 2000,
    min_body_statements: int = 1,
    include_private: bool = False,
) -> list[str]:
    """Signature + docstring snippets of the top-level functions in ``code`` that have a docstring.

    Raises SyntaxError/ValueError if the code does not parse.
    """
    tree = ast.parse(code)
    lines = code.splitlines()
    imports = None
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if node.name.startswith("_") and not include_private:
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or not (min_doc_chars <= len(doc) <= max_doc_chars):
            continue
        if len(node.body) - 1 < min_body_statements:
            continue
        doc_node = node.body[0]
        if any(isinstance(b, ast.Pass) for b in node.body[1:]) and len(node.body) == 2:
            continue  # a stub
        start = node.lineno - 1  # the `def` line; decorators are left out
        snippet = textwrap.dedent("\n".join(lines[start : doc_node.end_lineno])).rstrip()
        if imports is None:
            imports = _import_lines(tree, lines)
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
            n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
        }
        head = [line for names, line in imports if names & used]
        if head:
            snippet = "\n".join(head) + "\n\n\n" + snippet
        out.append(snippet + "\n")
    return out


def completion_prompt(stub: str) -> str:
    """HumanEval-shaped prompt: an instruction, then the stub in a python code block."""
    return f"{_pick(INSTRUCTIONS, stub)}\n\n```python\n{stub}```"


def shape_code(code: str, **kw) -> list[str]:
    """Function-completion prompts from one module's source text."""
    return [completion_prompt(s) for s in function_stubs(code, **kw)]


def iter_python_files(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*.py")):
        rel = p.relative_to(path).parts
        if any(part.startswith(".") or part in ("__pycache__", "site-packages") for part in rel[:-1]):
            continue
        if p.is_file():
            yield p


def shape_python_functions(
    sources: str | Path | Iterable[str | Path], *, errors: list | None = None, **kw
) -> list[str]:
    """Function-completion prompts from Python files and/or folders (parsed with ``ast``, never run).

    ``sources`` is a path or a list of paths. Files that do not parse are skipped and, when
    ``errors`` is a list, appended to it as ``(path, reason)``.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    prompts = []
    for src in sources:
        for f in iter_python_files(src):
            try:
                code = f.read_text(encoding="utf-8")
                prompts.extend(shape_code(code, **kw))
            except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError) as exc:
                if errors is not None:
                    errors.append((str(f), f"{type(exc).__name__}: {exc}"))
    return prompts

