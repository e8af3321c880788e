"""Renewal tasks: thin retryable units over certpilot.renewing and the issuer blocks.

renew-certificate runs the steps of certpilot.renewing as separate tasks (plan, check-policy, generate-key,
build-csr, issue-certificate, store-certificate, and record-renewal-failure when one fails) so one
certificate's run shows each step; renew-due runs ``renew_managed``, every step in one task run per
certificate (a task run costs the SQLite-backed server about 50 ms to record; five per certificate
would not scale to a fleet). Both run the one sequence and the one failure mapping of the core.

Secrets: no task takes or returns a private key. generate-key returns a KeyRef, build-csr a
SigningRequest (public), issue-certificate the chain (public). Every exception leaving a step task
is a RenewalError whose reason went through certpilot.errors.redact, since Prefect logs it, stores
its text in the state message and may persist it.

Retries: TransientError only, with exponential backoff (``configure_retries`` sets the base). No
renewal task is ever served from a cache (``NO_CACHE``): their inputs are not hashed, which also
lets a flow hand them in-process objects (an issuer built from its block, holding a semaphore);
with Prefect's default cache policy such an input would fail to hash and log an error per run.

Tags: every task run here that works on one certificate (renew-due's task run per certificate, and
renew-certificate's steps) tags itself ``certificate:<name>`` when it starts running
(tasks.history.tag_with_certificate, an on_running state hook), for the reason its docstring gives.

Timeouts: each task has one, generous for its work at fleet size (an ACME order may wait for a slot
of its issuer's concurrency limit, then for validation); every network call inside has its own.

Dry runs: ``preview_renewal`` and ``preview_due`` say what a run would do (certpilot.dry_run), after
checking that the issuer block loads; they make no key, send nothing to a CA and write nothing.

Policy: the issuance gate (certpilot.renewing.check_policy) applies the policy in force, read through
blocks.policy.policy_in_force(): by check-policy in renew-certificate; once per renew-due run
(``policy_for_run``), handed to each certificate's task run. A policy that cannot be read fails each
certificate at its policy step with the reason, before any issuer is contacted.

Issuers: a flow loads each issuer block it needs once (``load_issuer``) and passes the built
connector to the tasks. Each issuer has a Prefect global concurrency limit ``issuer-<issuer slug>``
(``ensure_issuer_limits`` creates missing ones), always taken with strict=True so that a missing
limit fails instead of running unthrottled. A single order (renew-certificate) holds one slot while
the issuer works (``ThrottledIssuer``). A renew-due batch holds up to its pool size of each issuer's
slots for the whole batch (``hold_issuer_slots``) and shares them among its task runs through a
semaphore it passes in (``SharedSlotIssuer``): Prefect's sync ``concurrency()`` costs three API
writes, a lease-renewal thread and up to 2 s of joining it per acquisition, which at one acquisition
per certificate made 50 renewals take 30 s.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.tasks import exponential_backoff

import blocks.issuers  # noqa: F401  (registers the issuer block types, so load_block finds them)
from blocks.loading import load_block
from blocks.policy import policy_in_force
from certpilot import audit, inventory, managed, renewing, targets
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import NotFoundError, PermanentError, ServiceUnavailableError, redact
from certpilot.issuance import IssuedCertificate, Issuer, OrderJournal
from certpilot.dry_run import DuePreview, RenewalPreview
from certpilot.keystore import KeyRef
from certpilot.policy import Policy
from certpilot.renewal import RenewalWindow
from certpilot.renewing import Failure, RenewalOutcome, RenewalPlan, SigningRequest, Step
from certpilot.settings import load_settings
from connectors import kms
from tasks.history import tag_with_certificate
from tasks.inventory import retry_transient_only, run_actor

RETRIES = 3
DEFAULT_ISSUER_SLOTS = 4  # concurrent orders per issuer when its limit is created here


def _delays(base_seconds: float) -> list[float]:
    return exponential_backoff(backoff_factor=base_seconds)(RETRIES)


_RETRY: dict[str, Any] = {
    "retries": RETRIES, "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient_only,
    "retry_delay_seconds": _delays(float(os.environ.get("CERTPILOT_RETRY_BACKOFF_SECONDS", "5"))),
    "cache_policy": NO_CACHE, "on_running": [tag_with_certificate]}
ORDER_TIMEOUT_SECONDS = 1800  # one certificate's order: a wait for an issuer slot, validation, polling


def limit_name(issuer: str) -> str:
    """The global concurrency limit that throttles orders to ``issuer`` (``private-ca/x`` -> ``issuer-private-ca-x``)."""
    return "issuer-" + re.sub(r"[^a-z0-9]+", "-", issuer.lower()).strip("-")


def key_ring() -> managed.KeyRingSource:
    """The master key ring from the settings, read when a key is sealed or unsealed."""
    settings = load_settings()
    return kms.key_ring_loader(settings)


# ------------------------------------------------------------------------------------------ issuers

def load_issuer(issuer: str, engine: sa.Engine, ring: managed.KeyRingSource, actor: audit.Actor | None) -> Issuer:
    """The connector of issuer block ``issuer`` (``<slug>/<name>``), loaded through Prefect now.
    BlockNotFoundError (permanent) when there is no such block, PermanentError when it is not an issuer block."""
    connector: Issuer = issuer_block(issuer).get_issuer(engine, ring, actor=actor)
    return connector


def issuer_block(issuer: str) -> Any:
    """The saved issuer block ``issuer`` (``<slug>/<name>``). BlockNotFoundError (permanent) when there is
    no such block, PermanentError when it is not an issuer block."""
    block = load_block(issuer)
    if not callable(getattr(block, "get_issuer", None)):
        raise PermanentError(f"block {issuer!r} is a {type(block).__name__}, not an issuer block")
    return block


@dataclass(frozen=True)
class PolicyUnavailable:
    """The policy a renew-due run could not read: each certificate fails at its policy step, with
    ``reason``, before its issuer is contacted."""

    reason: str


def policy_for_run() -> Policy | PolicyUnavailable:
    """The policy in force (blocks.policy.policy_in_force), read once for a run, or why it cannot be."""
    try:
        return policy_in_force()
    except Exception as exc:  # noqa: BLE001 - every renewal of the run fails its gate with this reason
        return PolicyUnavailable(redact(exc))


@dataclass(frozen=True)
class IssuerUnavailable:
    """An issuer block a flow run could not load: each certificate it should sign fails at its issue
    step, before a key is made for it."""

    issuer: str
    reason: str


class ThrottledIssuer:
    """An Issuer whose orders each hold one slot of the issuer's global concurrency limit."""

    def __init__(self, issuer: Issuer, limit: str) -> None:
        self.inner = issuer
        self.name = issuer.name
        self.limit = limit

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        with _holding(self.limit, 1, {}, DEFAULT_LEASE_SECONDS):
            return self.inner.issue(csr, profile, validity_days=validity_days, replaces=replaces, journal=journal)

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        self.inner.revoke(certificate, reason, key=key)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        return self.inner.renewal_info(certificate)


