"""Every function of dflash_lab/train/ fits on a screen: at most 50 lines from its `def` line to its
last line, functions nested in it counted in it (issue 23)."""

import ast
from pathlib import Path

import dflash_lab

TRAIN = Path(dflash_lab.__file__).parent / "train"
LIMIT = 50


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int]]:
    """(qualified name, lines) of each outermost function longer than `limit` lines; methods are
    outermost functions of their class, nested functions count in their parent."""
    found = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((f"{prefix}{child.name}", lines))
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)  # functions under if/try at module or class level

    visit(ast.parse(source), "")
    return found


def test_the_counter_sees_a_long_function_with_its_nested_ones():
    body = "".join(f"    x{i} = {i}\n" for i in range(24))
    source = (f"class C:\n    def method(self):\n{body.replace('    ', '        ')}"
              f"        def inner():\n{body.replace('    ', '            ')}"
              "            return 1\n"
              "        return inner\n"
              f"def short():\n{body}    return 0\n")
    assert long_functions(source) == [("C.method", 52)]  # def + 24 + def inner + 24 + return + return
    assert long_functions(source, limit=52) == []


def test_no_function_in_train_is_longer_than_a_screen():
    files = sorted(TRAIN.rglob("*.py"))
    assert len(files) > 10, f"found only {len(files)} modules under {TRAIN}"
    too_long = [f"{path.relative_to(TRAIN.parent)}: {name} is {lines} lines (limit {LIMIT})"
                for path in files for name, lines in long_functions(path.read_text(encoding="utf-8"))]
    assert not too_long, "split these functions:\n" + "\n".join(too_long)
