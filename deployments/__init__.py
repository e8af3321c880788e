"""Every deployment's name, entry point, parameters, schedule and tags, in one place.

``prefect.yaml`` lists the same deployments for ``prefect deploy --all`` on a work pool (a test
keeps the two in step); ``runner_deployments()`` builds them for ``flow.serve``/``prefect.serve``
on one machine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # path/to/module.py:flow_function
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    concurrency_limit: int | None = None


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="import-inventory",
        entrypoint="flows/import_inventory.py:import_inventory",
        description="Import certificates from files and directories on the worker's machine (ad hoc).",
        tags=("certpilot", "inventory"),
    ),
    DeploymentSpec(
        name="renew-due",
        entrypoint="flows/renew.py:renew_due",
        description="Renew every managed certificate that is due, one task run per certificate (hourly).",
        tags=("certpilot", "renewal"),
        cron="17 * * * *",
        concurrency_limit=1,  # two overlapping runs would renew the same certificates twice
    ),
    DeploymentSpec(
        name="renew-certificate",
        entrypoint="flows/renew.py:renew_certificate",
        description="Renew one managed certificate now, then deploy and verify it (ad hoc: give its name in the run form).",
        tags=("certpilot", "renewal"),
    ),
    DeploymentSpec(
        name="discover",
        entrypoint="flows/discover.py:discover",
        description="Discover certificates with the source blocks named in 'sources' (every 6 hours).",
        tags=("certpilot", "discovery"),
        parameters={"sources": []},
        cron="23 */6 * * *",
        concurrency_limit=1,
    ),
    DeploymentSpec(
        name="deploy-certificate",
        entrypoint="flows/deploy.py:deploy_certificate",
        description="Deploy one managed certificate to its targets, canary first, verify, roll back on failure (ad hoc).",
        tags=("certpilot", "deployment"),
    ),
)


def load_flow(entrypoint: str):  # noqa: ANN201 - a prefect Flow
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def runner_deployments() -> list[Any]:
    """The deployments as RunnerDeployments, for ``prefect.serve(*runner_deployments())``."""
    return [load_flow(spec.entrypoint).to_deployment(
        name=spec.name, description=spec.description, tags=list(spec.tags), parameters=spec.parameters,
        cron=spec.cron, concurrency_limit=spec.concurrency_limit) for spec in DEPLOYMENTS]
