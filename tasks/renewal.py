"""Renewal tasks: thin retryable units over certpilot.managed and the issuer blocks.

renew-certificate runs the steps as separate tasks (generate-key, build-csr, issue-certificate,
store-certificate) so one certificate's run shows each step; renew-due runs ``renew_managed``, all
steps in one task run per certificate, named and tagged after it (a task run costs the SQLite-backed
server about 50 ms to record; five per certificate would not scale to a fleet).

Secrets: no task takes or returns a private key. generate-key returns a KeyRef string, build-csr a
CSR (public), issue-certificate the chain (public). Every exception leaving a task is a RenewalError
whose message was sanitised (certpilot.managed.safe_reason), since Prefect logs it, stores its text
in the state message and may persist it.

Retries: TransientError only, with exponential backoff (``configure_retries`` sets the base).

Throttling: each issuer has a Prefect global concurrency limit ``issuer-<issuer slug>``
(``ensure_issuer_limits`` creates missing ones), always taken with strict=True so that a missing
limit fails instead of running unthrottled. A single order (renew-certificate) holds one slot while
the issuer works. renew-due holds up to its pool size of each issuer's slots for the whole batch
(``batch_slots``) and shares them among its task runs through an in-process semaphore: Prefect's
sync ``concurrency()`` costs three API writes, a lease-renewal thread and up to 2 s of joining it
per acquisition, which at one acquisition per certificate made 50 renewals take 30 s.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

import blocks.issuers  # noqa: F401  (registers the issuer block types, so Block.load finds them)
from certpilot import audit, keystore, managed, targets
from certpilot.managed import certificate_tag
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import PermanentError
from certpilot.issuance import IssuedCertificate, Issuer
from certpilot.keystore import KeyRef
from certpilot.renewal import RenewalWindow
from certpilot.settings import load_settings
from tasks.inventory import retry_transient_only, run_actor

RETRIES = 3
DEFAULT_ISSUER_SLOTS = 4  # concurrent orders per issuer when its limit is created here


def _delays(base_seconds: float) -> list[float]:
    return exponential_backoff(backoff_factor=base_seconds)(RETRIES)


_RETRY = {"retries": RETRIES, "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient_only,
          "retry_delay_seconds": _delays(float(os.environ.get("CERTPILOT_RETRY_BACKOFF_SECONDS", "5")))}


def limit_name(issuer: str) -> str:
    """The global concurrency limit that throttles orders to ``issuer`` (``private-ca/x`` -> ``issuer-private-ca-x``)."""
    return "issuer-" + re.sub(r"[^a-z0-9]+", "-", issuer.lower()).strip("-")


def _ring() -> managed.KeyRingSource:
    settings = load_settings()
    return lambda: keystore.load_key_ring(settings)


# ------------------------------------------------------------------------------------------ issuers

_blocks: dict[tuple[str | None, str], Any] = {}
_blocks_lock = threading.Lock()


def _issuer_block(issuer: str) -> Any:
    """The issuer block named ``<slug>/<name>``, loaded once per flow run (renew-due asks per certificate)."""
    from prefect.blocks.core import Block

    key = (flow_run.get_id(), issuer)
    with _blocks_lock:
        if key in _blocks:
            return _blocks[key]
    try:
        block = Block.load(issuer)
    except ValueError as exc:  # Prefect's "Unable to find block document named ..." and bad slugs
        raise PermanentError(f"issuer block {issuer!r} cannot be loaded: {exc}") from None
    if not callable(getattr(block, "get_issuer", None)):
        raise PermanentError(f"block {issuer!r} is a {type(block).__name__}, not an issuer block")
    with _blocks_lock:
        if len(_blocks) > 256:
            _blocks.clear()
        _blocks[key] = block
    return block


class ThrottledIssuer:
    """An Issuer whose orders each hold one slot of the issuer's global concurrency limit."""

    def __init__(self, issuer: Issuer, limit: str) -> None:
        self.inner = issuer
        self.name = issuer.name
        self.limit = limit

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None) -> IssuedCertificate:
        with concurrency(self.limit, occupy=1, strict=True):
            return self.inner.issue(csr, profile, validity_days=validity_days, replaces=replaces)

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags) -> None:
        self.inner.revoke(certificate, reason)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        return self.inner.renewal_info(certificate)


