"""Renewal flows.

renew-certificate renews one managed certificate, due or not, one task per step (the policy gate first: a
request the policy refuses fails there, before any CA is contacted), under the run's renewal claim on it
(certpilot.renewing.renew_held: while another run renews it, this one fails at once saying which), in a
run named ``renew-<name>`` and tagged ``certificate:<name>`` (whoever started it: the flow adds the tag to its
own run when the caller did not, as a run started from the UI or a deployment cannot know it); then
the deploy-certificate flow, as a subflow, deploys it to its targets and verifies it there.

renew-due renews every managed certificate that is due, in batches: one task run per certificate,
named ``renew-<name>`` and tagged ``certificate:<name>``, not a flow run each; each renewed certificate
that has targets is then deployed (a deploy-certificate subflow), and so is the current certificate of
any whose targets an interrupted run left behind (killed after storing a renewal, or mid-deployment:
certpilot.renewing.left_behind), which is not due any more. Run from a deployment beside a renew-batch
deployment (a work pool, or certpilot serve), it hands each batch to a renew-batch run, a few at once,
so the workers of the pool share them, and reads each outcome from the inventory; called directly, it
renews the batches itself. Each outcome is checked; after doing all it could, the run fails with a
report naming every certificate that failed and at which step, and publishes the ``renewals`` artifact
either way.

renew-batch renews those of the certificates it is given that are still due (one that another run
renewed meanwhile is not due any more), each a task run on a bounded thread pool, then deploys them.

On failure nothing in service changes: the old certificate stays active, the failure is recorded on
the managed certificate and in the audit trail, and the run says so in an error log and its state.

Each certificate's history: every run and task run about it is tagged ``certificate:<name>``, and its
audit events of the run are the artifact ``certificate-<name>`` (renew-due: up to
tasks.history.MAX_ARTIFACTS certificates per run, the failures first). With ``dry_run`` either flow
only says what it would do (certpilot.dry_run).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import Field

from certpilot import renewing
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from certpilot.dry_run import DuePreview, RenewalPreview
from certpilot.errors import PermanentError, redact
from certpilot.issuance import IssuedCertificate, Issuer
from certpilot.keystore import KeyRef
from certpilot.managed import certificate_tag
from certpilot.renewing import (
    CertificateRenewal,
    DueCertificate,
    Failure,
    RenewalError,
    RenewalOutcome,
    RenewalPlan,
    RenewDueFailed,
    RenewDueSummary,
    SigningRequest,
    Step,
)
from certpilot.rollout import DeploymentReport
from flows.deploy import deploy_certificate
from flows.fan_out import deployment_beside, run_all
from flows.runners import thread_pool
from flows.settling import settle
from flows.tagging import tag_flow_run
from tasks.history import audit_head, publish_certificate_history
from tasks.inventory import run_actor
from tasks.renewal import (
    DEFAULT_ISSUER_SLOTS,
    IssuerUnavailable,
    SharedSlotIssuer,
    ThrottledIssuer,
    build_csr,
    check_policy,
    claim_holder_alive,
    ensure_issuer_limits,
    generate_key,
    hold_issuer_slots,
    issue_certificate,
    key_ring,
    limit_name,
    load_issuer,
    plan_renewal,
    policy_for_run,
    preview_due,
    preview_renewal,
    publish_renewal_report,
    record_renewal_failure,
    refresh_renewal_info,
    renew_managed,
    run_holder,
    select_due,
    select_left_behind,
    store_certificate,
)

RENEW_WORKERS = 8  # certificates renewed at once by one renew-due or renew-batch run (each issuer is throttled too)
BATCH_DEPLOYMENT = "renew-batch/renew-batch"  # renew-due's batches, when deployed (prefect.yaml)
BATCHES_AT_ONCE = 4  # renew-batch runs one renew-due run keeps in flight
CLOCK_MARGIN = dt.timedelta(seconds=60)  # how far apart the workers' clocks may be


# ------------------------------------------------------------------------------- renew-certificate

class TaskSteps:
    """The steps of certpilot.renewing, each a task run of the running flow run (retried on
    TransientError only); the issuer block is loaded once, here, and its connector handed to the
    issue task, holding one slot of the issuer's concurrency limit per order."""

    def __init__(self, issuer_slots: int) -> None:
        self.issuer_slots = issuer_slots
        self.plan: RenewalPlan | None = None  # the plan loaded, once it is

    def load(self, name: str) -> RenewalPlan:
        self.plan = plan_renewal(name)
        return self.plan

    def gate(self, plan: RenewalPlan) -> None:
        check_policy(plan)

    def issuer(self, plan: RenewalPlan) -> Issuer:
        ensure_issuer_limits([plan.issuer], self.issuer_slots)
        connector = load_issuer(plan.issuer, get_engine(), key_ring(), run_actor())
        return ThrottledIssuer(connector, limit_name(plan.issuer))

    def key(self, plan: RenewalPlan) -> KeyRef:
        return generate_key(plan)

    def csr(self, plan: RenewalPlan, key: KeyRef) -> SigningRequest:
        return build_csr(plan, key)

    def issue(self, plan: RenewalPlan, request: SigningRequest, issuer: Issuer) -> IssuedCertificate:
        return issue_certificate(plan, request, issuer)

    def store(self, plan: RenewalPlan, issued: IssuedCertificate, key: KeyRef) -> renewing.Renewal:
        return store_certificate(plan, issued, key)

    def record_failure(self, failure: Failure) -> str | None:
        return record_renewal_failure(failure)


