"""The main job: certpilot's whole lifecycle on the embedded defaults, against a lab on loopback.

Started by scripts/main.sh with PREFECT_API_URL pointing at a local Prefect server, so every run
shows in its UI. Steps:
1. the lab: a farm of TLS endpoints whose certificates expire across every alert band (and a few
   hostile ones), and, where it can be started, an SSH host with two nginx sites and one haproxy;
2. a private CA and its issuer block; the source blocks (TLS scan, SSH host); a managed certificate
   for www.lab.test with a target on each web server;
3. the discover flow; the renew-due flow (renews what is due and deploys it, verified on the wire);
   a deploy-certificate run per managed certificate, which reconciles targets that do not serve
   what they should (the lab is new on every run); discovery again, which now sees the new
   certificate served and flags what is gone as ghosts;
4. the monitor flow, twice: what is served against what should be, the silent stalls, de-duplicated
   alerts delivered to a webhook receiver on loopback (the second run tells nothing new), the SLIs;
5. an emergency drill: revoke-and-replace of www.lab.test for a key compromise, its blast radius (a
   dry run) first, then for real: a new key, issued, deployed canary-first and verified on every
   target, the old certificate revoked, every place it was seen probed for exposure;
6. the reports flow: the 47-day readiness forecast (with its chart), the riskiest certificates, the
   crypto inventory and the per-owner compliance report, as artifacts; discovery evaluated the lab's
   certificates against the policy (the built-in one, or $CERTPILOT_POLICY) and assigned owners;
7. the expiry report, the targets' state and the audit chain.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lab/ is part of the checkout, not of the package

from cryptography.hazmat.primitives import serialization  # noqa: E402
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from rich.console import Console
from rich.table import Table

from blocks.issuers import PrivateCABlock
from blocks.ssh import SshHostBlock
from blocks.targets import DeploymentTargetBlock
from blocks.tls_scan import TlsScanBlock
from certpilot import alert_policy, audit, ca, managed, targets
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import NotFoundError
from certpilot.models import Certificate
from certpilot.report import expiry_report
from certpilot.settings import load_settings
from connectors import kms
from connectors.http_service import HTTPService, build_app
from flows.deploy import deploy_certificate
from flows.discover import discover
from flows.monitor import monitor
from flows.renew import renew_due
from flows.reports import reports
from flows.revoke_and_replace import revoke_and_replace
from lab import tls_farm
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from lab.receivers import WebhookReceiver
from lab.sshd import SshServer

CA_NAME = "lab-ca"
MANAGED = "www.lab.test"
out = Console(highlight=False)


def pem(*certs: object) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)  # type: ignore[attr-defined]


def step(text: str) -> None:
    out.print(f"\n[bold]== {text}[/]")


def ensure_pki(engine, ring, actor) -> str:  # noqa: ANN001
    """The lab's private CA (created once, kept in the inventory) and its issuer block. Returns its root PEM."""
    with write_session(engine) as session:
        try:
            authority = ca.get_ca(session, CA_NAME)
        except NotFoundError:
            authority = ca.init_ca(session, ring, actor, CA_NAME, "http://127.0.0.1:8888")
            out.print(f"created private CA {CA_NAME}")
        root = session.get(Certificate, authority.root_fingerprint)
    PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
    from cryptography import x509

    return pem(x509.load_der_x509_certificate(root.der))  # type: ignore[union-attr]


def serve_lab_ca(stack: ExitStack, engine, ring, actor) -> None:  # noqa: ANN001
    """The lab CA's CRL and OCSP on 127.0.0.1:8888, where its certificates say they are, for the drill: the
    revocation is then seen by both (the revoke-and-replace run measures it). When the port is taken (the
    `certpilot serve` an earlier main job left running on this inventory), that listener answers."""
    try:
        service = HTTPService(build_app(engine, ca=True, metrics=False, key_ring=lambda: ring, actor=actor),
                              ("127.0.0.1", 8888))
    except OSError:
        out.print("the lab CA's CRL and OCSP: 127.0.0.1:8888 is taken (certpilot serve of an earlier run answers)")
        return
    stack.enter_context(service)
    out.print(f"the lab CA's CRL and OCSP served on {service.url} for the drill")


