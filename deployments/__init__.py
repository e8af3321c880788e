"""Every deployment's name, entry point, parameters, schedule and tags, read from ``prefect.yaml``.

``prefect.yaml`` at the top of the checkout is the one place they are written: ``prefect deploy
--all`` reads it for a work pool, and ``runner_deployments()`` builds the same deployments from it for
``certpilot serve`` (Prefect's runner) on one machine. Entry points in prefect.yaml are paths in the
checkout (``flows/renew.py:renew_due``), which a worker finds through the pull step's working directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # path/to/module.py:flow_function
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    concurrency_limit: int | None = None


def _spec(entry: dict[str, Any]) -> DeploymentSpec:
    crons = [schedule["cron"] for schedule in entry.get("schedules") or []]
    if len(crons) > 1:
        raise ValueError(f"{PREFECT_YAML}: deployment {entry['name']!r} has {len(crons)} schedules; certpilot's "
                         "deployments have at most one")
    return DeploymentSpec(name=entry["name"], entrypoint=entry["entrypoint"], description=entry.get("description", ""),
                          tags=tuple(entry.get("tags") or ()), parameters=dict(entry.get("parameters") or {}),
                          cron=crons[0] if crons else None, concurrency_limit=entry.get("concurrency_limit"))


def load_specs(path: Path = PREFECT_YAML) -> tuple[DeploymentSpec, ...]:
    """The deployments ``prefect.yaml`` declares."""
    return tuple(_spec(entry) for entry in yaml.safe_load(path.read_text())["deployments"])


DEPLOYMENTS: tuple[DeploymentSpec, ...] = load_specs()


def load_flow(entrypoint: str) -> Any:
    """The flow object an entry point names (``flows/renew.py:renew_due``)."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def runner_deployments() -> list[Any]:
    """The deployments as RunnerDeployments, for Prefect's runner (``certpilot serve``). Their entry points
    are module paths (``flows.renew.renew_due``): the runner's flow-run processes import the flow from the
    installed package, whatever directory ``certpilot serve`` was started in."""
    from prefect.deployments.runner import EntrypointType

    return [load_flow(spec.entrypoint).to_deployment(
        name=spec.name, description=spec.description, tags=list(spec.tags), parameters=spec.parameters,
        cron=spec.cron, concurrency_limit=spec.concurrency_limit, entrypoint_type=EntrypointType.MODULE_PATH)
        for spec in DEPLOYMENTS]
