"""Imports point down the layers only: flows -> tasks -> blocks -> connectors -> certpilot.
The core imports neither Prefect nor the layers above it (certpilot/cli*.py may import flows inside
its commands); connectors import no Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["certpilot", "connectors", "blocks", "tasks", "flows"]
FORBIDDEN = {
    "certpilot": {"prefect", "connectors", "blocks", "tasks", "flows"},
    "connectors": {"prefect", "blocks", "tasks", "flows"},
    "blocks": {"tasks", "flows"},
    "tasks": {"flows"},
    "flows": set(),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_down_only(layer: str) -> None:
    offenders = {}
    for path in sorted((ROOT / layer).rglob("*.py")):
        if path.parent == ROOT / "certpilot" and path.name.startswith("cli"):
            continue  # the CLI (cli.py, cli_*.py) runs flows, importing them inside its commands
        bad = _imports(path) & FORBIDDEN[layer]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}
