"""prefect.yaml and deployments/ describe the same deployments, and each one builds."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments import DEPLOYMENTS, load_flow, runner_deployments

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_matches_deployments_module() -> None:
    declared = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert set(declared) == {spec.name for spec in DEPLOYMENTS}
    for spec in DEPLOYMENTS:
        entry = declared[spec.name]
        assert entry["entrypoint"] == spec.entrypoint
        assert entry["tags"] == list(spec.tags)
        assert (entry.get("parameters") or {}) == spec.parameters
        crons = [s["cron"] for s in entry.get("schedules") or []]
        assert crons == ([spec.cron] if spec.cron else [])
        assert entry.get("concurrency_limit") == spec.concurrency_limit


def test_every_deployment_builds_with_its_flow() -> None:
    built = {d.name: d for d in runner_deployments()}
    for spec in DEPLOYMENTS:
        assert built[spec.name].flow_name == load_flow(spec.entrypoint).name
        assert built[spec.name].tags == list(spec.tags)