def ensure_managed(engine, actor) -> None:  # noqa: ANN001
    with write_session(engine) as session:
        try:
            managed.get(session, MANAGED)
        except NotFoundError:
            managed.add(session, managed.ManagedSpec(name=MANAGED, dns_names=(MANAGED,), issuer=f"private-ca/{CA_NAME}",
                                                     validity_days=30, owner="platform-team"), actor)
            out.print(f"added managed certificate {MANAGED} (private CA, 30 days)")


def web_servers(stack: ExitStack, lab: Path) -> tuple[SshServer, list[tuple[str, str, dict]]] | None:
    """An sshd with two nginx instances and one haproxy behind it, or None where that cannot start."""
    missing = [exe for exe in ("sshd", "nginx", "haproxy") if not (shutil.which(exe) or Path(f"/usr/sbin/{exe}").exists())]
    if missing:
        out.print(f"[yellow]no SSH host with nginx in the lab: {', '.join(missing)} not installed[/]")
        return None
    try:
        server = stack.enter_context(SshServer(lab / "sshd"))
        sites = []
        for index in (1, 2):
            nginx = stack.enter_context(NginxInstance(server.home / f"nginx{index}", [MANAGED], user=server.user))
            sites.append((f"web{index}-nginx", "ssh-nginx", nginx.deploy_settings()))
        haproxy = stack.enter_context(HaproxyInstance(server.home / "haproxy", MANAGED, user=server.user))
        sites.append(("web3-haproxy", "ssh-haproxy", haproxy.deploy_settings()))
    except Exception as exc:  # the lab is optional: say why and go on with the TLS farm
        out.print(f"[yellow]no SSH host with nginx in the lab: {exc}[/]")
        return None
    return server, sites


