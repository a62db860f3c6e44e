"""Function-completion shaping on real standard-library functions (ast only, nothing executed)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from dflash_lab.data.mix import build_mix
from dflash_lab.data.records import read_prompts
from dflash_lab.data.shaping import function_stubs, shape_code, shape_python_functions


def test_textwrap_functions():
    prompts = shape_python_functions(textwrap.__file__)
    wrap = next(p for p in prompts if "def wrap(text, width=70, **kwargs):" in p)
    assert wrap.split("\n")[0].startswith(("Complete", "Finish", "Implement", "Write the rest"))
    assert "```python\ndef wrap(text, width=70, **kwargs):\n    \"\"\"Wrap a single paragraph" in wrap
    assert wrap.rstrip().endswith('"""\n```')
    assert "return w.wrap(text)" not in wrap  # the body is left out
    names = sorted(p.split("def ")[1].split("(")[0] for p in prompts)
    assert names == ["dedent", "fill", "indent", "shorten", "wrap"]


def test_json_package_dir_and_imports():
    import json as j

    prompts = shape_python_functions(Path(j.__file__).parent)
    assert any("def dumps(obj, *, skipkeys=False" in p for p in prompts)
    assert any("def loads(s, *, cls=None" in p for p in prompts)
    stubs = function_stubs("import os\nimport re\n\ndef f(p):\n    '''Join p with the cwd and return the result.'''\n    return os.path.join(os.getcwd(), p)\n")
    assert stubs == ["import os\n\n\ndef f(p):\n    '''Join p with the cwd and return the result.'''\n"]


def test_skips_undocumented_private_and_stubs():
    code = (
        "def a(x):\n    return x\n\n"
        "def _b(x):\n    '''A private helper that doubles its argument value.'''\n    return 2 * x\n\n"
        "def c(x):\n    '''A stub without any body at all, only a docstring.'''\n\n"
        "class K:\n    def m(self):\n        '''A method is not a top-level function.'''\n        return 1\n\n"
        "async def d(x):\n    '''Await the thing and return its value, doubled.'''\n    return 2 * await x\n"
    )
    stubs = function_stubs(code)
    assert len(stubs) == 1 and stubs[0].startswith("async def d(x):")
    import pytest

    with pytest.raises(SyntaxError):
        shape_code("def broken(:\n")


def test_shape_source_in_recipe(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "def area(w, h):\n    '''Return the area of a w by h rectangle, in square units.'''\n    return w * h\n")
    (pkg / "broken.py").write_text("def oops(:\n    pass\n")
    (pkg / "nodoc.py").write_text("def x():\n    return 1\n")
    (tmp_path / "csn.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"whole_func_string": "def add(a, b):\n    \"\"\"Add two numbers and return their sum.\"\"\"\n    return a + b\n"},
        {"whole_func_string": "def nodoc(a):\n    return a\n"},
        {"whole_func_string": "def bad(:"},
    ]) + "\n")
    rec = {"seed": 3, "sources": [
        {"name": "dir", "path": "pkg", "shape": "function-completion"},
        {"name": "csn", "path": "csn.jsonl", "shape": "function-completion", "code_field": "whole_func_string"},
    ]}
    man = build_mix(rec, tmp_path / "out", base_dir=tmp_path)
    rows = read_prompts(tmp_path / "out" / "prompts.jsonl")
    assert len(rows) == 2 and all(r["category"] == "code" for r in rows)
    assert any("def area(w, h):" in r["messages"][0]["content"] for r in rows)
    s = man["sources"]
    assert s["dir"] == {**s["dir"], "read": 3, "rejected": 1, "filtered": 1, "kept": 1}
    assert s["csn"]["read"] == 3 and s["csn"]["rejected"] == 1 and s["csn"]["filtered"] == 1
    assert man["inputs"][0]["kind"] == "folder" and man["inputs"][0]["files"] == 3
