"""Renewal flows.

renew-certificate renews one managed certificate, one task per step, in a run named
``renew-<name>`` and tagged ``certificate:<name>`` (whoever started it: the flow adds the tag to its
own run when the caller did not, as a run started from the UI or a deployment cannot know it); then
the deploy-certificate flow, as a subflow, deploys it to its targets and verifies it there.

renew-due renews every managed certificate that is due, in batches, on a bounded thread pool: one
task run per certificate, named ``renew-<name>`` and tagged ``certificate:<name>``, not a flow run
each; then each renewed certificate that has targets is deployed (a deploy-certificate subflow). Each
outcome is checked; after doing all it could, the run fails with a report naming every
certificate that failed and at which step, and publishes the ``renewals`` artifact either way.

On failure nothing in service changes: the old certificate stays active, the failure is recorded on
the managed certificate and in the audit trail, and the run says so in an error log and its state.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from certpilot.errors import PermanentError
from certpilot.managed import certificate_tag
from flows.deploy import deploy_certificate
from flows.tagging import tag_flow_run
from certpilot.managed import PermanentRenewalError, RenewalError, TransientRenewalError, is_transient, safe_reason
from tasks.renewal import (DEFAULT_ISSUER_SLOTS, batch_slots, build_csr, ensure_issuer_limits,
                           generate_key, issue_certificate, limit_name, plan_renewal, publish_renewal_report,
                           record_renewal_failure, refresh_renewal_info, renew_managed, select_due, store_certificate)

RENEW_WORKERS = 8  # certificates renewed at once by one renew-due run (each issuer is throttled as well)


def _pool_size() -> int:
    """How many task runs the running flow's task runner runs at once (it bounds the issuer slots a batch takes)."""
    context = FlowRunContext.get()
    size = getattr(context.task_runner, "_max_workers", None) if context else None
    return size if isinstance(size, int) and size > 0 else RENEW_WORKERS


@flow(name="renew-certificate", flow_run_name="renew-{name}", description=__doc__.split("\n\n")[1])
def renew_certificate(name: str, issuer_slots: int = DEFAULT_ISSUER_SLOTS, deploy: bool = True) -> dict[str, Any]:
    """Renew managed certificate ``name`` now: new key, CSR, issue, store (the old one is superseded),
    then, with ``deploy``, deploy it to every target and verify it there (the deploy-certificate flow).

    ``issuer_slots`` is how many orders at once its issuer's concurrency limit allows, if this run creates it."""
    logger = get_run_logger()
    tag_flow_run(certificate_tag(name))
    plan = plan_renewal(name)
    issuer = plan["issuer"]
    ensure_issuer_limits([issuer], issuer_slots)
    step, key_ref = "key", None
    try:
        key_ref = generate_key(name, issuer)
        step = "csr"
        csr_pem = build_csr(name, issuer, key_ref)
        step = "issue"
        chain = issue_certificate(name, issuer, csr_pem)
        step = "store"
        renewal = store_certificate(name, issuer, chain, key_ref)
    except Exception as exc:
        reason = exc.reason if isinstance(exc, RenewalError) else safe_reason(exc)
        try:
            kept = record_renewal_failure(name, step, reason, key_ref)
        except Exception as record_exc:
            kept = plan["current"]
            reason += f" (recording this failure also failed: {safe_reason(record_exc)})"
        kind = TransientRenewalError if is_transient(exc) else PermanentRenewalError
        error = kind(name, step, issuer, reason, kept)
        logger.error("RENEWAL FAILED: %s", error)
        raise error from None
    logger.info("renewed %s: certificate %s (serial %s, expires %s) replaces %s", name,
                renewal["fingerprint_sha256"][:16], renewal["serial"], renewal["not_after"],
                (renewal["replaces"] or "nothing")[:16])
    if deploy and plan["targets"]:
        try:
            renewal["deployment"] = deploy_certificate(name, renewal["fingerprint_sha256"])
        except Exception as exc:
            logger.error("DEPLOYMENT FAILED: %s was renewed but not deployed: %s", name, safe_reason(exc))
            raise PermanentError(f"renewed {name} ({renewal['fingerprint_sha256'][:16]}) but its deployment failed, "
                                 f"so its targets serve the previous certificate: {safe_reason(exc)}") from None
    return renewal