class SharedSlotIssuer(ThrottledIssuer):
    """An Issuer whose orders each take one of the slots a batch holds (an in-process semaphore)."""

    def __init__(self, issuer: Issuer, limit: str, slots: threading.BoundedSemaphore) -> None:
        super().__init__(issuer, limit)
        self.slots = slots

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None) -> IssuedCertificate:
        with self.slots:
            return self.inner.issue(csr, profile, validity_days=validity_days, replaces=replaces)


_batch_slots: dict[tuple[str | None, str], threading.BoundedSemaphore] = {}


@contextmanager
def batch_slots(issuers: dict[str, int]) -> Iterator[None]:
    """Hold ``issuers[issuer]`` slots of each issuer's concurrency limit (strict) while the block runs;
    task runs of this flow run share them (at most that many orders to the issuer at once)."""
    run_id = str(flow_run.get_id())
    with ExitStack() as stack:
        for issuer, count in sorted(issuers.items()):
            stack.enter_context(concurrency(limit_name(issuer), occupy=count, strict=True))
            _batch_slots[(run_id, issuer)] = threading.BoundedSemaphore(count)
        try:
            yield
        finally:
            for issuer in issuers:
                _batch_slots.pop((run_id, issuer), None)


def build_issuer(issuer: str, actor: audit.Actor | None = None) -> ThrottledIssuer:
    """The connector for issuer block ``issuer``, throttled by its concurrency limit: a slot of the
    batch this flow run holds, if it holds one, else a slot of its own per order."""
    block = _issuer_block(issuer)
    connector = block.get_issuer(get_engine(), _ring(), actor=actor)
    shared = _batch_slots.get((str(flow_run.get_id()), issuer))
    if shared is not None:
        return SharedSlotIssuer(connector, limit_name(issuer), shared)
    return ThrottledIssuer(connector, limit_name(issuer))


@task(name="ensure-issuer-limits")
def ensure_issuer_limits(issuers: Sequence[str], slots: int = DEFAULT_ISSUER_SLOTS) -> dict[str, int]:
    """Create the concurrency limit of each issuer that has none (an existing one keeps its slots)."""
    out = {}
    with get_client(sync_client=True) as client:
        for issuer in sorted(set(issuers)):
            name = limit_name(issuer)
            try:
                out[name] = client.read_global_concurrency_limit_by_name(name).limit
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                except Exception:  # created meanwhile by a concurrent run: read it back
                    pass
                out[name] = client.read_global_concurrency_limit_by_name(name).limit
                get_run_logger().info("created concurrency limit %s with %d slot(s)", name, out[name])
    return out


# ------------------------------------------------------------------------------------- step tasks

@contextmanager
def _step(name: str, step: str, issuer: str) -> Iterator[None]:
    """Sanitise whatever a step raises into a RenewalError that names the step."""
    try:
        yield
    except managed.RenewalError:
        raise
    except Exception as exc:
        raise managed.renewal_error(name, step, issuer, exc, None) from None


@task(name="plan-renewal", task_run_name="plan-{name}")
def plan_renewal(name: str) -> dict[str, Any]:
    """Which issuer renews ``name`` and what it replaces (public facts only)."""
    with _step(name, "load", "?"), read_session(get_engine()) as session:
        row = managed.get(session, name)
        current = managed.current_certificate(session, row)
        return {"name": name, "issuer": row.issuer,
                "current": current.fingerprint_sha256 if current else None,
                "current_not_after": current.not_after.isoformat() if current else None,
                "targets": len(targets.list_targets(session, name))}


@task(name="generate-key", task_run_name="generate-key-{name}", **_RETRY)
def generate_key(name: str, issuer: str) -> str:
    """Generate and store (encrypted) the next key of ``name``. Returns its KeyRef, never the key."""
    with _step(name, "key", issuer):
        return str(managed.new_key(get_engine(), name, _ring(), run_actor()))


