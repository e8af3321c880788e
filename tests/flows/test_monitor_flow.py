"""The monitor flow against real TLS endpoints on loopback (the TLS farm, and servers whose certificate a
test can change), the private CA's real CRL over HTTP, and a loopback webhook that receives the alerts:
each problem served becomes exactly its alert, told once; a second run tells nothing new; fixing the
endpoint resolves it; certificates nothing serves any more raise no expiry alert; the silent stalls
(a failed renewal, a stale source, a stuck run, an SSH host that does not answer) are alerts too."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prefect import flow
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.states import Completed, Running

from blocks.aws import AwsAccountBlock
from blocks.issuers import PrivateCABlock
from blocks.ssh import SshHostBlock
from blocks.tls_scan import TlsScanBlock
from certpilot import alert_policy, audit, inventory, keystore, managed, renewing, targets
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.issuance import IssuedCertificate
from certpilot.models import Alert, EndpointCheck, Location, ManagedCertificate, SourceRun
from certpilot.x509info import describe_certificate
from flows.monitor import MonitorSummary, monitor
from lab.moto import MotoServer
from lab.ports import free_port
from lab.receivers import WebhookReceiver
from lab.sshd import generate_client_key, openssh_private_text, openssh_public_line
from lab.tls_farm import FarmCA, TlsFarm, issue_farm_leaf, plan
from tasks.alerting import AlertSummary
from tests.integration.tls.conftest import SwitchingServer
from tests.keyprobe import leaks
from tests.private_ca_service import ServedCA, key_ring, private_ca_served

ACTOR = audit.Actor("test")
EXPIRY_DAYS = (-2, 3, 20, 200)  # expired, critical, warning, fine


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFarm]:
    plans = plan(len(EXPIRY_DAYS), expiry_days=EXPIRY_DAYS, leaf_only=1, sni=[["alpha.mon.test"]], domain="mon.test")
    with TlsFarm.run(tmp_path_factory.mktemp("monitor-farm"), plans) as running:
        yield running


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _context(directory: Path, chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey, *,
             weak: bool = False) -> ssl.SSLContext:
    stem = _fp(chain[0])[:12]
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    if weak:  # a server that speaks nothing newer than TLS 1.1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _locate(certificates: list[x509.Certificate], locator: str, source: str, *, ghost: bool = False) -> None:
    with write_session(get_engine()) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(certificates[0]), locator, source),
                                   *(inventory.Observation(describe_certificate(c), None, source)
                                     for c in certificates[1:])], ACTOR)
        if ghost:
            session.execute(sa.update(Location).where(Location.locator == locator).values(ghost=True))


def _managed_with(name: str, leaves: list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate]],
                  owner: str) -> None:
    """Managed certificate ``name`` whose certificates were ``leaves`` in turn (each superseding the last)."""
    with write_session(get_engine()) as session:
        row = managed.add(session, managed.ManagedSpec(name, (f"{name}.mon.test",), "private-ca/corp", owner=owner,
                                                       tags={"env": "prod"}), ACTOR)
        for leaf, key, issuer in leaves:
            ref = keystore.store_private_key(session, key, key_ring(), ACTOR, "generated")
            renewing.record_issued(session, row, IssuedCertificate((_der(leaf), _der(issuer))), ref, ACTOR)


def _farm_leaf(ca: FarmCA, name: str, days: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return issue_farm_leaf(ca, [name], utcnow() + dt.timedelta(days=days))


def _alerts() -> dict[tuple[str, str], Alert]:
    with read_session(get_engine()) as session:
        return {(a.object, a.condition): a for a in session.execute(sa.select(Alert)).scalars()}


def _open(alerts: dict[tuple[str, str], Alert]) -> dict[tuple[str, str], str]:
    return {key: a.severity for key, a in alerts.items() if a.state != "resolved"}


def _run(trust: str) -> tuple[MonitorSummary, dict[str, str]]:
    """One monitor run: its summary and its artifacts (key: markdown)."""
    state = monitor(trust_bundle_pem=trust, use_system_trust=True, probe_timeout_seconds=3.0,
                    service_timeout_seconds=2.0, source_interval_hours=6.0, stuck_after_minutes={"stuck-renewal": 0.0},
                    return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return state.result(), {a.key: str(a.data) for a in artifacts if a.key}  # type: ignore[return-value]


@flow(name="stuck-renewal")
def _stuck() -> None:
    """A renewal run that never ends, as far as Prefect can tell (its state is set by the test)."""


@pytest.fixture
def corp(prefect_server: None) -> Iterator[ServedCA]:
    with private_ca_served(get_engine()) as served:
        PrivateCABlock(ca_name="corp").save("corp", overwrite=True)
        yield served


def test_each_problem_is_exactly_its_alert_told_once_and_resolved_when_fixed(
        farm: TlsFarm, corp: ServedCA, tmp_path: Path) -> None:
    engine = get_engine()
    good = farm.of_kind("good")
    expired, critical, warning, fine = good
    [leaf_only] = farm.of_kind("leaf-only")
    sni_default = next(e for e in farm.of_kind("sni") if e.sni is None)
    for endpoint in good + [leaf_only]:
        _locate([x509.load_der_x509_certificate(d) for d in endpoint.chain], endpoint.locator, "tls-scan:farm")
    # the SNI listener asked for a name it has no certificate for: it serves its default one
    mismatch = f"tls://127.0.0.1:{sni_default.port}?sni=beta.mon.test"
    _locate([x509.load_der_x509_certificate(d) for d in sni_default.chain], mismatch, "tls-scan:farm")

    # Revoked and served: a private-CA certificate, revoked, served by a server the test controls.
    revoked, revoked_key = corp.issue_with_key("revoked.mon.test", validity_days=90)
    serving_revoked = {"now": _context(tmp_path, list(revoked.chain), revoked_key)}
    # The wrong certificate: managed "shop" was renewed (Y then X) but its place and its target serve Y.
    old, old_key = corp.issue_with_key("shop.mon.test", validity_days=90)
    new, new_key = corp.issue_with_key("shop.mon.test", validity_days=90)
    _managed_with("shop", [(old.leaf, old_key, corp.issuing), (new.leaf, new_key, corp.issuing)], "shop-team")
    serving_shop = {"now": _context(tmp_path, list(old.chain), old_key)}
    # Weak TLS: a server that speaks TLS 1.1 at most.
    weak_leaf, weak_key = _farm_leaf(farm.ca, "weak.mon.test", 300)
    # Not served any more: a ghost expiring in 2 days; a superseded certificate expiring in 2 days.
    ghost, _ = _farm_leaf(farm.ca, "ghost.mon.test", 2)
    _locate([ghost, farm.ca.intermediate], f"tls://127.0.0.1:{free_port()}", "tls-scan:farm", ghost=True)
    gone = _farm_leaf(farm.ca, "old-shop.mon.test", 2)
    current = _farm_leaf(farm.ca, "old-shop.mon.test", 90)
    _managed_with("old-shop", [(*gone, farm.ca.intermediate), (*current, farm.ca.intermediate)], "shop-team")
    _locate([gone[0]], "ssh://web9/etc/ssl/old-shop.pem", "ssh:web9")
    # Unreachable: a location where nothing listens any more.
    nowhere = f"tls://127.0.0.1:{free_port()}"
    _locate([_farm_leaf(farm.ca, "nowhere.mon.test", 300)[0]], nowhere, "tls-scan:farm")
    # Silent stalls: old-shop's last renewal failed; a source stopped completing; a renewal run hangs; the SSH
    # host of shop's target does not answer.
    with write_session(engine) as session:
        session.execute(sa.update(ManagedCertificate).where(ManagedCertificate.name == "old-shop").values(
            last_error="issue: the CA refused the order"))
        for name in ("old", "gone"):  # tls-scan/gone was removed since: a source no more, so not stale
            session.add(SourceRun(source=f"tls-scan:{name}", block=f"tls-scan/{name}",
                                  last_started_at=utcnow() - dt.timedelta(hours=20),
                                  last_completed_at=utcnow() - dt.timedelta(hours=20)))
    TlsScanBlock(targets=["127.0.0.1"]).save("old", overwrite=True)
    ssh_port = free_port()
    host_key = generate_client_key()
    SshHostBlock(address="127.0.0.1", port=ssh_port, user="deploy",
                 private_key=openssh_private_text(generate_client_key()),
                 known_hosts=f"[127.0.0.1]:{ssh_port} {openssh_public_line(host_key)}",
                 connect_timeout=2).save("mon", overwrite=True)

    with get_client(sync_client=True) as client:
        stuck = client.create_flow_run(_stuck, state=Running())

    weak = _context(tmp_path, [weak_leaf, farm.ca.intermediate], weak_key, weak=True)
    with (SwitchingServer(lambda n: serving_revoked["now"]) as at_revoked,
          SwitchingServer(lambda n: serving_shop["now"]) as at_shop,
          SwitchingServer(lambda n: weak) as at_weak, WebhookReceiver() as hook):
        revoked_place = f"tls://127.0.0.1:{at_revoked.port}?sni=revoked.mon.test"
        shop_place = f"tls://127.0.0.1:{at_shop.port}?sni=shop.mon.test"
        weak_place = f"tls://127.0.0.1:{at_weak.port}"
        _locate(list(revoked.chain), revoked_place, "tls-scan:lab")
        _locate(list(old.chain), shop_place, "tls-scan:lab")
        _locate([weak_leaf, farm.ca.intermediate], weak_place, "tls-scan:lab")
        with write_session(engine) as session:
            targets.add(session, "shop", "web", "ssh-nginx", "ssh-host/mon", {
                "certificate_path": "/etc/nginx/shop.pem", "key_path": "/etc/nginx/shop.key",
                "verify_host": "127.0.0.1", "verify_port": at_shop.port, "verify_sni": "shop.mon.test"}, ACTOR)
        corp.revoke(revoked.leaf)
        CustomWebhookNotificationBlock(name="monitor-test", url=hook.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                       ).save("monitor-test", overwrite=True)
        with write_session(engine) as session:
            alert_policy.load_policy(session, textwrap.dedent("""\
                default:
                  notify: [custom-webhook/monitor-test]
                digest:
                  at: "00:00"
                """), "test", utcnow())
        trust = farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()

        first, artifacts = _run(trust)
        expected = {
            (f"certificate:{expired.fingerprint}", "expired"): "page",
            (f"certificate:{critical.fingerprint}", "expiring"): "critical",
            (f"certificate:{warning.fingerprint}", "expiring"): "ticket",
            (f"place:{leaf_only.locator}", "chain-incomplete"): "critical",
            (f"place:{mismatch}", "hostname-mismatch"): "critical",
            (f"certificate:{_fp(revoked.leaf)}", "revoked-served"): "page",
            (f"place:{shop_place}", "wrong-certificate"): "critical",
            ("place:target:shop/web", "wrong-certificate"): "critical",
            (f"place:{weak_place}", "weak-tls"): "ticket",
            (f"place:{nowhere}", "unreachable"): "critical",
            (f"host:127.0.0.1:{ssh_port}", "unreachable"): "critical",
            ("managed:old-shop", "renewal-failed"): "ticket",
            ("source:tls-scan:old", "source-stale"): "ticket",
            (f"flow-run:{stuck.id}", "run-stuck"): "critical",
        }
        alerts = _alerts()
        assert _open(alerts) == expected
        told = [k for k, severity in expected.items() if severity != "ticket"]  # tickets wait for the digest
        assert first.alerts.opened == len(expected) and first.alerts.delivered == len(told)
        # Each run's deliveries are done when it ends: the told alerts, and the day's digest of the tickets
        # (its time, 00:00, has always passed), one per owner.
        messages = [m for m in hook.requests if "daily digest" not in m.json()["subject"]]
        digests = [m.json()["subject"] for m in hook.requests if "daily digest" in m.json()["subject"]]
        tickets = [k for k, severity in expected.items() if severity == "ticket"]
        counted = [re.search(r"daily digest for (.+): (\d+) ticket-level", d) for d in digests]
        assert all(counted) and len({c.group(1) for c in counted if c}) == len(digests)
        assert sum(int(c.group(2)) for c in counted if c) == len(tickets)
        assert len(messages) == len(told)
        subjects = sorted(m.json()["subject"] for m in messages)
        assert sum("revoked-served revoked.mon.test" in s for s in subjects) == 1
        assert sum("[certpilot PAGE] expired ep00000.mon.test" in s for s in subjects) == 1
        assert not any("ghost.mon.test" in s or "old-shop.mon.test" in s for s in subjects)
        assert (first.places, first.not_served) == (11, 2)  # 9 locations (no ghost), the target; the ghost and
        with read_session(engine) as session:  # the superseded certificate are shown apart
            checks = {c.place: c for c in session.execute(sa.select(EndpointCheck)).scalars()}
        assert checks[weak_place].tls_version == "TLSv1.1" and checks[revoked_place].revocation == "revoked"
        assert checks[shop_place].served_fingerprint == _fp(old.leaf) != checks[shop_place].expected_fingerprint
        assert checks[f"{fine.locator}"].ok and checks[nowhere].error and "refused" in checks[nowhere].error
        report = artifacts["monitor"]
        apart = report.split("## Not served any more")[1]
        assert "ghost.mon.test" in apart and "old-shop" in apart and "superseded by its managed replacement" in apart
        assert f"{_fp(old.leaf)[:16]}" in report and "wrong-certificate" in report
        assert "sli" in artifacts  # the service level indicators after each run
        # A managed certificate's history shows what monitoring found: its alert's opening is an audit event.
        assert "alert.opened" in artifacts["certificate-old-shop"] and "renewal-failed" in artifacts["certificate-old-shop"]

        second, _ = _run(trust)
        assert second.alerts == AlertSummary(0, 0, 0, 0, 0, 0)
        assert _open(_alerts()) == expected and len(hook.requests) == len(told) + len(digests)  # digests: once a day

        fresh, fresh_key = corp.issue_with_key("revoked.mon.test", validity_days=90)
        serving_revoked["now"] = _context(tmp_path, list(fresh.chain), fresh_key)
        serving_shop["now"] = _context(tmp_path, list(new.chain), new_key)
        third, _ = _run(trust)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(stuck.id, Completed(), force=True)
    fixed = {(f"certificate:{_fp(revoked.leaf)}", "revoked-served"), (f"place:{shop_place}", "wrong-certificate"),
             ("place:target:shop/web", "wrong-certificate")}
    assert third.alerts.resolved == 3 and third.alerts.opened == 0
    assert _open(_alerts()) == {k: v for k, v in expected.items() if k not in fixed}
    resolved = [m.json()["subject"] for m in hook.wait_for(len(told) + len(digests) + 3)[len(told) + len(digests):]]
    assert all("resolved" in s for s in resolved) and len(resolved) == 3
    # No private key in what monitoring published or sent: the artifacts, every message (the managed
    # certificates' keys are in the keystore; the served ones were handed to the endpoints).
    published = "\n".join(artifacts.values()).encode() + b"".join(m.body for m in hook.requests)
    assert leaks(published, [revoked_key, old_key, new_key, weak_key]) == []


def test_a_store_target_is_read_back_through_its_deployer(farm: TlsFarm, corp: ServedCA, tmp_path: Path) -> None:
    """An ACM target (a real moto server) holds the previous certificate: wrong, until it is re-imported; a
    target whose block is missing is reported as not checkable."""
    old, old_key = corp.issue_with_key("store.mon.test", validity_days=90)
    new, new_key = corp.issue_with_key("store.mon.test", validity_days=90)
    _managed_with("store", [(old.leaf, old_key, corp.issuing), (new.leaf, new_key, corp.issuing)], "store-team")

    def pem(*certificates: x509.Certificate) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    with MotoServer.start(tmp_path / "moto") as moto:
        acm = moto.client("acm", "eu-west-1")
        arn = acm.import_certificate(Certificate=pem(old.leaf), PrivateKey=key_pem(old_key),
                                     CertificateChain=pem(corp.issuing))["CertificateArn"]
        AwsAccountBlock(account_alias="mon", regions=["eu-west-1"], access_key_id="testing",
                        secret_access_key="testing", endpoint_url=moto.url).save("mon", overwrite=True)
        with write_session(get_engine()) as session:
            targets.add(session, "store", "acm", "aws-acm", "aws-account/mon", {"certificate_arn": arn}, ACTOR)
            targets.add(session, "store", "vault", "azure-kv", "azure-key-vault/missing",
                        {"certificate_name": "store"}, ACTOR)

        first, _ = _run(corp.root.public_bytes(serialization.Encoding.PEM).decode())
        assert _open(_alerts()) == {("place:target:store/acm", "wrong-certificate"): "critical",
                                    ("place:target:store/vault", "unreachable"): "critical"}
        with read_session(get_engine()) as session:
            checks = {c.place: c for c in session.execute(sa.select(EndpointCheck)).scalars()}
        assert checks["target:store/acm"].served_fingerprint == _fp(old.leaf)
        assert "cannot build its deployer" in (checks["target:store/vault"].error or "")
        assert "azure-key-vault/missing" in (checks["target:store/vault"].error or "")

        acm.import_certificate(CertificateArn=arn, Certificate=pem(new.leaf), PrivateKey=key_pem(new_key),
                               CertificateChain=pem(corp.issuing))
        second, _ = _run(corp.root.public_bytes(serialization.Encoding.PEM).decode())
    assert second.alerts.resolved == 1 and first.places == second.places == 2
    assert _open(_alerts()) == {("place:target:store/vault", "unreachable"): "critical"}