RENEW_CERTIFICATE_TIMEOUT = dt.timedelta(hours=3)  # renew-certificate's whole run (and its renewal claim)


@flow(name="renew-certificate", flow_run_name="renew-{name}", description=__doc__.split("\n\n")[1],
      timeout_seconds=RENEW_CERTIFICATE_TIMEOUT.total_seconds())
def renew_certificate(name: str, issuer_slots: Annotated[int, Field(ge=1)] = DEFAULT_ISSUER_SLOTS,
                      deploy: bool = True, dry_run: bool = False) -> CertificateRenewal | RenewalPreview:
    """Renew a managed certificate now: new key, CSR, issue, store (the old one is superseded), then
    deploy it to every target and verify it there (the deploy-certificate flow).

    Args:
        name: The managed certificate.
        issuer_slots: Orders at once its issuer's concurrency limit allows, if this run creates the limit.
        deploy: Deploy the new certificate to the certificate's targets and verify it there.
        dry_run: Only say what the run would do (key, names, issuer, what it replaces, where it goes): nothing
            is generated, ordered, stored or deployed.
    """
    logger = get_run_logger()
    tag_flow_run(certificate_tag(name))
    if dry_run:
        preview = preview_renewal(plan_renewal(name), deploy)
        for line in preview.lines():
            logger.info("%s", line)
        return preview
    head = audit_head()
    try:
        return _renew_and_deploy(name, issuer_slots, deploy)
    finally:
        history = publish_certificate_history([name], head, whole_run=True, return_state=True)
        if not history.is_completed():
            logger.warning("%s's history artifact was not published: %s", name, history.message)


def _renew_and_deploy(name: str, issuer_slots: int, deploy: bool) -> CertificateRenewal:
    logger = get_run_logger()
    steps = TaskSteps(issuer_slots)
    try:
        renewal = renewing.renew_held(steps, get_engine(), name, run_holder(), alive=claim_holder_alive,
                                      lease=RENEW_CERTIFICATE_TIMEOUT)
    except RenewalError as error:
        logger.error("RENEWAL FAILED: %s", error)
        raise error from None
    logger.info("renewed %s: certificate %s (serial %s, expires %s) replaces %s", name,
                renewal.fingerprint_sha256[:16], renewal.serial_hex, renewal.not_after.isoformat(),
                (renewal.replaces or "nothing")[:16])
    if not deploy or steps.plan is None or not steps.plan.targets:
        return CertificateRenewal(renewal)
    try:
        deployment = deploy_certificate(name, renewal.fingerprint_sha256)
    except Exception as exc:  # noqa: BLE001 - any failure of the subflow is reported the same way
        logger.error("DEPLOYMENT FAILED: %s was renewed but not deployed: %s", name, redact(exc))
        raise PermanentError(f"renewed {name} ({renewal.fingerprint_sha256[:16]}) but its deployment failed, "
                             f"so its targets serve the previous certificate: {redact(exc)}") from None
    assert isinstance(deployment, DeploymentReport)  # not a dry run
    return CertificateRenewal(renewal, deployment)


# ------------------------------------------------------------------------------------------ renew-due

def _deploy_renewed(due: list[DueCertificate], outcomes: list[RenewalOutcome]) -> list[RenewalOutcome]:
    """Deploy each renewed certificate that has targets (a deploy-certificate subflow each: only
    certificates with targets cost a flow run). A failed deployment fails that certificate's outcome."""
    with_targets = {d.name for d in due if d.has_targets}
    out = []
    for outcome in outcomes:
        if outcome.ok and outcome.renewal is not None and outcome.name in with_targets:
            state = deploy_certificate(outcome.name, outcome.renewal.fingerprint_sha256, return_state=True)
            if not state.is_completed():
                outcome = outcome.not_deployed(state.message or "the deploy-certificate run failed")
        out.append(outcome)
    return out