@task(name="build-csr", task_run_name="build-csr-{name}", **_RETRY)
def build_csr(name: str, issuer: str, key_ref: str) -> str:
    """The CSR for ``name``, signed with the stored key ``key_ref`` (decrypted here only). Returns PEM."""
    with _step(name, "csr", issuer):
        csr = managed.new_csr(get_engine(), name, KeyRef(key_ref.removeprefix("key:")), _ring())
        return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


@task(name="issue-certificate", task_run_name="issue-{name}", **_RETRY)
def issue_certificate(name: str, issuer: str, csr_pem: str) -> list[bytes]:
    """Send the CSR to the issuer (holding one slot of its concurrency limit). Returns the chain as DER, leaf first."""
    with _step(name, "issue", issuer):
        engine = get_engine()
        with read_session(engine) as session:
            row = managed.get(session, name)
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        issued = build_issuer(issuer, run_actor()).issue(csr, row.profile, validity_days=row.validity_days,
                                                         replaces=managed.current_x509(engine, name))
        return list(issued.chain_der)


@task(name="store-certificate", task_run_name="store-{name}", **_RETRY)
def store_certificate(name: str, issuer: str, chain_der: list[bytes], key_ref: str) -> dict[str, Any]:
    """Check the issued certificate against its key and names, and make it current (the old one is superseded)."""
    with _step(name, "store", issuer):
        engine = get_engine()
        with write_session(engine) as session:
            row = managed.get(session, name)
            renewal = managed.record_issued(session, row, IssuedCertificate(tuple(chain_der)),
                                            KeyRef(key_ref.removeprefix("key:")), run_actor())
        return renewal.as_dict()


@task(name="record-renewal-failure", task_run_name="record-failure-{name}", **_RETRY)
def record_renewal_failure(name: str, step: str, reason: str, key_ref: str | None) -> str | None:
    """Record the failure on the managed certificate and in the audit trail, destroy the unused key.
    Returns the fingerprint of the certificate that stays in service."""
    with write_session(get_engine()) as session:
        return managed.record_failure(session, name, step, reason, run_actor(),
                                      unused_key=KeyRef(key_ref.removeprefix("key:")) if key_ref else None)


# ------------------------------------------------------------------------------------ renew-due

def tag_task_run(tag: str) -> None:
    """Add ``tag`` to the running task run's record.

    Tags given at submission (``prefect.tags``, ``with_options``) make Prefect's task engine ask the
    server for a tag concurrency slot before every run; on a SQLite-backed server that request fails
    with 503 about once in five under load (its transaction upgrades from read to write) and the client
    backs off 2 s or more, which made 200 renewals take 50 to 90 s instead of 8. A tag added here, after
    that request, reaches the server with the run's next state (Completed, Failed or AwaitingRetry) and
    is filterable like any other; only a tag concurrency limit on it would not apply (none is used).
    tests/flows/test_renew_flows.py reads the tags back from the API.
    """
    context = TaskRunContext.get()
    if context is not None and tag not in context.task_run.tags:
        context.task_run.tags = [*context.task_run.tags, tag]


@task(name="renew", task_run_name="renew-{name}", **_RETRY)
def renew_managed(name: str, issuer: str) -> dict[str, Any]:
    """Every step of renewing ``name`` in one task run; failures are recorded, then raised (sanitised).
    The run is named ``renew-<name>`` and tagged ``certificate:<name>``."""
    tag_task_run(certificate_tag(name))
    actor = run_actor()
    try:
        throttled = build_issuer(issuer, actor)
    except Exception as exc:
        raise managed.fail(get_engine(), name, "issue", issuer, exc, actor) from None
    return managed.renew_one(get_engine(), name, throttled, _ring(), actor).as_dict()


