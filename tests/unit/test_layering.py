"""The package's layers, read from the code's own imports (every `import`, also those inside
functions): models/ sits under decoding/, decoding/ under eval/, eval/ under the report. A
command that runs a higher layer is registered by that layer (`decoding/commands.py`,
`report_commands.py`, `plan/commands.py`), so no import runs back up. plan/ sits above train/: it
runs the trainer's step under fake tensors."""

import ast
from pathlib import Path

import dflash_lab

PACKAGE = Path(dflash_lab.__file__).parent

# package (or top-level module) of dflash_lab -> what it must never import, and why
FORBIDDEN = {
    "models": ({"decoding", "train", "plan", "eval", "labels", "data", "registry", "report", "report_commands", "demo", "cli"},
               "the models sit under every other layer"),
    "decoding": ({"train", "plan", "eval", "labels", "data", "registry", "report", "report_commands", "demo", "cli"},
                 "decoding runs models; evaluation and training run decoding, not the other way"),
    "train": ({"plan"}, "the plan measures the trainer's step (plan imports train); the trainer knows no plan"),
    "eval": ({"train", "plan", "labels", "report", "report_commands", "demo", "cli"},
             "the report reads what eval measured; eval knows no report"),
}


def layer_of(module: str) -> str:
    """`dflash_lab.models.draft` -> `models`; `dflash_lab.report` -> `report`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(source: str) -> set[str]:
    """Every dflash_lab module that `source` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dflash_lab":  # from dflash_lab import registry
                found.update(f"dflash_lab.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return {m for m in found if m.startswith("dflash_lab.")}


def modules_of(layer: str) -> dict[str, str]:
    """{path relative to the package: source} of one layer."""
    folder = PACKAGE / layer
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]
    return {str(f.relative_to(PACKAGE)): f.read_text(encoding="utf-8") for f in files}


def test_the_import_reader_sees_every_form():
    source = (
        "import dflash_lab.eval.harness as harness\n"
        "from dflash_lab import report\n"
        "from dflash_lab.decoding.speculative import greedy_generate\n"
        "def late():\n"
        "    from dflash_lab.train.trainer import train\n"
        "import torch\n"
    )
    assert {layer_of(m) for m in imported_modules(source)} == {"eval", "report", "decoding", "train"}


def test_no_import_runs_back_up_the_layers():
    broken = []
    for layer, (forbidden, why) in FORBIDDEN.items():
        sources = modules_of(layer)
        assert sources, f"no modules found for {layer}: the layer table is stale"
        for path, source in sources.items():
            for module in sorted(imported_modules(source)):
                if layer_of(module) in forbidden:
                    broken.append(f"{path} imports {module} ({why})")
    assert not broken, "\n".join(broken)


def test_the_commands_of_a_higher_layer_are_registered_by_it():
    from dflash_lab.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert commands["generate"].get_default("handler").__module__ == "dflash_lab.decoding.commands"
    assert commands["report"].get_default("handler").__module__ == "dflash_lab.report_commands"
    assert commands["plan"].get_default("handler").__module__ == "dflash_lab.plan.commands"
