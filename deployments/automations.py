"""Prefect automations for what Prefect itself sees about certpilot's runs.

Every certpilot deployment carries the ``certpilot`` tag (prefect.yaml), and so does every flow run
made from one; these automations watch those runs and send a notification, through the blocks the
alert policy's default route names, when a run:

- ends Failed or Crashed (reactive: delivered within a second of the state change);
- is Late (scheduled, and nothing picked it up: no ``certpilot serve`` and no worker running);
- stays Running longer than ``stuck_after`` without reaching a final state (proactive).

What Prefect cannot see (a source gone stale, a renewal overdue, what is served on the wire) is the
monitor flow's, through certpilot's own alerts. ``apply()`` is idempotent: each automation is found by
its name and updated in place, or created; ``certpilot serve`` calls it at start. With no block in
the default route (no alert policy loaded yet) there is nowhere to send, and apply() says so
instead of creating automations that notify no one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from certpilot.alert_policy import Policy, current_policy
from certpilot.database import get_engine, read_session
from certpilot.errors import BlockNotFoundError

TAG = "certpilot"  # the tag of every certpilot deployment and of their flow runs
FAILED = "certpilot: flow run failed or crashed"
LATE = "certpilot: flow run late"
STUCK = "certpilot: flow run stuck in Running"
NAMES = (FAILED, LATE, STUCK)
STUCK_AFTER = dt.timedelta(hours=1)
FINAL_STATES = ("Completed", "Failed", "Crashed", "Cancelled")

_BODY = """certpilot flow run {{ flow.name }}/{{ flow_run.name }} is {{ flow_run.state.name }} ({what}).
State message: {{ flow_run.state.message }}
Flow run: {{ flow_run|ui_url }}
Deployment: {{ deployment.name }}
Tags: {{ flow_run.tags|join(', ') }}
What to do: {action}"""


@dataclass(frozen=True)
class AutomationChange:
    name: str
    change: str  # created, updated, unchanged, skipped
    id: UUID | None = None
    reason: str | None = None


def _notification(block_id: UUID, subject: str, what: str, action: str) -> SendNotification:
    return SendNotification(block_document_id=block_id, subject=subject,
                            body=_BODY.replace("{what}", what).replace("{action}", action))


def _runs_of_certpilot() -> dict[str, Any]:
    return {"match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}}


def desired(block_ids: list[UUID], stuck_after: dt.timedelta = STUCK_AFTER) -> list[AutomationCore]:
    """The automations, each notifying every block in ``block_ids``."""
    failed = AutomationCore(
        name=FAILED, description="A certpilot flow run ended Failed or Crashed.",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             posture=Posture.Reactive, threshold=1, within=dt.timedelta(0), **_runs_of_certpilot()),
        actions=[_notification(b, "certpilot: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
                               "it ended without finishing its work",
                               "open the run, read its log, fix the cause and run it again") for b in block_ids])
    late = AutomationCore(
        name=LATE, description="A certpilot flow run is Late: scheduled, and nothing picked it up.",
        trigger=EventTrigger(expect={"prefect.flow-run.Late"}, posture=Posture.Reactive, threshold=1,
                             within=dt.timedelta(0), **_runs_of_certpilot()),
        actions=[_notification(b, "certpilot: flow run {{ flow_run.name }} is late",
                               "its scheduled time passed and nothing runs it",
                               "check that certpilot serve (or a worker of its work pool) is running")
                 for b in block_ids])
    minutes = int(stuck_after.total_seconds() // 60)
    stuck = AutomationCore(
        name=STUCK, description=f"A certpilot flow run stayed Running for {minutes} minutes without finishing.",
        trigger=EventTrigger(after={"prefect.flow-run.Running"},
                             expect={f"prefect.flow-run.{state}" for state in FINAL_STATES},
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=stuck_after, **_runs_of_certpilot()),
        actions=[_notification(b, "certpilot: flow run {{ flow_run.name }} stuck in Running",
                               f"Running for more than {minutes} minutes",
                               "open the run: if it hangs on a host or a CA, cancel it and run it again")
                 for b in block_ids])
    return [failed, late, stuck]


def _block_ids(client: Any, references: tuple[str, ...]) -> list[UUID]:
    ids = []
    for reference in references:
        slug, _, name = reference.partition("/")
        try:
            document = client.read_block_document_by_name(name=name, block_type_slug=slug, include_secrets=False)
        except Exception as exc:  # noqa: BLE001 - Prefect raises ObjectNotFound or an HTTP error
            raise BlockNotFoundError(reference, f"the alert policy's default route names it ({exc})") from None
        ids.append(document.id)
    return ids


def _comparable(automation: AutomationCore) -> dict[str, Any]:
    """What decides whether an automation must be updated. Python values, not JSON: a trigger's
    ``expect`` and ``after`` are sets, and the same set read back from the API can list its members in
    another order (which made an unchanged automation look changed now and then)."""
    return automation.model_dump(include={"name", "description", "enabled", "trigger", "actions"})


def apply(policy: Policy | None = None, stuck_after: dt.timedelta = STUCK_AFTER) -> list[AutomationChange]:
    """Create or update the automations so they notify the default route's blocks (the policy in the
    inventory unless one is given). BlockNotFoundError when the policy names a block that is not saved."""
    if policy is None:
        with read_session(get_engine()) as session:
            policy = current_policy(session)
    references = policy.default.notify or policy.default.page
    if not references:
        reason = "the alert policy's default route names no notification block (certpilot alerts policy load FILE)"
        return [AutomationChange(name, "skipped", reason=reason) for name in NAMES]
    changes = []
    with get_client(sync_client=True) as client:
        for automation in desired(_block_ids(client, references), stuck_after):
            existing = client.read_automations_by_name(automation.name)
            if not existing:
                changes.append(AutomationChange(automation.name, "created", client.create_automation(automation)))
                continue
            current, *duplicates = existing
            for duplicate in duplicates:  # two with one name (made by hand, or by a race): keep one
                client.delete_automation(duplicate.id)
            if _comparable(AutomationCore(**current.model_dump())) == _comparable(automation) and not duplicates:
                changes.append(AutomationChange(automation.name, "unchanged", current.id))
                continue
            client.update_automation(current.id, automation)
            changes.append(AutomationChange(automation.name, "updated", current.id))
    return changes