@task(name="refresh-renewal-info")
def refresh_renewal_info() -> dict[str, int]:
    """Ask each issuer for its renewal window (ARI) of the certificates whose stored window is stale."""
    logger = get_run_logger()
    engine = get_engine()
    with read_session(engine) as session:
        stale = [(m.name, m.issuer, x509.load_der_x509_certificate(cert.der))
                 for m, cert in managed.stale_renewal_info(session)]
    windows: dict[str, RenewalWindow | None] = {}
    failed: dict[str, int] = {}
    issuers: dict[str, Any] = {}
    for name, issuer, cert in stale:
        try:
            if issuer not in issuers:
                issuers[issuer] = build_issuer(issuer)
            windows[name] = issuers[issuer].renewal_info(cert)
        except Exception as exc:  # a window is advice: renewal falls back to the policy
            failed[issuer] = failed.get(issuer, 0) + 1
            if failed[issuer] == 1:
                logger.warning("renewal info from %s unavailable (%s): its certificates follow their own policy",
                               issuer, managed.safe_reason(exc))
    if windows:
        with write_session(engine) as session:
            managed.record_renewal_info(session, windows)
    return {"checked": len(windows), "offered": sum(1 for w in windows.values() if w), "failed": sum(failed.values())}


@task(name="select-due")
def select_due(within_days: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
    """The managed certificates due for renewal now (or within ``within_days``), most overdue first."""
    at = managed.utcnow() + dt.timedelta(days=within_days)
    with read_session(get_engine()) as session:
        rows = [s for s in managed.schedule(session, at) if s.decision.due]
        deployed = targets.managed_with_targets(session)
    if limit is not None:
        rows = rows[:limit]
    return [{"name": s.managed.name, "issuer": s.managed.issuer, "reason": s.decision.reason,
             "current": s.current.fingerprint_sha256 if s.current else None,
             "current_not_after": s.current.not_after.isoformat() if s.current else None,
             "targets": s.managed.id in deployed} for s in rows]


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


@task(name="publish-renewal-report")
def publish_renewal_report(outcomes: list[dict[str, Any]], max_rows: int = 500) -> str:
    """Publish the renewals as a markdown artifact (key: renewals), failures first. Returns its text."""
    failed = [o for o in outcomes if not o["ok"]]
    renewed = [o for o in outcomes if o["ok"]]
    lines = ["# Renewals", "",
             f"**{len(outcomes)}** due: **{len(renewed)}** renewed, **{len(failed)}** failed.", ""]
    if failed:
        lines += ["## Failed: the certificate in service was kept", "",
                  "| certificate | issuer | failed at | reason | kept in service |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(o['name'])} | {_cell(o['issuer'])} | {_cell(o['step'])} | {_cell(o['reason'])} | "
                  f"{_cell((o.get('kept') or 'none')[:16])} |" for o in failed[:max_rows]]
        lines.append("")
    if renewed:
        lines += ["## Renewed", "", "| certificate | issuer | why | new fingerprint | serial | expires (UTC) | replaces |",
                  "|---|---|---|---|---|---|---|"]
        shown = renewed[:max(0, max_rows - len(failed))]
        lines += [f"| {_cell(o['name'])} | {_cell(o['issuer'])} | {_cell(o['why'])} | {o['fingerprint_sha256'][:16]} | "
                  f"{_cell(o['serial'])} | {_cell(o['not_after'])} | {_cell((o.get('replaces') or 'none')[:16])} |"
                  for o in shown]
        if len(renewed) > len(shown):
            lines.append(f"| ... and {len(renewed) - len(shown)} more | | | | | | |")
    markdown = "\n".join(lines)
    create_markdown_artifact(key="renewals", markdown=markdown,
                             description=f"{len(renewed)} renewed, {len(failed)} failed")
    return markdown


RETRYING_TASKS = (generate_key, build_csr, issue_certificate, store_certificate, record_renewal_failure, renew_managed)


def configure_retries(backoff_seconds: float) -> list[float]:
    """Set the base of every renewal task's exponential backoff (CERTPILOT_RETRY_BACKOFF_SECONDS at
    import, 5 s by default; tests use a tiny one). Returns the delays now in force."""
    delays = _delays(backoff_seconds)
    for t in RETRYING_TASKS:
        t.retry_delay_seconds = delays
    return delays
