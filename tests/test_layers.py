"""The package's layers: every import, at module level or inside a function, points down.

From the bottom: the pure merge math (``merging``), the trainer (``training``), recipes, evaluation,
workflows, commands. ``hub`` (cards and uploads) takes plain data and imports no layer above merging.
"""

from __future__ import annotations

import ast
from pathlib import Path

import metis_hf

PACKAGE = Path(metis_hf.__file__).parent
MAX_CLASS_LINES = 400
ABOVE_TRAINING = ("metis_hf.evaluation", "metis_hf.recipe", "metis_hf.workflows", "metis_hf.commands")
FORBIDDEN = {
    "metis_hf.merging": ("metis_hf.training", "metis_hf.hub", *ABOVE_TRAINING),
    "metis_hf.training": ABOVE_TRAINING,
    "metis_hf.hub": ("metis_hf.training", *ABOVE_TRAINING),
    "metis_hf.round_record": ("metis_hf.training", "metis_hf.hub", *ABOVE_TRAINING),
    "metis_hf.recipe": (
        "metis_hf.training.trainer",
        "metis_hf.evaluation",
        "metis_hf.workflows",
        "metis_hf.commands",
    ),
    "metis_hf.evaluation": ("metis_hf.workflows", "metis_hf.commands"),
    "metis_hf.workflows": ("metis_hf.commands",),
}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_import_runs_up_the_layers():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for layer, forbidden in FORBIDDEN.items():
            if not within(name, layer):
                continue
            for imported in sorted(imported_modules(path)):
                if any(within(imported, f) for f in forbidden):
                    violations.append(f"{name} imports {imported}")
    assert violations == []


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def push():\n    from metis_hf.workflows.merge import write_adapter\n")
    assert "metis_hf.workflows.merge" in imported_modules(source)


def test_no_class_is_longer_than_a_newcomer_reads_at_once():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
