"""Machine identities from the private CA: URI names (SPIFFE IDs) on managed certificates, the tls-client
and mtls profiles, and name constraints on the issuing CA. Real keys and certificates throughout; the
mutual-TLS handshakes run between two loopback sockets with Python's ssl (OpenSSL), which checks the
chain, the extended key usage and the name constraints."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, ca, inventory, keystore, managed, name_constraints, renewing
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidUriError, PermanentError
from certpilot.issuance import PROFILES, build_csr
from certpilot.models import AuditEvent, Certificate
from certpilot.names import normalise_uri
from certpilot.settings import load_settings
from cli.main import app
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from connectors.private_ca import PrivateCAIssuer

UTC = dt.timezone.utc
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
SPIFFE_WEB = "spiffe://prod.example/ns/api/sa/web"
SPIFFE_CLIENT = "spiffe://prod.example/ns/billing/sa/worker"
runner = CliRunner()


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _actor() -> audit.Actor:
    return audit.Actor("test")


def _p256() -> PrivateKeyTypes:
    return ec.generate_private_key(ec.SECP256R1())


def _init(engine: sa.Engine, name: str = "lab", constraints: name_constraints.NameConstraintSpec | None = None) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), _actor(), name, "http://pki.lab.test", constraints=constraints)


def _signer(engine: sa.Engine, name: str = "lab") -> ca.CASigner:
    with read_session(engine) as session:
        return ca.open_signer(session, _ring(), name)


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# ------------------------------------------------------------------------------------------ URI names

@pytest.mark.parametrize("uri", [SPIFFE_WEB, "spiffe://prod.example", "spiffe://a_b.c-d.example/A.b-C_9",
                                 "https://svc.example/identity", "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"])
def test_usable_uri_names_are_kept_as_given(uri: str) -> None:
    assert normalise_uri(f"  {uri} ") == uri


@pytest.mark.parametrize(("uri", "reason"), [
    ("web", "not an absolute URI: it needs a scheme"),
    ("spiffe:", "nothing follows spiffe:"),
    ("SPIFFE://prod.example/a", "the scheme must be 'spiffe' in lower case, not 'SPIFFE'"),
    ("spiffe:prod.example/a", "it must start with spiffe:// and a trust domain"),
    ("spiffe:///ns/api", "the trust domain is empty"),
    ("spiffe://Prod.example/a", "trust domain 'Prod.example' has 'P': use lower-case letters"),
    ("spiffe://prod.example:8443/a", "a port (':') is not allowed"),
    ("spiffe://admin@prod.example/a", "userinfo ('user@') is not allowed"),
    ("spiffe://prod.example/a?x=1", "a query ('?') is not allowed"),
    ("spiffe://prod.example/a#top", "a fragment ('#') is not allowed"),
    ("spiffe://prod.example/ns//api", "the path has an empty segment ('//')"),
    ("spiffe://prod.example/ns/api/", "the path ends with '/'"),
    ("spiffe://prod.example/ns/../api", "the path has a '..' segment"),
    ("spiffe://prod.example/./api", "the path has a '.' segment"),
    ("spiffe://prod.example/ns/a%20b", "path segment 'a%20b' has '%'"),
    ("spiffe://prod.example/" + "a" * 2030, "2052 bytes, more than the 2048 a URI name may have"),
    ("spiffe://prod.example/ns/é", "only printable ASCII without spaces"),
])
def test_bad_uri_names_are_refused_saying_why(uri: str, reason: str) -> None:
    with pytest.raises(InvalidUriError) as caught:
        normalise_uri(uri)
    assert reason in str(caught.value)
    assert len(str(caught.value)) < 300  # a long name is not echoed whole


def test_a_csr_for_a_uri_only_identity() -> None:
    key = _p256()
    csr = build_csr(key, [], [], [SPIFFE_WEB])
    assert _sans(csr).get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_WEB]  # type: ignore[arg-type]
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [SPIFFE_WEB]
    long_id = "spiffe://prod.example/ns/payments-processing/sa/settlement-reconciliation-worker"
    csr = build_csr(key, [], [], [long_id])
    assert len(csr.subject) == 0  # no CN over 64 characters: an X.509-SVID needs none
    csr = build_csr(key, ["api.lab.test"], ["10.1.2.3"], [SPIFFE_WEB])
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["api.lab.test"]
    with pytest.raises(ValueError, match="at least one name: a DNS name, an IP address or a URI"):
        build_csr(key, [], [], [])


def _spec(**kw: Any) -> managed.ManagedSpec:
    base: dict[str, Any] = {"name": "web-identity", "dns_names": (), "issuer": "private-ca/lab", "profile": "mtls",
                            "owner": "platform", "uris": (SPIFFE_WEB,)}
    return managed.ManagedSpec(**{**base, **kw})


@SQLITE_ONLY
@pytest.mark.parametrize(("spec", "message"), [
    (_spec(uris=()), "needs at least one DNS name or IP address, or a URI"),
    (_spec(uris=("spiffe://prod.example/ns//web",)), "the path has an empty segment"),
    (_spec(profile="tls-server"), "URI names need profile tls-client or mtls"),
    (_spec(issuer="acme-issuer/letsencrypt", profile="tls-client"), "ACME has no URI identifiers"),
    (_spec(uris=(SPIFFE_WEB, "https://svc.example/id")), "an X.509-SVID carries exactly one URI name"),
])
def test_managed_uri_names_are_checked_when_defined(engine: sa.Engine, spec: managed.ManagedSpec, message: str) -> None:
    with write_session(engine) as session, pytest.raises(PermanentError, match=message):
        managed.add(session, spec, _actor())
    with read_session(engine) as session:
        assert managed.list_managed(session) == []


@SQLITE_ONLY
def test_an_acme_issuer_refuses_uri_names_before_contacting_the_ca(engine: sa.Engine) -> None:
    """The directory is a loopback listener that counts connections: none is made."""
    with socket.create_server(("127.0.0.1", 0)) as ca_listener:
        ca_listener.settimeout(0.2)
        port = ca_listener.getsockname()[1]
        issuer = AcmeIssuer(engine, "acme-issuer/lab", f"https://127.0.0.1:{port}/dir", key_ring=_ring,
                            solver=Http01Responder(port=0), timeout=2.0)
        csr = build_csr(_p256(), ["api.lab.test"], [], [SPIFFE_WEB])
        with pytest.raises(PermanentError, match=rf"the CSR names URI {SPIFFE_WEB}; ACME has no URI identifiers"):
            issuer.issue(csr, "tls-server")
        with pytest.raises(TimeoutError):
            ca_listener.accept()  # nobody came


@pytest.mark.parametrize("profile", ["tls-client", "mtls"])
def test_a_spiffe_identity_is_issued_renewed_and_recorded(engine: sa.Engine, profile: str) -> None:
    """A URI-only managed certificate through the renewal steps with the private CA: the certificate
    carries the SPIFFE ID and the profile's EKU, the inventory shows the URI, and the schedule finds it
    covered (not due again for its names)."""
    _init(engine)
    with write_session(engine) as session:
        managed.add(session, _spec(profile=profile), _actor())
    issuer = PrivateCAIssuer(engine, "lab", _ring)
    for _ in range(2):  # issued, then renewed: the same names each time
        plan = renewing.plan(engine, "web-identity")
        assert plan.uris == (SPIFFE_WEB,) and plan.dns_names == ()
        key = renewing.new_key(engine, plan, _ring, _actor())
        request = renewing.new_csr(engine, plan, key, _ring)
        issued = renewing.issue(engine, plan, request, issuer)
        renewal = renewing.store(engine, plan, issued, key, _actor())
    leaf = issued.leaf
    assert _sans(leaf).get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_WEB]  # type: ignore[arg-type]
    assert _ekus(leaf) == list(ca.CA_PROFILES[profile].extended_key_usage)
    assert _ekus(leaf) == ([ExtendedKeyUsageOID.CLIENT_AUTH] if profile == "tls-client"
                           else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    with read_session(engine) as session:
        row = managed.get(session, "web-identity")
        assert row.uris == [SPIFFE_WEB]
        assert managed.uncovered_names(leaf, row) == []
        [scheduled] = managed.schedule(session)
        assert scheduled.current is not None and scheduled.current.fingerprint_sha256 == renewal.fingerprint_sha256
        assert not scheduled.decision.due
        shown = inventory.show(session, renewal.fingerprint_sha256)
        assert f"URI:{SPIFFE_WEB}" in shown["sans"]
        added = session.exec(select(AuditEvent).where(AuditEvent.action == "managed.added")).one()
        assert json.loads(added.details)["uris"] == [SPIFFE_WEB]
    status = runner.invoke(app, ["status", "web-identity", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["uris"] == [SPIFFE_WEB]
    assert f"web-identity  {SPIFFE_WEB}  from private-ca/lab" in runner.invoke(app, ["status", "web-identity"]).stdout


@SQLITE_ONLY
def test_a_certificate_without_its_uri_is_due_for_its_names(engine: sa.Engine) -> None:
    _init(engine)
    with write_session(engine) as session:
        managed.add(session, _spec(dns_names=("api.lab.test",), uris=()), _actor())
    issuer = PrivateCAIssuer(engine, "lab", _ring)
    plan = renewing.plan(engine, "web-identity")
    key = renewing.new_key(engine, plan, _ring, _actor())
    renewing.store(engine, plan, renewing.issue(engine, plan, renewing.new_csr(engine, plan, key, _ring), issuer),
                   key, _actor())
    with write_session(engine) as session:  # the operator adds the SPIFFE ID afterwards
        row = managed.get(session, "web-identity")
        row.uris = [SPIFFE_WEB]
        session.add(row)
    with read_session(engine) as session:
        [scheduled] = managed.schedule(session)
    assert scheduled.decision.due and f"URI:{SPIFFE_WEB}" in scheduled.decision.reason


@SQLITE_ONLY
def test_the_ca_checks_uri_sans_against_the_profile_and_the_spiffe_rules(engine: sa.Engine) -> None:
    _init(engine)
    signer = _signer(engine)
    key = _p256()
    with pytest.raises(ca.CertificateRequestError, match="go in the tls-client or mtls profile"):
        signer.sign(build_csr(key, ["api.lab.test"], [], [SPIFFE_WEB]), "tls-server")
    with pytest.raises(ca.CertificateRequestError, match="not a SPIFFE ID: the path ends with '/'"):
        signer.sign(build_csr(key, [], [], ["spiffe://prod.example/web/"]), "mtls")
    with pytest.raises(ca.CertificateRequestError, match="an X.509-SVID carries exactly one URI SAN"):
        signer.sign(build_csr(key, [], [], [SPIFFE_WEB, SPIFFE_CLIENT]), "tls-client")
    cert = signer.sign(build_csr(key, ["api.lab.test"], [], [SPIFFE_WEB]), "mtls")
    assert _sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_WEB]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ profiles

def test_mtls_is_a_profile_of_the_ca_and_of_managed_certificates() -> None:
    assert "mtls" in PROFILES and tuple(ca.CA_PROFILES) == PROFILES
    mtls = ca.CA_PROFILES["mtls"]
    assert mtls.extended_key_usage == (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    assert (mtls.default_days, mtls.max_days) == (90, ca.CA_PROFILES["tls-server"].max_days)
    assert "server limit binds it" in mtls.why


@SQLITE_ONLY
def test_ca_profiles_lists_mtls(engine: sa.Engine) -> None:
    result = runner.invoke(app, ["ca", "profiles", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["mtls"]["extended_key_usage"] == ["serverAuth", "clientAuth"]
    assert (rows["mtls"]["default_days"], rows["mtls"]["max_days"]) == (90, 825)
    table = runner.invoke(app, ["ca", "profiles"]).stdout
    assert "mtls: at most 825 days" in table


def _write_identity(tmp_path: Path, name: str, cert: x509.Certificate, issuing: x509.Certificate,
                    key: PrivateKeyTypes) -> tuple[Path, Path]:
    chain = tmp_path / f"{name}.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + issuing.public_bytes(serialization.Encoding.PEM))
    key_file = tmp_path / f"{name}.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_file


def _mutual_handshake(root_file: Path, server: tuple[Path, Path], client: tuple[Path, Path],
                      server_name: str) -> tuple[dict[str, Any] | None, BaseException | None, BaseException | None]:
    """One TLS handshake on loopback, each side requiring and checking the other's certificate against the
    root. (the client certificate the server saw, the server's error, the client's error)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*server)
    server_context.load_verify_locations(cafile=str(root_file))
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cafile=str(root_file))
    client_context.load_cert_chain(*client)
    seen: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_context.wrap_socket(conn, server_side=True) as tls:
                    seen["peer"] = tls.getpeercert()
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                errors["server"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_context.wrap_socket(raw, server_hostname=server_name) as tls:
                assert tls.recv(2) == b"ok"
        except (OSError, ssl.SSLError) as exc:
            errors["client"] = exc
        thread.join(15)
    return seen.get("peer"), errors.get("server"), errors.get("client")


@SQLITE_ONLY
def test_mutual_tls_between_spiffe_identities_on_loopback(engine: sa.Engine, tmp_path: Path) -> None:
    """An mtls server identity (DNS name and SPIFFE ID) and a tls-client SPIFFE identity from one CA, whose
    issuing certificate is name-constrained: the handshake succeeds with client authentication, each side
    sees the other's SPIFFE ID; a tls-client certificate cannot serve (its EKU is clientAuth only)."""
    _init(engine, constraints=name_constraints.parse(["lab.test"], [], ["prod.example"]))
    signer = _signer(engine)
    server_key, client_key = _p256(), _p256()
    server_cert = signer.sign(build_csr(server_key, ["api.lab.test"], [], [SPIFFE_WEB]), "mtls")
    client_cert = signer.sign(build_csr(client_key, [], [], [SPIFFE_CLIENT]), "tls-client")
    assert _ekus(server_cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ekus(client_cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(signer.root.public_bytes(serialization.Encoding.PEM))
    server = _write_identity(tmp_path, "server", server_cert, signer.certificate, server_key)
    client = _write_identity(tmp_path, "client", client_cert, signer.certificate, client_key)

    peer, server_error, client_error = _mutual_handshake(root_file, server, client, "api.lab.test")
    assert (server_error, client_error) == (None, None)
    assert peer is not None and ("URI", SPIFFE_CLIENT) in peer["subjectAltName"]

    # the client's certificate as a server: refused by the client for its purpose (EKU)
    _, _, client_error = _mutual_handshake(root_file, client, server, "api.lab.test")
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(client_error)


# ------------------------------------------------------------------------------------------ name constraints

@pytest.mark.parametrize(("given", "message"), [
    ({"permit_dns": [".lab.test"]}, "--permit-dns '.lab.test': a DNS name constraint covers the name and every name"),
    ({"exclude_dns": ["bad_name.test"]}, "--exclude-dns 'bad_name.test': label 'bad_name'"),
    ({"permit_uri": ["spiffe://prod.example"]},
     "--permit-uri 'spiffe://prod.example': a URI name constraint is a host"),
    ({"permit_ip": ["10.0.0.1"]}, "--permit-ip '10.0.0.1': give a network in CIDR form"),
    ({"permit_ip": ["10.0.0.1/8"]}, "--permit-ip '10.0.0.1/8': not a network in CIDR form"),
])
def test_bad_name_constraints_are_named(given: dict[str, list[str]], message: str) -> None:
    with pytest.raises(PermanentError) as caught:
        name_constraints.parse(**given)
    assert message in str(caught.value)


@pytest.mark.parametrize(("names", "problem"), [
    ([x509.DNSName("api.lab.test"), x509.DNSName("lab.test"), x509.DNSName("*.svc.lab.test")], None),
    ([x509.DNSName("api.evil.test")], "DNS name api.evil.test is outside the permitted DNS subtrees lab.test"),
    ([x509.DNSName("notlab.test")], "DNS name notlab.test is outside"),
    ([x509.DNSName("db.secret.lab.test")], "DNS name db.secret.lab.test is in the excluded subtree secret.lab.test"),
    ([x509.DNSName("*.lab.test")], "DNS name *.lab.test is in the excluded subtree secret.lab.test"),
    ([x509.UniformResourceIdentifier(SPIFFE_WEB)], None),
    ([x509.UniformResourceIdentifier("spiffe://dev.example/ns/api")],
     "URI spiffe://dev.example/ns/api is outside the permitted URI subtrees prod.example, .mesh.example"),
    ([x509.UniformResourceIdentifier("spiffe://east.mesh.example/x")], None),
    ([x509.UniformResourceIdentifier("urn:uuid:1")], "URI urn:uuid:1 (it has no host) is outside"),
    ([x509.IPAddress(__import__("ipaddress").ip_address("10.9.8.7"))], None),
    ([x509.IPAddress(__import__("ipaddress").ip_address("192.168.1.1"))],
     "IP address 192.168.1.1 is outside the permitted IP subtrees 10.0.0.0/8"),
    ([x509.IPAddress(__import__("ipaddress").ip_address("::1"))], "IP address ::1 is outside"),
])
def test_names_inside_and_outside_the_constraints(names: list[x509.GeneralName], problem: str | None) -> None:
    spec = name_constraints.parse(["lab.test"], ["secret.lab.test"], ["prod.example", ".mesh.example"], ["10.0.0.0/8"])
    found = name_constraints.outside(spec.extension(), names)
    assert found == [] if problem is None else (len(found) == 1 and problem in found[0])


def _issued_count(engine: sa.Engine) -> tuple[int, int]:
    with read_session(engine) as session:
        certificates = len(session.exec(select(Certificate)).all())
        issued = len(session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued")).all())
    return certificates, issued


@SQLITE_ONLY
def test_a_constrained_ca_refuses_outside_and_what_it_issues_inside_verifies(engine: sa.Engine) -> None:
    _init(engine, constraints=name_constraints.parse(["lab.test"], ["secret.lab.test"], [], ["10.0.0.0/8"]))
    with read_session(engine) as session:
        root, issuing = ca.ca_certificates(session, ca.get_ca(session, "lab"))
        listed = ca.list_cas(session)[0]["name_constraints"]
    extension = issuing.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    assert listed["permitted_dns"] == ["lab.test"] and listed["excluded_dns"] == ["secret.lab.test"]
    assert listed["permitted_ip"] == ["10.0.0.0/8"]

    before = _issued_count(engine)
    for names, ips, why in ((["api.evil.test"], [], "DNS name api.evil.test is outside the permitted DNS subtrees"),
                            (["vault.secret.lab.test"], [], "is in the excluded subtree secret.lab.test"),
                            (["api.lab.test"], ["192.0.2.7"], "IP address 192.0.2.7 is outside")):
        with write_session(engine) as session, pytest.raises(ca.CertificateRequestError) as caught:
            ca.issue(session, _ring(), _actor(), "lab", build_csr(_p256(), names, ips), "tls-server")
        assert "CA lab may not issue for these names (the name constraints on its issuing certificate)" in \
            str(caught.value) and why in str(caught.value)
    assert _issued_count(engine) == before  # refused before anything was signed or recorded

    with write_session(engine) as session:
        issued = ca.issue(session, _ring(), _actor(), "lab", build_csr(_p256(), ["api.lab.test"], ["10.1.2.3"]),
                          "tls-server")
    store = verification.Store([root])
    verifier = verification.PolicyBuilder().store(store).time(dt.datetime.now(UTC)).build_server_verifier(
        x509.DNSName("api.lab.test"))
    chain = verifier.verify(issued.leaf, [issuing])
    assert [c.subject for c in chain] == [issued.leaf.subject, issuing.subject, root.subject]


def _forge(issuing: x509.Certificate, issuing_key: Any, names: list[x509.GeneralName]) -> x509.Certificate:
    """A leaf signed with the issuing key, bypassing the CA's own check: what relying parties must refuse."""
    now = dt.datetime.now(UTC)
    key = _p256()
    return (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuing.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(issuing_key, hashes.SHA256()))


@SQLITE_ONLY
def test_relying_parties_refuse_a_leaf_outside_the_constraints(engine: sa.Engine, tmp_path: Path) -> None:
    """The constraints are on the issuing certificate, so even a leaf its key signed outside them fails
    path validation: cryptography's verifier for DNS names, OpenSSL (`openssl verify`) for URI names
    (cryptography's verifier does not evaluate URI constraints: it refuses any URI SAN under one)."""
    _init(engine, constraints=name_constraints.parse(["lab.test"], [], ["prod.example"]))
    with read_session(engine) as session:
        authority = ca.get_ca(session, "lab")
        root, issuing = ca.ca_certificates(session, authority)
        issuing_key = keystore.load_private_key(session, keystore.KeyRef(authority.issuing_key_id), _ring())
    forged_dns = _forge(issuing, issuing_key, [x509.DNSName("api.evil.test")])
    verifier = verification.PolicyBuilder().store(verification.Store([root])).time(dt.datetime.now(UTC)) \
        .build_server_verifier(x509.DNSName("api.evil.test"))
    with pytest.raises(verification.VerificationError, match="no permitted name constraints matched"):
        verifier.verify(forged_dns, [issuing])

    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "issuing.pem").write_bytes(pem(issuing))
    signer = _signer(engine)
    inside = signer.sign(build_csr(_p256(), [], [], [SPIFFE_WEB]), "mtls")
    outside = _forge(issuing, issuing_key, [x509.UniformResourceIdentifier("spiffe://dev.example/ns/api")])
    results = {}
    for name, cert in (("inside", inside), ("outside", outside)):
        (tmp_path / f"{name}.pem").write_bytes(pem(cert))
        results[name] = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                                        str(tmp_path / "issuing.pem"), str(tmp_path / f"{name}.pem")],
                                       capture_output=True, text=True, timeout=30)
    assert results["inside"].returncode == 0, results["inside"].stderr
    assert results["outside"].returncode != 0 and "permitted subtree violation" in results["outside"].stderr


@SQLITE_ONLY
def test_an_ip_only_leaf_of_a_dns_constrained_ca_has_no_cn_and_verifies_with_openssl(engine: sa.Engine,
                                                                                      tmp_path: Path) -> None:
    """OpenSSL checks a CN that looks like a host name against DNS constraints: a constrained CA puts only a
    DNS name in the CN, so an IP-only leaf has none and still verifies."""
    _init(engine, constraints=name_constraints.parse(["lab.test"]))
    signer = _signer(engine)
    leaf = signer.sign(build_csr(_p256(), [], ["10.1.2.3"]), "tls-server")
    assert len(leaf.subject) == 0 and _sans(leaf).get_values_for_type(x509.IPAddress)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    for name, cert in (("root", signer.root), ("issuing", signer.certificate), ("leaf", leaf)):
        (tmp_path / f"{name}.pem").write_bytes(pem(cert))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                             str(tmp_path / "issuing.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@SQLITE_ONLY
def test_ca_init_with_name_constraints_and_managed_add_with_a_uri(engine: sa.Engine, no_prefect_api: None) -> None:
    result = runner.invoke(app, ["ca", "init", "mesh", "--base-url", "http://pki.lab.test", "--permit-dns", "lab.test",
                                 "--exclude-dns", "secret.lab.test", "--permit-uri", "prod.example",
                                 "--permit-ip", "10.0.0.0/8"])
    assert result.exit_code == 0, result.output
    assert "permitted dns        lab.test" in result.stdout and "permitted uri        prod.example" in result.stdout
    rows = json.loads(runner.invoke(app, ["ca", "list", "--json"]).stdout)
    assert rows[0]["name_constraints"] == {"permitted_dns": ["lab.test"], "permitted_uri": ["prod.example"],
                                           "permitted_ip": ["10.0.0.0/8"], "excluded_dns": ["secret.lab.test"],
                                           "excluded_uri": [], "excluded_ip": []}
    bad = runner.invoke(app, ["ca", "init", "other", "--base-url", "http://pki.lab.test", "--permit-ip", "10.0.0.1"])
    assert bad.exit_code == 2 and "give a network in CIDR form" in bad.output
    with read_session(engine) as session:
        assert [c["name"] for c in ca.list_cas(session)] == ["mesh"]

    added = runner.invoke(app, ["managed", "add", "worker", "--uri", SPIFFE_CLIENT, "--profile", "tls-client",
                                "--issuer", "private-ca/mesh", "--owner", "billing", "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["uris"] == [SPIFFE_CLIENT]
    refused = runner.invoke(app, ["managed", "add", "web", "--uri", "spiffe://prod.example/web/", "--profile", "mtls",
                                  "--issuer", "private-ca/mesh", "--owner", "web"])
    assert refused.exit_code != 0 and "the path ends with '/'" in refused.output
    assert "Traceback" not in refused.output


@SQLITE_ONLY
def test_inventory_list_and_show_name_a_machine_identity_by_its_spiffe_id(engine: sa.Engine) -> None:
    long_id = "spiffe://prod.example/ns/payments-processing/sa/settlement-reconciliation-worker"
    _init(engine)
    with write_session(engine) as session:
        issued = ca.issue(session, _ring(), _actor(), "lab", build_csr(_p256(), [], [], [long_id]), "mtls")
    assert len(issued.leaf.subject) == 0  # no CN fits: the SAN is the only name
    listed = runner.invoke(app, ["inventory", "list"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert long_id in listed.stdout  # its name in the list, where its empty subject would show nothing
    shown = runner.invoke(app, ["inventory", "show", issued.leaf.fingerprint(hashes.SHA256()).hex()],
                          env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and f"URI:{long_id}" in shown.stdout
