"""Flow runs are tagged with the certificate they act on, so its history is one filter away in the UI."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run


def tag_flow_run(*tags: str) -> None:
    """Add ``tags`` to the current flow run, in one update, unless it was created with them (a run started
    from the UI or a deployment cannot know its certificate's tag)."""
    run_id = flow_run.get_id()
    if run_id is None:
        raise RuntimeError("tag_flow_run is called from a flow run only")
    current = set(flow_run.get_tags() or [])
    if set(tags) <= current:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(run_id), tags=sorted(current | set(tags)))