def main() -> int:
    settings = load_settings()
    engine = get_engine(settings)
    ring = kms.load_key_ring(settings, announce=lambda m: out.print(f"[yellow]note:[/] {m}"))
    actor = audit.Actor("certpilot-demo")
    lab = Path(tempfile.mkdtemp(prefix="certpilot-lab-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, lab, True)
        step("starting the lab on 127.0.0.1")
        farm = stack.enter_context(tls_farm.TlsFarm.run(lab / "farm", tls_farm.plan(
            16, hostile=("silent", "garbage", "plaintext"), sni=[("shop.farm.test", "pay.farm.test")], leaf_only=1,
            expiry_days=(-3, 2, 6, 13, 24, 45, 80, 150, 190))))
        out.print(f"TLS farm: {len(farm.endpoints)} endpoints on ports {min(e.port for e in farm.endpoints)}-"
                  f"{max(e.port for e in farm.endpoints)} (3 hostile: silent, garbage, plaintext)")
        web = web_servers(stack, lab)

        step("private CA, blocks, managed certificate and targets")
        root_pem = ensure_pki(engine, ring, actor)
        ensure_managed(engine, actor)
        scan_targets = sorted({f"127.0.0.1:{e.port}" for e in farm.endpoints})
        sources = ["tls-scan/lab-farm"]
        if web:
            server, sites = web
            scan_targets += [f"127.0.0.1:{s['verify_port']}" for _, _, s in sites]
            SshHostBlock(address=server.host, port=server.port, user=server.user,
                         private_key=server.client_private_key, known_hosts=server.known_hosts_line,
                         discovery_globs=[f"{server.home}/**/*.crt", f"{server.home}/**/*.pem"]).save("lab-web",
                                                                                                   overwrite=True)
            sources.append("ssh-host/lab-web")
            host = SshHostBlock.load("lab-web")
            for name, kind, target_settings in sites:  # each target's settings: a form in the UI
                DeploymentTargetBlock(kind=kind, connection=host, settings={**target_settings, "trust_pem": root_pem}
                                      ).save(f"lab-{name}", overwrite=True)
            with write_session(engine) as session:
                for name, kind, _ in sites:
                    targets.configure(session, MANAGED, name, kind, f"deployment-target/lab-{name}", {}, actor)
            out.print(f"SSH host {server.user}@{server.host}:{server.port}: "
                      + ", ".join(f"{name} ({kind})" for name, kind, _ in sites))
        TlsScanBlock(targets=scan_targets, sni_names=[], timeout_seconds=2.0,
                     trust_bundle_pem=pem(farm.ca.root) + root_pem).save("lab-farm", overwrite=True)

        step("discover")
        discover(sources)
        step("renew what is due (and deploy it)")
        state = renew_due(return_state=True)
        if state.is_completed():
            summary = state.result()
            out.print(f"renew-due: {summary.due} due, {summary.renewed} renewed, {summary.failed} failed")
        else:
            out.print(state.message)
        if web:
            step(f"deploy {MANAGED} to every target, canary first (reconciles what this new lab serves)")
            result = deploy_certificate(MANAGED)
            for o in result.outcomes:
                out.print(f"  {o.target:<14} {o.kind:<12} {o.action:<15} {o.detail}")
        step("discover again: the new certificate is seen where it is served; what is gone becomes a ghost")
        discover(sources)

        step("monitor, twice: alerts go to a webhook receiver on loopback, once per alert")
        hook = stack.enter_context(WebhookReceiver())
        CustomWebhookNotificationBlock(name="lab-alerts", url=hook.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                       ).save("lab-alerts", overwrite=True)
        with write_session(engine) as session:
            alert_policy.load_policy(session, "default:\n  notify: [custom-webhook/lab-alerts]\n", actor.name, utcnow(),
                                     "the lab's alert policy")
        for run in (1, 2):
            state = monitor(probe_timeout_seconds=2.0, return_state=True)  # the farm's silent endpoint costs 2 s
            checked = state.result(raise_on_failure=False)
            if isinstance(checked, BaseException):
                out.print(f"monitor run {run}: {checked}")
                continue
            told = checked.alerts
            out.print(f"monitor run {run}: {checked.places} places, {checked.ok} ok, {checked.unreachable} unreachable; "
                      f"alerts {told.opened} opened, {told.escalated} escalated, {told.resolved} resolved; "
                      f"webhook messages so far: {len(hook.requests)}")
        for request in hook.requests[:5]:
            out.print(f"  {request.json()['subject']}", markup=False)

        if web:
            step(f"emergency drill: {MANAGED}'s key is compromised; revoke-and-replace, the blast radius first")
            serve_lab_ca(stack, engine, ring, actor)
            radius = revoke_and_replace(names=[MANAGED], return_state=True)
            out.print(radius.message or "", markup=False)
            state = revoke_and_replace(names=[MANAGED], dry_run=False, return_state=True)
            replaced = state.result(raise_on_failure=False)
            for line in (replaced.lines() if state.is_completed() else [state.message or "failed"]):
                out.print(f"  {line}", markup=False)

        step("the policy's reports: forecast, risk, crypto inventory, compliance (artifacts of the reports flow)")
        state = reports(return_state=True)
        published = state.result(raise_on_failure=False)
        if isinstance(published, BaseException):
            out.print(f"reports: {published}", markup=False)
        else:
            risk, forecast = published.risk, published.forecast
            out.print(f"risk: {risk.scored} certificates scored, {risk.weak} with a weak key or signature; forecast to "
                      f"{forecast.until}: {forecast.renewals} renewals of managed certificates, "
                      f"{forecast.exceedances} rate limits exceeded ({forecast.spread_exceedances} with renewals spread)")

        step("report")
        with read_session(engine) as session:
            report = expiry_report(session, show=10)
            rows = targets.list_targets(session, MANAGED)
        out.print(" | ".join(f"{label}: {count}" for label, count in report.bands.items()))
        table = Table(show_edge=False, pad_edge=False)
        for column in ("target", "kind", "should serve", "verified serving", "verified at (UTC)"):
            table.add_column(column)
        for t in rows:
            table.add_row(t.name, t.kind, (t.desired_fingerprint or "-")[:16], (t.verified_fingerprint or "-")[:16],
                          t.verified_at.isoformat()[:19] if t.verified_at else "-")
        out.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
