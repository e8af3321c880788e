"""What the wheel holds: the product's packages, not the lab, the benchmarks, the tests or the scripts."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_product_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = set(find_packages(where=str(ROOT), include=include))
    tops = {name.split(".")[0] for name in packages}
    assert tops == {"certpilot", "connectors", "blocks", "tasks", "flows", "deployments", "cli"}
    assert {"lab", "bench", "tests", "scripts"}.isdisjoint(tops)
    entry = config["project"]["scripts"]["certpilot"]
    assert entry == "cli.main:main"
