"""Layers point one way: entry points (CLI, deployments, benchmarks) -> flows -> tasks -> infra.

Every import is checked, the lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("infra", "tasks", "flows", "benchmarks")
# what each layer may not import
FORBIDDEN = {
    "infra": {"tasks", "flows", "benchmarks"},
    "tasks": {"flows", "benchmarks"},
    "flows": {"benchmarks"},
}
# entry points that live in flows/ and may start a benchmark
ENTRY_POINTS = {"flows/cli.py"}


def imported_modules(source: str) -> list[str]:
    """Every module a source imports by absolute name, lazy imports inside functions too."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def imported_layers(source: str) -> set[str]:
    """The project layers a module's source imports (as `x.y` or `driftlane.x.y`)."""
    layers = set()
    for name in imported_modules(source):
        parts = name.split(".")
        if parts[0] == "driftlane":
            parts = parts[1:]
        if parts and parts[0] in LAYERS:
            layers.add(parts[0])
    return layers


def test_the_checker_sees_plain_lazy_and_packaged_imports():
    source = ("import infra.store\nfrom driftlane.tasks.ingest import x\n"
              "def f():\n    from driftlane.flows.session import session_flow\n"
              "import numpy\nfrom . import sibling\n")
    assert imported_layers(source) == {"infra", "tasks", "flows"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_up_the_layers(layer):
    offenders = []
    for path in sorted((REPO / layer).glob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        wrong = imported_layers(path.read_text()) & FORBIDDEN[layer]
        if rel in ENTRY_POINTS:
            wrong -= {"benchmarks"}
        if wrong:
            offenders.append(f"{rel} imports {sorted(wrong)}")
    assert not offenders, "imports that run up the layers:\n" + "\n".join(offenders)
