"""Prefect automations for certpilot's runs: apply() creates them once (by name), updates them in
place, and the Failed automation delivers to a real loopback webhook receiver.

The session harness's server runs the reactive trigger and action services (they run in ephemeral
servers), so Failed/Crashed is tested end to end; it does not run the proactive-trigger or late-run
services, so the Late and stuck-in-Running automations are checked by reading them back through the
API."""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow, tags
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import Posture

from certpilot import alert_policy
from certpilot.clock import utcnow
from certpilot.database import get_engine, write_session
from certpilot.errors import BlockNotFoundError
from deployments import automations
from lab.receivers import WebhookReceiver


@pytest.fixture
def hook(prefect_server: None, certpilot_home: Path) -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        CustomWebhookNotificationBlock(name="ops", url=receiver.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                       ).save("automation-ops", overwrite=True)
        _policy("custom-webhook/automation-ops")
        yield receiver
        with get_client(sync_client=True) as client:  # leave no automation behind for other tests
            for name in automations.NAMES:
                for automation in client.read_automations_by_name(name):
                    client.delete_automation(automation.id)


def _policy(*blocks: str) -> None:
    with write_session(get_engine()) as session:
        alert_policy.load_policy(session, textwrap.dedent(f"""\
            default:
              notify: [{", ".join(blocks)}]
            """), "test", utcnow())


def _read() -> dict[str, object]:
    with get_client(sync_client=True) as client:
        return {name: client.read_automations_by_name(name) for name in automations.NAMES}


def test_apply_creates_once_and_updates_in_place(hook: WebhookReceiver) -> None:
    created = automations.apply()
    assert [(c.name, c.change) for c in created] == [(name, "created") for name in automations.NAMES]
    assert [(c.name, c.change) for c in automations.apply()] == [(name, "unchanged") for name in automations.NAMES]
    stored = _read()
    assert all(len(found) == 1 for found in stored.values())  # type: ignore[arg-type]
    with get_client(sync_client=True) as client:
        block_id = client.read_block_document_by_name("automation-ops", "custom-webhook").id
    failed, = stored[automations.FAILED]  # type: ignore[misc]
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed.trigger.posture == Posture.Reactive
    assert [a.block_document_id for a in failed.actions] == [block_id]
    late, = stored[automations.LATE]  # type: ignore[misc]
    assert late.trigger.expect == {"prefect.flow-run.Late"}
    stuck, = stored[automations.STUCK]  # type: ignore[misc]
    assert (stuck.trigger.posture, stuck.trigger.after, stuck.trigger.within) == (
        Posture.Proactive, {"prefect.flow-run.Running"}, dt.timedelta(hours=1))
    assert stuck.trigger.expect == {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Crashed", "Cancelled")}
    for automation in (failed, late, stuck):
        assert automation.trigger.match_related.model_dump() == {"prefect.resource.role": "tag",
                                                                  "prefect.resource.id": "prefect.tag.certpilot"}

    changed = automations.apply(stuck_after=dt.timedelta(minutes=30))
    assert [(c.name, c.change) for c in changed] == [(automations.FAILED, "unchanged"), (automations.LATE, "unchanged"),
                                                     (automations.STUCK, "updated")]
    stuck_now, = _read()[automations.STUCK]  # type: ignore[misc]
    assert stuck_now.id == stuck.id and stuck_now.trigger.within == dt.timedelta(minutes=30)


def test_apply_without_a_default_channel_says_so_and_a_missing_block_is_named(hook: WebhookReceiver) -> None:
    skipped = automations.apply(alert_policy.DEFAULT_POLICY)
    assert {c.change for c in skipped} == {"skipped"} and "names no notification block" in (skipped[0].reason or "")
    _policy("custom-webhook/never-saved")
    with pytest.raises(BlockNotFoundError, match="custom-webhook/never-saved"):
        automations.apply()


@flow(name="certpilot-failing-run")
def failing_run() -> None:
    raise RuntimeError("the CA did not answer")


def test_a_failed_certpilot_run_is_notified_through_the_webhook(hook: WebhookReceiver) -> None:
    automations.apply()
    with tags("certpilot"):
        state = failing_run(return_state=True)
    assert state.is_failed()
    [request] = hook.wait_for(1, timeout=30)
    message = request.json()
    assert message["subject"].startswith("certpilot: flow run ") and message["subject"].endswith(" Failed")
    assert "certpilot flow run certpilot-failing-run/" in message["body"]
    assert "the CA did not answer" in message["body"] and "What to do: open the run" in message["body"]
    untagged = failing_run(return_state=True)  # not a certpilot run: no notification
    assert untagged.is_failed()
    time.sleep(2)
    assert len(hook.requests) == 1
