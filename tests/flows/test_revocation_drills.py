"""Revocation drills through the revoke-and-replace flow, against real servers on loopback: a fleet of nginx
and haproxy instances behind one sshd (lab.fleet), the private CA's CRL and OCSP served over HTTP, pebble
for ACME. Each drill reads the result where a client would: the certificate served on the wire, the CRL
at the old certificate's distribution point, `openssl ocsp` against the responder in its AIA, pebble's
management API.

(a) key compromise with the private CA: the compromised key's certificate is replaced on every nginx and
    haproxy serving it, then revoked (keyCompromise), and nothing else changes;
(b) the same with an ACME CA (pebble): the replacement is served and pebble records the revocation;
(c) a CA compromise (scope: the issuer) replaces and revokes everything that CA issued, nothing of another;
(d) an nginx that serves the old certificate without being a target, seen by discovery, is an exposure:
    the run fails naming it, after replacing and revoking on the targets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import col, select

from blocks.issuers import AcmeIssuerBlock, PrivateCABlock
from certpilot import audit, ca, discovery, managed, renewing, targets
from certpilot.database import read_session, write_session
from certpilot.models import Certificate, Location
from certpilot.x509info import spki_sha256
from connectors.private_ca import PrivateCAIssuer
from connectors.tls_scan import TlsScanSource
from flows.revoke_and_replace import revoke_and_replace
from lab.fleet import HAPROXY, NGINX, Fleet
from lab.nginx import NginxInstance
from tests.flows.fleet_fixtures import CA_NAME, inventory, make_fleet  # noqa: F401  (fixtures)
from tests.flows.fleet_fixtures import ring as _ring
from tests.flows.test_renew_flows import _artifacts
from tests.flows.test_renew_flows import acme_ca  # noqa: F401  (the module's pebble, a fixture)
from tests.revocation_drill import relying_party_view

ACTOR = audit.Actor("drill")


def _certificate(inventory: sa.Engine, fingerprint: str) -> tuple[x509.Certificate, Certificate]:
    with read_session(inventory) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None, fingerprint
        return x509.load_der_x509_certificate(row.der), row


def _run(**parameters: Any) -> Any:
    return revoke_and_replace(**{"dry_run": False, **parameters}, return_state=True)


@pytest.mark.timeout(180)
def test_key_compromise_drill_on_nginx_and_haproxy(make_fleet: Callable[..., Fleet], inventory: sa.Engine,
                                                  tmp_path: Path) -> None:
    """Both certificates are served on two nginx and one haproxy; the first one's key is compromised."""
    fleet = make_fleet(certificates=2, nginx=2, haproxy=1, replicas=3)
    victim, bystander = fleet.names
    assert {s.kind for s in fleet.sites_of(victim)} == {NGINX, HAPROXY}
    before = fleet.current()
    old, _ = _certificate(inventory, before[victim])
    assert fleet.issuing is not None and fleet.root is not None

    state = _run(public_key=spki_sha256(old.public_key()), reason="key-compromise")
    assert state.is_completed(), state.message

    after = fleet.current()
    new, _ = _certificate(inventory, after[victim])
    assert after[victim] != before[victim] and after[bystander] == before[bystander]
    assert spki_sha256(new.public_key()) != spki_sha256(old.public_key())  # never the compromised key
    served = fleet.served()
    assert {site.instance: served[site] for site in fleet.sites_of(victim)} == \
        {site.instance: after[victim] for site in fleet.sites_of(victim)}  # the replacement, on all three
    assert all(served[site] == before[bystander] for site in fleet.sites_of(bystander))

    _, row = _certificate(inventory, before[victim])
    assert row.status == "revoked" and row.revocation_reason == x509.ReasonFlags.key_compromise.value
    # As a relying party asks: `openssl ocsp` at the responder in its AIA, the CRL at its distribution point.
    seen = relying_party_view(old, fleet.issuing, fleet.root, tmp_path / "old")
    assert "Response verify OK" in seen.ocsp_text and "leaf.pem: revoked" in seen.ocsp_text, seen.ocsp_text
    assert "Reason: keyCompromise" in seen.ocsp_text, seen.ocsp_text
    assert seen.crl_entry is not None and seen.crl_reason == x509.ReasonFlags.key_compromise
    for good in (new, _certificate(inventory, before[bystander])[0]):
        seen = relying_party_view(good, fleet.issuing, fleet.root, tmp_path / f"{good.serial_number:x}")
        assert "leaf.pem: good" in seen.ocsp_text and seen.crl_entry is None, seen.ocsp_text


