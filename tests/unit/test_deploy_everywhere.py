"""rollout.deploy_everywhere, the one orchestration of a deploy run, over a seam that records the
batches it is given: the canary alone first, then waves; after a failure no further wave, every
changed target rolled back (last changed first), the culprits named apart from the rolled-back ones.
The flow and the CLI supply the real seams (tests/flows/test_deploy_flow.py,
tests/integration/ssh/test_cli_without_prefect_api.py)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import pytest

from certpilot.deployment import Receipt
from certpilot.errors import PermanentError, TransientError
from certpilot.rollout import (
    Action,
    DeploymentFailed,
    DeploymentPlan,
    DeployStep,
    Outcome,
    PlannedTarget,
    RollbackStep,
    Step,
    TargetFailed,
    deploy_everywhere,
)

OLD, NEW = "a" * 64, "b" * 64


def plan(*names: str) -> DeploymentPlan:
    return DeploymentPlan("www.test", NEW, tuple(PlannedTarget(n, "ssh-nginx", OLD, OLD) for n in names))


class Fleet:
    """Targets that serve OLD until deployed; ``failing`` ones fail their verification (and roll
    themselves back), ``broken`` ones raise an error that is not certpilot's."""

    def __init__(self, failing: Sequence[str] = (), broken: Sequence[str] = ()) -> None:
        self.failing, self.broken = set(failing), set(broken)
        self.batches: list[list[tuple[str, str]]] = []

    def __call__(self, steps: Sequence[Step]) -> list[Outcome | BaseException]:
        self.batches.append([("deploy" if isinstance(s, DeployStep) else "rollback", s.target) for s in steps])
        return [self.run(s) for s in steps]

    def run(self, step: Step) -> Outcome | BaseException:
        if isinstance(step, RollbackStep):
            return Outcome(step.target, step.kind, Action.ROLLED_BACK, step.receipt.previous_fingerprint, "rolled back")
        if step.target in self.broken:
            return OSError(f"connection to {step.target} reset")
        if step.target in self.failing:
            return TargetFailed(Outcome(step.target, step.kind, Action.ROLLED_BACK, OLD, "verify: not served"))
        return Outcome(step.target, step.kind, Action.DEPLOYED, step.fingerprint, "served",
                       Receipt(step.target, step.kind, step.fingerprint, OLD, {"backup": "x.certpilot-previous"}))


def test_the_canary_alone_first_then_waves_of_concurrency() -> None:
    fleet = Fleet()
    report = deploy_everywhere(plan("a", "b", "c", "d", "e", "f"), fleet, canary="c", concurrency=2)
    assert fleet.batches == [[("deploy", "c")], [("deploy", "a"), ("deploy", "b")], [("deploy", "d"), ("deploy", "e")],
                             [("deploy", "f")]]
    assert not report.failed and report.culprits == () and report.not_attempted == ()
    assert [(o.target, o.action) for o in report.outcomes] == [(t, Action.DEPLOYED) for t in "cabdef"]
    assert pickle.loads(pickle.dumps(report)) == report  # a task and flow result: plain data


def test_a_failure_stops_the_waves_and_rolls_back_every_changed_target() -> None:
    fleet = Fleet(failing=["c"])
    report = deploy_everywhere(plan("a", "b", "c", "d", "e"), fleet, concurrency=2)
    assert fleet.batches == [[("deploy", "a")], [("deploy", "b"), ("deploy", "c")],
                             [("rollback", "b"), ("rollback", "a")]]  # the last changed first; c undid itself
    assert report.failed and report.culprits == ("c",) and report.not_attempted == ("d", "e")
    assert {o.target: o.action for o in report.outcomes} == {t: Action.ROLLED_BACK for t in "abc"}
    error = DeploymentFailed(report)
    assert "every changed target was rolled back" in str(error) and "c: rolled-back: verify" in str(error)
    assert "a:" not in str(error) and "b:" not in str(error)  # rolled back because of c: not culprits
    assert pickle.loads(pickle.dumps(error)).report == report


def test_an_error_that_is_no_outcome_is_a_failed_target_with_its_cause() -> None:
    report = deploy_everywhere(plan("a", "b"), Fleet(broken=["a"]))
    assert [(o.target, o.action) for o in report.outcomes] == [("a", Action.FAILED)]
    assert "connection to a reset" in report.outcomes[0].detail and report.not_attempted == ("b",)


def test_a_rollback_step_that_errors_leaves_its_target_failed_with_the_cause() -> None:
    class StuckFleet(Fleet):
        def run(self, step: Step) -> Outcome | BaseException:
            if isinstance(step, RollbackStep):
                return TransientError("host unreachable")
            return super().run(step)

    report = deploy_everywhere(plan("a", "b"), StuckFleet(failing=["b"]), concurrency=1)
    assert [(o.target, o.action) for o in report.outcomes] == [("a", Action.FAILED), ("b", Action.ROLLED_BACK)]
    assert report.culprits == ("b",) and "host unreachable" in report.outcomes[0].detail


def test_a_canary_that_is_not_a_target_and_a_plan_without_targets() -> None:
    with pytest.raises(PermanentError, match="canary 'z' is not a target of www.test"):
        deploy_everywhere(plan("a"), Fleet(), canary="z")
    fleet = Fleet()
    report = deploy_everywhere(plan(), fleet)
    assert fleet.batches == [] and report.outcomes == () and not report.failed


def test_json_shape() -> None:
    report = deploy_everywhere(plan("a"), Fleet())
    assert report.as_dict()["outcomes"][0] == {
        "target": "a", "kind": "ssh-nginx", "action": "deployed", "fingerprint": NEW, "detail": "served",
        "receipt": report.outcomes[0].receipt.as_dict()}  # type: ignore[union-attr]