class SharedSlotIssuer:
    """An Issuer whose orders each take one of the slots a batch holds (``slots``, a semaphore of as
    many as the batch holds of the issuer's concurrency limit)."""

    def __init__(self, issuer: Issuer, slots: threading.BoundedSemaphore) -> None:
        self.inner = issuer
        self.name = issuer.name
        self.slots = slots

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        with self.slots:
            return self.inner.issue(csr, profile, validity_days=validity_days, replaces=replaces, journal=journal)

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        self.inner.revoke(certificate, reason, key=key)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        return self.inner.renewal_info(certificate)


@contextmanager
def hold_issuer_slots(counts: Mapping[str, int], lease_seconds: float | None = None,
                      api_wait: float | None = None) -> Iterator[dict[str, threading.BoundedSemaphore]]:
    """Hold ``counts[issuer]`` slots of each issuer's concurrency limit (strict) while the block runs;
    yields one semaphore of as many slots per issuer, for the batch's task runs to share.

    ``lease_seconds``: how long the server keeps the slots of a process that died holding them (renewed
    every three quarters of it meanwhile; a renewal that fails then only logs). Default: Prefect's 300 s,
    and a failed renewal ends the run. ``api_wait``: how long each request for slots waits for the Prefect
    API to answer (default API_WAIT_SECONDS); a wait for slots that other runs hold is not bounded."""
    lease: dict[str, Any] = ({} if lease_seconds is None else
                             {"lease_duration": lease_seconds, "raise_on_lease_renewal_failure": False})
    with ExitStack() as stack:
        for issuer, count in sorted(counts.items()):
            stack.enter_context(_holding(limit_name(issuer), count, lease, lease_seconds or DEFAULT_LEASE_SECONDS,
                                         api_wait or API_WAIT_SECONDS))
        yield {issuer: threading.BoundedSemaphore(count) for issuer, count in counts.items()}


