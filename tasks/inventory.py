"""Inventory tasks: thin retryable units over certpilot's core.

Each task builds what it needs, calls one core function and returns a small serialisable record.
No task returns, logs or takes a private key or a password: keys are read from files and stored
encrypted inside the core; a password is read from a Prefect Secret block inside the task.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from blocks.loading import load_block
from blocks.policy import policy_in_force
from certpilot import audit
from certpilot.database import get_engine, read_session
from certpilot.errors import TransientError
from certpilot.importer import ImportOptions, ImportSummary, import_paths
from certpilot.inventory import open_rules
from certpilot.report import expiry_report
from certpilot.settings import load_settings
from certpilot.views import escape
from connectors import kms


def retry_transient_only(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry a task only when it failed with a TransientError; bad input is not worth a retry."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def run_actor() -> audit.Actor:
    """The audit actor for the current flow run: the flow's name, and its run id for the link back."""
    run_id = flow_run.get_id()
    return audit.Actor(f"prefect:{flow_run.get_flow_name() or 'flow'}", str(run_id) if run_id else None)


def _password(secret_block: str | None) -> bytes | None:
    """The password in the Secret block named ``secret_block``; BlockNotFoundError when there is none."""
    if not secret_block:
        return None
    import prefect.blocks.system  # noqa: F401 (registers the secret block type, so load_block finds it)

    return load_block(f"secret/{secret_block}").get().encode()


@task(name="import-files", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient_only,
      timeout_seconds=3600)
def import_files(paths: list[str], owner: str | None, tags: dict[str, str], import_keys: bool,
                 password_secret: str | None) -> ImportSummary:
    """Import files and directories into the inventory, giving owners by the policy's ownership rules and
    evaluating its rules. Returns counts and the failures, nothing secret."""
    logger = get_run_logger()
    settings = load_settings()
    policy = policy_in_force(settings)  # a policy that does not load fails the task before anything is imported
    options = ImportOptions(owner=owner, tags=tags, import_keys=import_keys, password=_password(password_secret))
    report = import_paths(get_engine(settings), paths, options, run_actor(),
                          key_ring=kms.key_ring_loader(settings, announce=logger.warning), policy=policy)
    summary = report.summary()
    for failure in summary.failures:
        logger.error("import failed for %s: %s", failure.source, failure.error)
    logger.info("imported %d file(s): %d certificate(s), %d new, %d key(s) stored, %d failed", summary.files,
                summary.certificates, summary.new_certificates, summary.keys_stored, summary.failed)
    logger.info("policy %s: %d owner(s) assigned, %d violation(s) not waived %s, %d waived", policy.source,
                summary.owners_assigned, summary.violations, summary.violations_by_rule or "",
                summary.violations_waived)
    if summary.policy_error:
        logger.error("POLICY NOT APPLIED: %s", summary.policy_error)
    return summary


@task(name="publish-expiry-report", timeout_seconds=300)
def publish_expiry_report(show: int = 25) -> dict[str, int]:
    """Publish the expiry report as a Prefect artifact (key: expiry-report). Returns the band counts."""
    with read_session(get_engine()) as session:
        report = expiry_report(session, show=show)
    lines = ["# Certificate expiry", "", " | ".join(f"**{label}**: {count}" for label, count in report.bands.items()), "",
             "| band | days left | expires (UTC) | subject | owner | places | violations |",
             "|---|---|---|---|---|---|---|"]
    for row in report.soonest:
        rules = escape(", ".join(open_rules(row["violations"])))
        lines.append(f"| {row['band']} | {row['days_left']:.0f} | {row['not_after']} | {row['subject']} | "
                     f"{row['owner'] or ''} | {len(row['locations'])} | {rules} |")
    create_markdown_artifact(key="expiry-report", markdown="\n".join(lines),
                             description="Certificates in each expiry band, soonest first")
    return report.bands