def _outcome(due: dict[str, Any], future: Any) -> dict[str, Any]:
    base = {"name": due["name"], "issuer": due["issuer"], "why": due["reason"]}
    state = future.state
    if state.is_completed():
        return {**base, "ok": True, **future.result()}
    try:
        exc = future.result(raise_on_failure=False)
    except Exception as raised:  # a crashed or cancelled run may have no exception to give back
        exc = raised
    if isinstance(exc, RenewalError):
        return {**base, "ok": False, "step": exc.step, "reason": exc.reason, "kept": exc.kept}
    reason = safe_reason(exc) if isinstance(exc, BaseException) else (state.message or state.name)
    return {**base, "ok": False, "step": "?", "reason": f"{state.name}: {reason}", "kept": due["current"]}


def _deploy_renewed(due: list[dict[str, Any]], outcomes: list[dict[str, Any]]) -> None:
    """Deploy each renewed certificate that has targets (a deploy-certificate subflow each: only
    certificates with targets cost a flow run). A failed deployment fails that certificate's outcome."""
    with_targets = {d["name"] for d in due if d.get("targets")}
    for outcome in outcomes:
        if not outcome["ok"] or outcome["name"] not in with_targets:
            continue
        state = deploy_certificate(outcome["name"], outcome["fingerprint_sha256"], return_state=True)
        if not state.is_completed():
            outcome.update(ok=False, step="deploy", kept=outcome.get("replaces"),
                           reason=f"renewed as {outcome['fingerprint_sha256'][:16]} but not deployed: {state.message}")


@flow(name="renew-due", task_runner=ThreadPoolTaskRunner(max_workers=RENEW_WORKERS),
      description=__doc__.split("\n\n")[2])
def renew_due(within_days: float = 0.0, limit: int | None = None, batch_size: int = 200,
              issuer_slots: int = DEFAULT_ISSUER_SLOTS) -> dict[str, Any]:
    """Renew every managed certificate due now (or within ``within_days``), at most ``limit``.

    ``batch_size`` certificates are submitted at a time; ``issuer_slots`` is how many orders at once a
    newly created issuer concurrency limit allows."""
    logger = get_run_logger()
    refresh_renewal_info()
    due = select_due(within_days, limit)
    logger.info("%d managed certificate(s) due for renewal", len(due))
    limits = ensure_issuer_limits(sorted({d["issuer"] for d in due}), issuer_slots) if due else {}
    workers = _pool_size()
    outcomes: list[dict[str, Any]] = []
    for start in range(0, len(due), max(1, batch_size)):
        batch = due[start:start + max(1, batch_size)]
        issuers = {d["issuer"] for d in batch}
        paused = {i for i in issuers if limits.get(limit_name(i), 1) < 1}
        # The batch holds each issuer's slots (as many as it can use) and its task runs share them.
        with batch_slots({i: min(limits.get(limit_name(i), 1), workers) for i in issuers - paused}):
            futures = []
            for item in batch:  # renew_managed tags its own run (see tasks.renewal.tag_task_run)
                futures.append(renew_managed.submit(item["name"], item["issuer"])
                               if item["issuer"] not in paused else None)
            wait([f for f in futures if f is not None])
        outcomes += [_outcome(item, future) if future is not None else
                     {"name": item["name"], "issuer": item["issuer"], "why": item["reason"], "ok": False,
                      "step": "issue", "reason": f"issuer paused: its concurrency limit {limit_name(item['issuer'])} "
                                                 "has 0 slots", "kept": item["current"]}
                     for item, future in zip(batch, futures)]
    _deploy_renewed(due, outcomes)
    publish_renewal_report(outcomes)
    failed = [o for o in outcomes if not o["ok"]]
    summary = {"due": len(due), "renewed": len(outcomes) - len(failed), "failed": len(failed),
               "failures": [{k: o[k] for k in ("name", "issuer", "step", "reason", "kept")} for o in failed]}
    if failed:
        for o in failed:
            logger.error("RENEWAL FAILED: %s at step %s (issuer %s): %s; %s", o["name"], o["step"], o["issuer"],
                         o["reason"], f"certificate {o['kept'][:16]} stays in service" if o["kept"]
                         else "it has no certificate in service")
        shown = "; ".join(f"{o['name']} at {o['step']} ({o['issuer']}): {o['reason']}" for o in failed[:10])
        more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
        raise PermanentError(f"{len(failed)} of {len(due)} renewal(s) failed, the certificates in service were kept "
                             f"({summary['renewed']} renewed): {shown}{more}")
    return summary
