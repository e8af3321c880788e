"""`certpilot renew`: one managed certificate now, or every one that is due.

With a Prefect API configured (cli.prefect_api) the renew-certificate and renew-due flows run there,
so their runs are in the operator's history. Without one the same steps of certpilot.renewing run
directly in this process: no flow run is created and nothing is written to the user's own Prefect
database; the issuer block is still read through Prefect (Block.load, analytics off). A renewed
certificate that has targets is then deployed directly too. Either way the result is the same typed
record (``--json`` prints it) and a failure is a CertpilotError (exit 1, one error style).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from certpilot import managed, renewing, rollout
from certpilot.database import get_engine, read_session
from certpilot.errors import CertpilotError, PermanentError, redact
from certpilot.issuance import Issuer
from certpilot.renewing import CertificateRenewal, RenewalOutcome, RenewDueFailed, RenewDueSummary
from cli import fleet, prefect_api
from cli.console import line, out
from cli.options import actor


def renew_now(name: str) -> CertificateRenewal:
    """Renew ``name`` (and deploy it, if it has targets): the flow with a Prefect API, else directly."""
    with read_session(get_engine()) as session:
        managed.get(session, name)  # fail fast on a name that does not exist
    if prefect_api.configured():
        from prefect import tags

        from flows.renew import renew_certificate

        with tags(managed.certificate_tag(name)):
            result: CertificateRenewal = prefect_api.flow_result(renew_certificate(name=name, return_state=True),
                                                            renewing.RenewalError)
        return result
    prefect_api.no_history_note()
    return _Direct().renew(name)


def renew_due_now(ahead: dt.timedelta) -> RenewDueSummary:
    """Renew every managed certificate due now (or within ``ahead``): renew-due with a Prefect API,
    else directly, one after the other. RenewDueFailed (after all that could be done) if any failed."""
    if prefect_api.configured():
        from flows.renew import renew_due

        summary: RenewDueSummary = prefect_api.flow_result(
            renew_due(within_days=ahead.total_seconds() / 86400, return_state=True), RenewDueFailed)
        return summary
    prefect_api.no_history_note()
    return _Direct().renew_due(ahead)


class _Direct:
    """The renewal steps run in this process, each issuer block loaded once for this command, the policy
    in force read once (the issuance gate of each renewal applies it)."""

    def __init__(self) -> None:
        from blocks.policy import policy_in_force
        from tasks.renewal import key_ring, load_issuer, retry_delays

        self.engine, self.actor = get_engine(), actor()
        self.issuers: dict[str, Issuer] = {}
        self.delays = retry_delays()
        # The issuance gate's policy, read once for the command (a policy that cannot be read stops it here).
        self.steps = renewing.DirectSteps(self.engine, self._issuer, key_ring(), self.actor,
                                          policy=policy_in_force())
        self._load = load_issuer

    def _issuer(self, block: str) -> Issuer:
        if block not in self.issuers:
            self.issuers[block] = self._load(block, self.engine, self.steps.key_ring, self.actor)
        return self.issuers[block]

    def _renewed(self, name: str) -> renewing.Renewal:
        """Renew ``name`` under this process's claim (renewing.renew_held: not while another run renews it);
        a transient failure is tried again after the renew task's delays."""
        from tasks.renewal import claim_holder_alive

        holder = renewing.process_holder()

        def renew(n: str) -> renewing.Renewal:
            return renewing.renew_held(self.steps, self.engine, n, holder, alive=claim_holder_alive)

        return fleet.retrying(renew, self.delays)(name)

    def _claimed(self, holder: str, selected_with: str | None,
                 ) -> Callable[[str], renewing.Renewal | renewing.Skipped]:
        """Renew a due certificate under ``holder``'s claim, if ``selected_with`` is still in service (as
        renew-due's batches do: renewing.renew_claimed), so a run elsewhere at the same time cannot
        renew it too."""
        from tasks.renewal import claim_holder_alive

        def renew(name: str) -> renewing.Renewal | renewing.Skipped:
            return renewing.renew_claimed(self.steps, self.engine, name, holder, selected_with, claim_holder_alive)

        return renew

    def _deploy(self, renewal: renewing.Renewal) -> rollout.DeploymentReport:
        with read_session(self.engine) as session:
            plan = rollout.plan(session, renewal.name, renewal.fingerprint_sha256)
        return fleet.deploy_directly(plan, None, 4)

    def renew(self, name: str) -> CertificateRenewal:
        renewal = self._renewed(name)
        if not renewing.plan(self.engine, name).targets:
            return CertificateRenewal(renewal)
        try:
            return CertificateRenewal(renewal, self._deploy(renewal))
        except CertpilotError as exc:
            raise PermanentError(f"renewed {name} ({renewal.fingerprint_sha256[:16]}) but its deployment failed, "
                                 f"so its targets serve the previous certificate: {redact(exc)}") from None

    def _redeploy_left_behind(self, done: set[str]) -> list[RenewalOutcome | None]:
        """Deploy again the current certificate of each managed certificate (not in ``done``) whose targets
        an interrupted run left behind (renewing.left_behind): None for each that worked, else its failure."""
        with read_session(self.engine) as session:
            behind = renewing.left_behind(session, done)
        out: list[RenewalOutcome | None] = []
        for item in behind:
            try:
                with read_session(self.engine) as session:
                    plan = rollout.plan(session, item.name)
                fleet.deploy_directly(plan, None, 4)
                out.append(None)
            except CertpilotError as exc:
                out.append(RenewalOutcome.not_redeployed(item, redact(exc)))
        return out

    def renew_due(self, ahead: dt.timedelta) -> RenewDueSummary:
        from certpilot.clock import utcnow

        with read_session(self.engine) as session:
            due = renewing.due_certificates(session, utcnow() + ahead)
        outcomes = []
        holder = renewing.process_holder()  # its claims (renewing.renew_claimed)
        for item in due:
            try:
                outcome = RenewalOutcome.of(item, fleet.retrying(self._claimed(holder, item.current),
                                                                 self.delays)(item.name), None)
            except renewing.RenewalError as exc:
                outcome = RenewalOutcome.of(item, None, exc)
            if outcome.ok and outcome.renewal is not None and item.has_targets:
                try:
                    self._deploy(outcome.renewal)
                except CertpilotError as exc:
                    outcome = outcome.not_deployed(redact(exc))
            outcomes.append(outcome)
        summary = RenewDueSummary.of(outcomes, self._redeploy_left_behind({o.name for o in outcomes}))
        if summary.failures:
            raise RenewDueFailed(summary)
        return summary


def print_renewal(result: CertificateRenewal) -> None:
    r = result.renewal
    out.print(line(f"renewed {r.name}: certificate {r.fingerprint_sha256[:16]} (serial {r.serial_hex}), "
                   f"expires {r.as_dict()['not_after']}" + (f", replaces {r.replaces[:16]}" if r.replaces else "")))
    if result.deployment is not None:
        out.print(line(f"deployed to {len(result.deployment.outcomes)} target(s) and verified there"))


def print_summary(summary: RenewDueSummary) -> None:
    out.print(line(f"{summary.due} due: {summary.renewed} renewed, {summary.failed} failed"))
