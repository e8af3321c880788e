"""The deployments are written once, in prefect.yaml; deployments/ builds each of them from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments import DEPLOYMENTS, PREFECT_YAML, load_flow, load_specs, runner_deployments

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_are_those_prefect_yaml_declares() -> None:
    assert PREFECT_YAML == ROOT / "prefect.yaml"
    declared = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert [spec.name for spec in DEPLOYMENTS] == list(declared)
    renew_due = next(spec for spec in DEPLOYMENTS if spec.name == "renew-due")
    assert (renew_due.entrypoint, renew_due.cron, renew_due.concurrency_limit) == ("flows/renew.py:renew_due", "17 * * * *", 1)
    assert renew_due.tags == ("certpilot", "renewal")


def test_a_change_to_prefect_yaml_is_a_change_to_the_deployments(tmp_path: Path) -> None:
    data = yaml.safe_load(PREFECT_YAML.read_text())
    data["deployments"][0]["tags"] = ["certpilot", "changed"]
    data["deployments"][0]["schedules"] = [{"cron": "5 4 * * *", "timezone": "UTC"}]
    changed = tmp_path / "prefect.yaml"
    changed.write_text(yaml.safe_dump(data))
    first = load_specs(changed)[0]
    assert (first.tags, first.cron) == (("certpilot", "changed"), "5 4 * * *")
    data["deployments"][0]["schedules"].append({"cron": "6 4 * * *"})
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="has 2 schedules"):
        load_specs(changed)


def test_every_deployment_builds_with_its_flow() -> None:
    built = {d.name: d for d in runner_deployments()}
    for spec in DEPLOYMENTS:
        assert built[spec.name].flow_name == load_flow(spec.entrypoint).name
        assert built[spec.name].tags == list(spec.tags)
        assert built[spec.name].parameters == spec.parameters