def _redeploy(behind: list[DueCertificate]) -> list[RenewalOutcome | None]:
    """Deploy again the current certificate of each one whose targets an interrupted run left behind (a
    deploy-certificate subflow each, reconciling what each target holds): None for each that worked."""
    out: list[RenewalOutcome | None] = []
    for item in behind:
        get_run_logger().warning("%s: %s; deploying its current certificate %s again", item.name, item.reason,
                                 (item.current or "?")[:16])
        state = deploy_certificate(item.name, item.current, return_state=True)
        out.append(None if state.is_completed() else
                   RenewalOutcome.not_redeployed(item, state.message or "the deploy-certificate run failed"))
    return out


def _issuers(names: set[str]) -> dict[str, Issuer | IssuerUnavailable]:
    """Each issuer block loaded once for this flow run, built into its connector (or why it cannot be)."""
    engine, ring, actor = get_engine(), key_ring(), run_actor()
    out: dict[str, Issuer | IssuerUnavailable] = {}
    for name in sorted(names):
        try:
            out[name] = load_issuer(name, engine, ring, actor)
        except Exception as exc:  # noqa: BLE001 - its certificates fail at their issue step, with this reason
            out[name] = IssuerUnavailable(name, redact(exc))
    return out


def _renew_in_process(due: list[DueCertificate], batch_size: int, issuer_slots: int) -> list[RenewalOutcome]:
    """Renew ``due`` in batches of task runs of this flow run (one per certificate, tagged with its name),
    each batch holding its issuers' slots; then deploy what was renewed. renew-batch runs this on its
    share; renew-due runs it when there is no renew-batch deployment to fan out to."""
    limits = ensure_issuer_limits(sorted({d.issuer for d in due}), issuer_slots) if due else {}
    issuers = _issuers({d.issuer for d in due})
    policy = policy_for_run() if due else None  # read once; the gate of each renewal applies it
    outcomes: list[RenewalOutcome] = []
    size = max(1, batch_size)
    for start in range(0, len(due), size):
        batch = due[start:start + size]
        paused = {d.issuer for d in batch if limits.get(limit_name(d.issuer), 1) < 1}
        usable = {d.issuer for d in batch if d.issuer not in paused and not isinstance(issuers[d.issuer], IssuerUnavailable)}
        # The batch holds each issuer's slots (as many as its task runs can use) and its task runs share them.
        with hold_issuer_slots({i: min(limits.get(limit_name(i), 1), RENEW_WORKERS) for i in usable}) as slots:
            shared: dict[str, Issuer | IssuerUnavailable] = {
                i: SharedSlotIssuer(issuer, slots[i]) if i in slots and not isinstance(issuer, IssuerUnavailable)
                else issuer for i, issuer in issuers.items()}
            futures: list[PrefectFuture[renewing.Renewal | renewing.Skipped] | None] = []
            for item in batch:
                if item.issuer in paused:
                    futures.append(None)
                    continue
                futures.append(renew_managed.submit(item.name, shared[item.issuer], policy,  # it tags its own run
                                                    selected_with=item.current))
            settled = [settle(f) if f is not None else None for f in futures]
        outcomes += [RenewalOutcome.of(item, s.value, s.error) if s is not None else
                     RenewalOutcome(item.name, item.issuer, item.reason, step=Step.ISSUE, kept=item.current,
                                    reason=f"issuer paused: its concurrency limit {limit_name(item.issuer)} has 0 slots")
                     for item, s in zip(batch, settled)]
    return _deploy_renewed(due, outcomes)


def _fail_on(outcomes: list[RenewalOutcome], redeploys: list[RenewalOutcome | None] | None = None) -> RenewDueSummary:
    """The summary of ``outcomes`` (and ``redeploys``, see _redeploy); RenewDueFailed, after logging each
    failure, when any failed."""
    summary = RenewDueSummary.of(outcomes, redeploys or [])
    if summary.failures:
        logger = get_run_logger()
        for o in summary.failures:
            logger.error("RENEWAL FAILED: %s at step %s (issuer %s): %s; %s", o.name, o.step or "?", o.issuer,
                         o.reason, f"certificate {o.kept[:16]} stays in service" if o.kept
                         else "it has no certificate in service")
        raise RenewDueFailed(summary)
    return summary


@flow(name="renew-batch", task_runner=thread_pool(RENEW_WORKERS), description=__doc__.split("\n\n")[3],
      timeout_seconds=6 * 3600)