DEFAULT_LEASE_SECONDS = 300.0  # Prefect's, for the slots of a concurrency() that is not given one
# How long a request for slots waits for the Prefect API's answer, its client's own retries included (they
# alone take minutes against a server that accepts connections and does not answer).
API_WAIT_SECONDS = 60.0
_API_ERRORS = (httpx.TransportError, httpx.HTTPStatusError)  # the Prefect API not reached, or failing


@contextmanager
def _holding(limit: str, count: int, lease: Mapping[str, Any], lease_seconds: float,
             api_wait: float = API_WAIT_SECONDS) -> Iterator[None]:
    """``count`` slots of ``limit`` held while the block runs. A Prefect API that does not answer (a server
    restarting or hung) is ServiceUnavailableError naming it when the slots are taken, within ``api_wait``
    per request; when they are given back, only a warning: what the block did is done (renewals stored),
    and the server frees the slots itself when their lease ends."""
    held = _take(limit, count, lease, lease_seconds, api_wait)
    try:
        yield
    except BaseException as exc:
        _give_back(held, limit, lease_seconds, (type(exc), exc, exc.__traceback__))
        raise
    _give_back(held, limit, lease_seconds, (None, None, None))


def _take(limit: str, count: int, lease: Mapping[str, Any], lease_seconds: float,
          api_wait: float) -> AbstractContextManager[object]:
    """``count`` slots of ``limit``, entered: asked for again after each answer that they are taken (423,
    after its Retry-After), each request given ``api_wait`` to be answered."""
    where = f"the Prefect API at {PREFECT_API_URL.value()}"
    while True:
        held = concurrency(limit, occupy=count, strict=True, timeout_seconds=api_wait, max_retries=0, **lease)
        try:
            held.__enter__()
            return held
        except TimeoutError:
            raise ServiceUnavailableError(
                "prefect", "acquire", "Timeout", f"no answer within {api_wait:g} s", where=where,
                message=f"{where} did not answer within {api_wait:g} s when taking {count} slot(s) of concurrency "
                        f"limit {limit} (any it granted are freed when their lease ends, {lease_seconds:.0f} s)",
            ) from None
        except Exception as exc:  # Prefect wraps what the API did in ConcurrencySlotAcquisitionError (raise ... from)
            cause = exc if isinstance(exc, _API_ERRORS) else exc.__cause__
            if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423:
                time.sleep(_retry_after(cause.response))  # other runs hold the slots: wait for them
                continue
            if not isinstance(cause, _API_ERRORS):
                raise
            raise ServiceUnavailableError("prefect", "acquire", type(cause).__name__, redact(cause), where=where,
                                          message=f"{where} did not answer when taking {count} slot(s) of "
                                                  f"concurrency limit {limit} ({redact(cause)})") from None


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 423 from the Prefect API asks to wait (its Retry-After), kept within 0.1-30 s."""
    try:
        seconds = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.1), 30.0)


def _give_back(held: AbstractContextManager[object], limit: str, lease_seconds: float,
               exc_info: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
    try:
        held.__exit__(*exc_info)
    except _API_ERRORS as exc:
        get_run_logger().warning("could not give back the slots of concurrency limit %s: the Prefect API at %s "
                                 "did not answer (%s); the server frees them when their lease ends (%.0f s)",
                                 limit, PREFECT_API_URL.value(), redact(exc), lease_seconds)


@task(name="ensure-issuer-limits", timeout_seconds=120)
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
def _step(name: str, step: Step, issuer: str) -> Iterator[None]:
    """Whatever a step raises leaves the task as the step's RenewalError (redacted)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - redacted and re-raised as the step's error
        raise renewing.step_error(name, step, issuer, exc) from None


@task(name="plan-renewal", task_run_name="plan-{name}", cache_policy=NO_CACHE, on_running=[tag_with_certificate],
      timeout_seconds=120)