@pytest.mark.timeout(180)
def test_key_compromise_drill_through_acme(make_fleet: Callable[..., Fleet], inventory: sa.Engine,
                                           acme_ca: tuple[Any, int]) -> None:  # noqa: F811
    """The same with pebble: first certificates over http-01 through the project's solver, deployed to nginx."""
    pebble, port = acme_ca
    block = AcmeIssuerBlock(directory_url=pebble.directory_url, ca_bundle=str(pebble.ca_bundle),
                            http01_address="127.0.0.1", http01_port=port, contact=["mailto:drill@certpilot.test"])
    block.save("drill-pebble", overwrite=True)
    issuer = block.get_issuer(inventory, _ring)
    fleet = make_fleet(certificates=1, nginx=1, haproxy=0, issuer=("acme-issuer/drill-pebble", issuer),
                       trust=pebble.roots()[0], prefix="acme", domain="drill.certpilot.test")
    [name] = fleet.names
    before = fleet.current()[name]
    old, _ = _certificate(inventory, before)
    assert not fleet.not_serving_current()
    assert pebble.cert_status(old.serial_number)["Status"] == "Valid"

    state = _run(names=[name], reason="key-compromise")
    assert state.is_completed(), state.message

    after = fleet.current()[name]
    assert after != before and not fleet.not_serving_current()  # the replacement, on the wire
    status = pebble.cert_status(old.serial_number)
    assert status["Status"] == "Revoked" and status["Reason"] == 1, status  # keyCompromise
    new, _ = _certificate(inventory, after)
    assert pebble.cert_status(new.serial_number)["Status"] == "Valid"
    _, row = _certificate(inventory, before)
    assert row.status == "revoked" and row.revocation_reason == x509.ReasonFlags.key_compromise.value


@pytest.mark.timeout(180)
def test_ca_compromise_replaces_everything_the_ca_issued(make_fleet: Callable[..., Fleet], inventory: sa.Engine,
                                                         tmp_path: Path) -> None:
    fleet = make_fleet(certificates=4, nginx=1, haproxy=1)
    assert fleet.ca_url is not None and fleet.issuing is not None
    with write_session(inventory) as session:  # another CA's certificate: outside the scope
        ca.init_ca(session, _ring(), ACTOR, "other-ca", fleet.ca_url)
        managed.add(session, managed.ManagedSpec(name="elsewhere", dns_names=("elsewhere.drill.test",),
                                                 issuer="private-ca/other-ca", validity_days=30,
                                                 owner="platform"), ACTOR)
    PrivateCABlock(ca_name="other-ca").save("other-ca", overwrite=True)
    elsewhere = renewing.renew_one(inventory, "elsewhere", PrivateCAIssuer(inventory, "other-ca", _ring), _ring,
                                   ACTOR).fingerprint_sha256
    before = fleet.current()

    state = _run(issuer=CA_NAME, reason="superseded")
    assert state.is_completed(), state.message

    after = fleet.current()
    assert all(after[name] != before[name] for name in fleet.names)
    assert not fleet.not_serving_current()  # every site serves its replacement
    assert fleet.root is not None
    for name in fleet.names:
        old, row = _certificate(inventory, before[name])
        assert row.status == "revoked", name
        seen = relying_party_view(old, fleet.issuing, fleet.root, tmp_path / name)
        assert "leaf.pem: revoked" in seen.ocsp_text and seen.crl_reason == x509.ReasonFlags.superseded, name
        assert _certificate(inventory, after[name])[1].status == "active", name
    _, untouched = _certificate(inventory, elsewhere)
    assert untouched.status == "active" and untouched.revoked_at is None
    with read_session(inventory) as session:  # the CA's own certificates are not revoked
        authority = ca.get_ca(session, CA_NAME)
        for fingerprint in (authority.root_fingerprint, authority.issuing_fingerprint):
            assert session.get(Certificate, fingerprint).status != "revoked"  # type: ignore[union-attr]


@pytest.mark.timeout(180)
def test_an_unmanaged_location_still_serving_the_old_certificate_fails_the_run_naming_it(
        make_fleet: Callable[..., Fleet], inventory: sa.Engine) -> None:
    fleet = make_fleet(certificates=2, nginx=1, haproxy=0)
    victim = fleet.names[0]
    [site] = fleet.sites_of(victim)
    old_fp = fleet.current()[victim]
    # A copy of the old certificate and key on an nginx that is no target of anything...
    found = targets.bundle(inventory, victim, old_fp, _ring)
    assert found is not None
    pair = (b"".join(c.public_bytes(Encoding.PEM) for c in (found.certificate, *found.chain)), found.key_pem())
    stray = NginxInstance(fleet.sshd.home / "stray", [site.server_name], user=fleet.sshd.user,
                          pairs={site.server_name: pair}).start()
    try:
        # ... which discovery has seen, as a scan of its address records it.
        port = stray.site(site.server_name).port
        discovery.record(inventory, TlsScanSource("drill-scan", [f"127.0.0.1:{port}"], sni=[site.server_name]), ACTOR)
        with read_session(inventory) as session:
            [locator] = session.exec(select(Location.locator)
                                     .where(col(Location.certificate_fingerprint) == old_fp)).all()
        assert str(port) in locator

        state = _run(names=[victim], reason="key-compromise")

        assert state.is_failed()
        assert locator in (state.message or ""), state.message  # named, loudly
        [report] = _artifacts(state.state_details.flow_run_id, "revoke-and-replace")
        exposures = report.data.split("## Exposures", 1)[-1].split("\n## ", 1)[0]  # the report's exposure section
        assert "## Exposures" in report.data and locator in exposures and old_fp[:16] in exposures, report.data
        after = fleet.current()[victim]
        assert after != old_fp and not fleet.not_serving_current()  # the targets were replaced ...
        _, row = _certificate(inventory, old_fp)
        assert row.status == "revoked"  # ... and the old certificate revoked,
        from connectors.tls_verify import fetch_chain

        assert fetch_chain("127.0.0.1", port, sni=site.server_name, timeout=5).fingerprint == old_fp  # still served
    finally:
        stray.stop()