def renew_batch(names: list[str], within_days: Annotated[float, Field(ge=0)] = 0.0,
                issuer_slots: Annotated[int, Field(ge=1)] = DEFAULT_ISSUER_SLOTS) -> RenewDueSummary:
    """Renew those of the managed certificates named that are still due, each with its own task run
    (renew-due starts these runs, a share of what is due each, for the workers of its pool to share).

    Args:
        names: The managed certificates of this batch.
        within_days: Also renew what falls due within this many days.
        issuer_slots: Orders at once a newly created issuer concurrency limit allows.
    """
    logger = get_run_logger()
    due = select_due(within_days, names=names)
    if len(due) < len(names):
        logger.info("%d of the %d certificate(s) given are no longer due (renewed meanwhile, retired or gone)",
                    len(names) - len(due), len(names))
    logger.info("renewing %d certificate(s) in this batch", len(due))
    return _fail_on(_renew_in_process(due, len(due) or 1, issuer_slots))


def _fan_out(deployment: UUID, due: list[DueCertificate], within_days: float, batch_size: int, issuer_slots: int,
             at_once: int) -> list[RenewalOutcome]:
    """Renew ``due`` through renew-batch runs of ``deployment``, ``at_once`` at most in flight, for the
    workers of its pool (or ``certpilot serve``) to share (flows.fan_out); then read each certificate's
    outcome from the inventory, where whichever worker renewed it recorded it."""
    since = utcnow() - CLOCK_MARGIN  # failures recorded from here on, by the workers' clocks
    batches = [due[start:start + batch_size] for start in range(0, len(due), batch_size)]
    get_run_logger().info("%d certificate(s) due: %d renew-batch run(s) of %d at most, %d at once", len(due),
                          len(batches), batch_size, at_once)
    ended = run_all(deployment, [(f"renew-batch-{index + 1}-of-{len(batches)}",
                                  {"names": [d.name for d in batch], "within_days": within_days,
                                   "issuer_slots": issuer_slots}) for index, batch in enumerate(batches)], at_once)
    with read_session(get_engine()) as session:
        outcomes = renewing.recorded_outcomes(session, due, since)
    why = {d.name: end.why for batch, end in zip(batches, ended) for d in batch if not end.completed}
    return [dataclasses.replace(o, reason=f"{o.reason}; {why[o.name]}") if o.step is None and not o.ok and o.name in why
            else o for o in outcomes]


@flow(name="renew-due", task_runner=thread_pool(RENEW_WORKERS), description=__doc__.split("\n\n")[2],
      timeout_seconds=6 * 3600)
def renew_due(within_days: Annotated[float, Field(ge=0)] = 0.0, limit: Annotated[int | None, Field(ge=1)] = None,
              batch_size: Annotated[int, Field(ge=1)] = 200,
              issuer_slots: Annotated[int, Field(ge=1)] = DEFAULT_ISSUER_SLOTS,
              batches_at_once: Annotated[int, Field(ge=1)] = BATCHES_AT_ONCE,
              dry_run: bool = False) -> RenewDueSummary | DuePreview:
    """Renew every managed certificate that is due, in batches, each with its own task run.

    Args:
        within_days: Also renew what falls due within this many days.
        limit: Renew at most this many (the most overdue first); empty: all that are due.
        batch_size: Certificates per batch (a renew-batch run each, when renew-batch is deployed).
        issuer_slots: Orders at once a newly created issuer concurrency limit allows.
        batches_at_once: renew-batch runs in flight at once, for the workers to share.
        dry_run: Only list what is due and would be renewed (renewal windows as last stored): nothing is renewed.
    """
    logger = get_run_logger()
    if dry_run:
        preview = preview_due(within_days, limit)
        for line in preview.lines():
            logger.info("%s", line)
        return preview
    head = audit_head()
    refresh_renewal_info()
    due = select_due(within_days, limit)
    logger.info("%d managed certificate(s) due for renewal", len(due))
    deployment = deployment_beside(BATCH_DEPLOYMENT) if due else None
    if deployment is not None:
        outcomes = _fan_out(deployment, due, within_days, max(1, batch_size), issuer_slots, batches_at_once)
    else:
        outcomes = _renew_in_process(due, batch_size, issuer_slots)
    redeploys = _redeploy(select_left_behind([o.name for o in outcomes]))
    publish_renewal_report(outcomes + [o for o in redeploys if o is not None])
    if outcomes:  # the failures first: they are the histories an operator looks for
        history = publish_certificate_history([o.name for o in sorted(outcomes, key=lambda o: o.ok)], head,
                                              return_state=True)
        if not history.is_completed():
            logger.warning("the certificates' history artifacts were not published: %s", history.message)
    return _fail_on(outcomes, redeploys)