def plan_renewal(name: str) -> RenewalPlan:
    """Which issuer renews ``name`` and what it replaces (public facts only). NotFoundError (not
    retried, nothing recorded) when there is no such managed certificate."""
    try:
        return renewing.plan(get_engine(), name)
    except NotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - redacted and re-raised as the step's error
        raise renewing.step_error(name, Step.LOAD, "?", exc) from None


@task(name="check-policy", task_run_name="check-policy-{plan.name}", timeout_seconds=120, **_RETRY)
def check_policy(plan: RenewalPlan) -> None:
    """The issuance gate: the request renewing the plan's certificate would make, against the policy in
    force (blocks.policy.policy_in_force) and its waivers. Fails (permanent, not retried) naming every
    rule it violates; nothing is sent to a CA then."""
    with _step(plan.name, Step.POLICY, plan.issuer):
        renewing.check_policy(get_engine(), plan, policy_in_force())


@task(name="generate-key", task_run_name="generate-key-{plan.name}", timeout_seconds=300, **_RETRY)
def generate_key(plan: RenewalPlan) -> KeyRef:
    """Generate and store (encrypted) the next key of the plan's certificate. Returns its KeyRef, never the key."""
    with _step(plan.name, Step.KEY, plan.issuer):
        return renewing.new_key(get_engine(), plan, key_ring(), run_actor())


@task(name="build-csr", task_run_name="build-csr-{plan.name}", timeout_seconds=120, **_RETRY)
def build_csr(plan: RenewalPlan, key: KeyRef) -> SigningRequest:
    """The CSR for the plan's names, signed with the stored key ``key`` (decrypted here only)."""
    with _step(plan.name, Step.CSR, plan.issuer):
        return renewing.new_csr(get_engine(), plan, key, key_ring())


@task(name="issue-certificate", task_run_name="issue-{plan.name}", timeout_seconds=ORDER_TIMEOUT_SECONDS, **_RETRY)
def issue_certificate(plan: RenewalPlan, request: SigningRequest, issuer: Issuer) -> IssuedCertificate:
    """Send the CSR to ``issuer`` (built from its block by the flow). Returns the chain, leaf first."""
    with _step(plan.name, Step.ISSUE, plan.issuer):
        return renewing.issue(get_engine(), plan, request, issuer)


@task(name="store-certificate", task_run_name="store-{plan.name}", timeout_seconds=300, **_RETRY)
def store_certificate(plan: RenewalPlan, issued: IssuedCertificate, key: KeyRef) -> renewing.Renewal:
    """Check the issued certificate against its key and names, and make it current (the old one is superseded)."""
    with _step(plan.name, Step.STORE, plan.issuer):
        return renewing.store(get_engine(), plan, issued, key, run_actor())


@task(name="record-renewal-failure", task_run_name="record-failure-{failure.name}", timeout_seconds=300, **_RETRY)
def record_renewal_failure(failure: Failure) -> str | None:
    """Record the failure on the managed certificate and in the audit trail, destroy the unused key.
    Returns the fingerprint of the certificate that stays in service."""
    with write_session(get_engine()) as session:
        return renewing.record_failure(session, failure, run_actor())


# ------------------------------------------------------------------------------------ renew-due

@task(name="renew", task_run_name="renew-{name}", timeout_seconds=ORDER_TIMEOUT_SECONDS + 600, **_RETRY)
def renew_managed(name: str, issuer: Issuer | IssuerUnavailable, policy: Policy | PolicyUnavailable | None = None,
                  *, selected_with: str | None) -> renewing.Renewal | renewing.Skipped:
    """Every step of renewing ``name`` in one task run, with ``issuer`` (the flow built it from its
    block, throttled by the slots its batch holds) and the gate's ``policy`` (the flow read it once;
    None: read here); failures are recorded, then raised (redacted). Under the flow run's claim on
    ``name`` and only while ``selected_with`` (the certificate it was found due with) is still in service
    (certpilot.renewing.renew_claimed): else Skipped, as when two runs overlap.
    The run is named ``renew-<name>`` and tagged ``certificate:<name>``."""

    def resolve(block: str) -> Issuer:
        if isinstance(issuer, IssuerUnavailable):
            raise PermanentError(issuer.reason)
        return issuer

    chosen = policy if policy is not None else policy_for_run()
    engine, ring, actor = get_engine(), key_ring(), run_actor()
    steps = (_PolicyUnreadable(engine, resolve, ring, actor, reason=chosen.reason)
             if isinstance(chosen, PolicyUnavailable) else renewing.DirectSteps(engine, resolve, ring, actor,
                                                                                 policy=chosen))
    return renewing.renew_claimed(steps, engine, name, run_holder(), selected_with,
                                  alive=claim_holder_alive)


def run_holder() -> str:
    """Who holds the renewal claims this code takes: ``flow-run:<id>@<host>:<pid>`` inside a flow run (the
    process it runs in), else this process (certpilot.renewing.process_holder: the CLI)."""
    run_id = flow_run.get_id()
    process = renewing.process_holder()
    return f"flow-run:{run_id}@{process.removeprefix('process:')}" if run_id else process


def claim_holder_alive(holder: str) -> bool:
    """Whether the holder of a renewal claim may still be renewing: a flow run whose process, when on this
    host, is still there and that is not yet in a final state (Crashed, Failed, Cancelled, Completed) per
    the Prefect API (a run killed outside a worker stays Running there); a process of this host still there
    (certpilot.renewing.process_alive); True when it cannot be told (no API, another host)."""
    kind, _, ident = holder.partition(":")
    if kind != "flow-run":
        return renewing.process_alive(holder)
    ident, _, where = ident.partition("@")
    if where and not renewing.process_alive(f"process:{where}"):
        return False
    if not PREFECT_API_URL.value():  # no API to ask (and no temporary server started to ask one)
        return True
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(ident)).state
    except Exception:  # noqa: BLE001 - cannot tell: the claim is left to lapse at its until
        return True
    return state is None or not state.is_final()


@dataclass(frozen=True)
class _PolicyUnreadable(renewing.DirectSteps):
    """DirectSteps whose gate fails: the policy in force could not be read (``reason``)."""

    reason: str = ""

    def gate(self, plan: RenewalPlan) -> None:
        raise PermanentError(f"the policy in force could not be read: {self.reason}")


@task(name="refresh-renewal-info", timeout_seconds=1800)
def refresh_renewal_info() -> dict[str, int]:
    """Ask each issuer for its renewal window (ARI) of the certificates whose stored window is stale."""
    logger = get_run_logger()
    engine = get_engine()
    with read_session(engine) as session:
        stale = [(m.name, m.issuer, x509.load_der_x509_certificate(cert.der))
                 for m, cert in managed.stale_renewal_info(session)]
    windows: dict[str, RenewalWindow | None] = {}
    failed: dict[str, int] = {}
    issuers: dict[str, Issuer] = {}  # each block loaded once, for this task run only
    ring = key_ring()
    for name, issuer, cert in stale:
        try:
            if issuer not in issuers:
                issuers[issuer] = load_issuer(issuer, engine, ring, None)
            windows[name] = issuers[issuer].renewal_info(cert)
        except Exception as exc:  # a window is advice: renewal falls back to the policy
            failed[issuer] = failed.get(issuer, 0) + 1
            if failed[issuer] == 1:
                logger.warning("renewal info from %s unavailable (%s): its certificates follow their own policy",
                               issuer, redact(exc))
    if windows:
        with write_session(engine) as session:
            managed.record_renewal_info(session, windows)
    return {"checked": len(windows), "offered": sum(1 for w in windows.values() if w), "failed": sum(failed.values())}


@task(name="select-due", timeout_seconds=600)
def select_due(within_days: float = 0.0, limit: int | None = None,
               names: list[str] | None = None) -> list[renewing.DueCertificate]:
    """The managed certificates due for renewal now (or within ``within_days``), most overdue first;
    only those of ``names`` when given."""
    with read_session(get_engine()) as session:
        return renewing.due_certificates(session, utcnow() + dt.timedelta(days=within_days), limit, names)


@task(name="select-left-behind", timeout_seconds=600)
def select_left_behind(exclude: list[str]) -> list[renewing.DueCertificate]:
    """The managed certificates (not in ``exclude``) whose targets an interrupted run left behind, to deploy again."""
    with read_session(get_engine()) as session:
        return renewing.left_behind(session, exclude)


# ------------------------------------------------------------------------------------ dry runs

def issuer_problem(issuer: str) -> str | None:
    """Why issuer block ``issuer`` could not be used (None: it loads and is an issuer block). The
    connector is not built: building an ACME issuer may contact the CA."""
    try:
        issuer_block(issuer)
    except Exception as exc:  # noqa: BLE001 - the dry run reports it: the real run would fail on it
        return redact(exc)
    return None


@task(name="preview-renewal", task_run_name="preview-{plan.name}", cache_policy=NO_CACHE,
      on_running=[tag_with_certificate], timeout_seconds=120)
def preview_renewal(plan: RenewalPlan, deploy: bool) -> RenewalPreview:
    """What renewing the plan's certificate would do (renew-certificate's dry run), published as an
    artifact of the run. Nothing is generated, ordered or written."""
    with read_session(get_engine()) as session:
        names = tuple(t.name for t in targets.list_targets(session, plan.name)) if deploy else ()
    preview = RenewalPreview(plan, issuer_problem(plan.issuer), names)
    create_markdown_artifact(markdown="\n".join(preview.lines()),
                             description=f"Dry run: what renewing {plan.name} would do")
    return preview


@task(name="preview-due", timeout_seconds=600)
def preview_due(within_days: float = 0.0, limit: int | None = None) -> DuePreview:
    """What a renew-due run would renew now (its dry run), with the renewal windows as last stored,
    published as an artifact of the run. Nothing is renewed or written."""
    at = utcnow() + dt.timedelta(days=within_days)
    with read_session(get_engine()) as session:
        preview = DuePreview(at, tuple(renewing.due_certificates(session, at, limit)))
    create_markdown_artifact(markdown="\n".join(preview.lines()),
                             description=f"Dry run: {len(preview.due)} certificate(s) due")
    return preview


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


@task(name="publish-renewal-report", timeout_seconds=300)
def publish_renewal_report(outcomes: list[RenewalOutcome], max_rows: int = 500) -> str:
    """Publish the renewals as a markdown artifact (key: renewals), failures first. Returns its text."""
    failed = [o for o in outcomes if not o.ok]
    renewed = [o for o in outcomes if o.ok and o.renewal is not None]
    skipped = [o for o in outcomes if o.ok and o.skipped is not None]
    lines = ["# Renewals", "",
             f"**{len(outcomes)}** due: **{len(renewed)}** renewed, **{len(failed)}** failed"
             + (f", **{len(skipped)}** left to another run ({_cell(skipped[0].name)}: {_cell(skipped[0].skipped)})"
                if skipped else "") + ".", ""]
    if failed:
        lines += ["## Failed: the certificate in service was kept", "",
                  "| certificate | issuer | failed at | reason | kept in service |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(o.name)} | {_cell(o.issuer)} | {_cell(o.step or '?')} | {_cell(o.reason)} | "
                  f"{_cell((o.kept or 'none')[:16])} |" for o in failed[:max_rows]]
        lines.append("")
    if renewed:
        lines += ["## Renewed", "", "| certificate | issuer | why | new fingerprint | serial | expires (UTC) | replaces |",
                  "|---|---|---|---|---|---|---|"]
        shown = renewed[:max(0, max_rows - len(failed))]
        lines += [f"| {_cell(o.name)} | {_cell(o.issuer)} | {_cell(o.why)} | {r.fingerprint_sha256[:16]} | "
                  f"{_cell(r.serial_hex)} | {_cell(inventory.iso(r.not_after))} | "
                  f"{_cell((r.replaces or 'none')[:16])} |" for o in shown if (r := o.renewal) is not None]
        if len(renewed) > len(shown):
            lines.append(f"| ... and {len(renewed) - len(shown)} more | | | | | | |")
    markdown = "\n".join(lines)
    create_markdown_artifact(key="renewals", markdown=markdown,
                             description=f"{len(renewed)} renewed, {len(failed)} failed")
    return markdown


def retry_delays() -> list[float]:
    """The delays before each retry of a renewal now in force (``configure_retries``)."""
    return list(renew_managed.retry_delay_seconds or [])


RETRYING_TASKS = (check_policy, generate_key, build_csr, issue_certificate, store_certificate, record_renewal_failure,
                  renew_managed)


def configure_retries(backoff_seconds: float) -> list[float]:
    """Set the base of every renewal task's exponential backoff (CERTPILOT_RETRY_BACKOFF_SECONDS at
    import, 5 s by default; tests use a tiny one). Returns the delays now in force."""
    delays = _delays(backoff_seconds)
    for t in RETRYING_TASKS:
        t.retry_delay_seconds = delays
    return delays
