"""Managed certificates on SQLite and PostgreSQL: definitions, the renewal schedule, the checks on
what an issuer returns, failures that keep the certificate in service, and the renewal steps
(certpilot.renewing) run directly, without Prefect.

Issuers here are real signers: a small CA from certpilot.sample_estate (a test seam we own) and
certpilot's own private CA; what they return is parsed and checked like anything else."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import select

from certpilot import audit, ca, keystore, managed, renewing, retiring
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError, TransientError, redact
from certpilot.keys import key_matches_certificate
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey
from certpilot.renewal import RenewalWindow
from certpilot.sample_estate import Authority, make_ca
from certpilot.settings import load_settings
from tests.sample_issuer import SampleIssuer

ACTOR = audit.Actor("test")
UTC = dt.timezone.utc


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("Managed Test CA")


def add(engine: sa.Engine, name: str = "web", **kw: Any) -> ManagedCertificate:
    kw.setdefault("owner", "platform")
    spec = managed.ManagedSpec(name=name, dns_names=kw.pop("dns_names", (f"{name}.example.test",)),
                               issuer=kw.pop("issuer", "sample/ca"), **kw)
    with write_session(engine) as session:
        return managed.add(session, spec, ACTOR)


def events(engine: sa.Engine, action: str) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all())


def current(engine: sa.Engine, name: str) -> Certificate | None:
    with read_session(engine) as session:
        return managed.current_certificate(session, managed.get(session, name))


def count(engine: sa.Engine, model: Any) -> int:
    with read_session(engine) as session:
        return session.execute(sa.select(sa.func.count()).select_from(model)).scalar_one()


# ------------------------------------------------------------------------------------- definitions

def test_add_normalises_names_and_records_an_event(engine: sa.Engine) -> None:
    row = add(engine, "shop", dns_names=("Shop.Example.TEST", "bücher.example.test", "shop.example.test."),
              ip_addresses=("10.0.0.010".replace("010", "10"), "2001:DB8::1"), owner="team-shop", tags={"env": "prod"},
              renew_before_days=20, validity_days=90)
    assert row.dns_names == ["shop.example.test", "xn--bcher-kva.example.test"]
    assert row.ip_addresses == ["10.0.0.10", "2001:db8::1"]
    with read_session(engine) as session:
        got = managed.get(session, "shop")
        assert [m.name for m in managed.list_managed(session)] == ["shop"]
    assert got.owner == "team-shop" and got.tags == {"env": "prod"} and got.issuer == "sample/ca"
    [event] = events(engine, "managed.added")
    assert event.object == "managed:shop" and json.loads(event.details)["renew_before_days"] == 20


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "has space"}, "is not a usable name"),
    ({"dns_names": ("bad_name!.example.test",)}, "is not a valid DNS name"),
    ({"dns_names": (), "ip_addresses": ("300.1.1.1",)}, "is not an IP address"),
    ({"dns_names": ()}, "needs at least one DNS name or IP address"),
    ({"issuer": "internal"}, "must name an issuer block as <block-type-slug>/<block-name>"),
    ({"profile": "code-signing"}, "unknown profile 'code-signing'"),
    ({"key_algorithm": "dsa-1024"}, "unknown key algorithm 'dsa-1024'"),
    ({"validity_days": 0}, "validity must be at least 1 day"),
    ({"validity_days": 30, "renew_before_days": 30}, "must be shorter than the validity"),
    ({"owner": None}, "managed certificate 'web' needs an owner (policy rule owner-required)"),
    ({"owner": "  "}, "managed certificate 'web' needs an owner"),
])
def test_add_refuses_bad_definitions(engine: sa.Engine, change: dict[str, Any], message: str) -> None:
    fields = {"name": "web", "dns_names": ("web.example.test",), "issuer": "private-ca/x", "owner": "platform",
              **change}
    with pytest.raises(PermanentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with write_session(engine) as session:
            managed.add(session, managed.ManagedSpec(**fields), ACTOR)
    assert count(engine, ManagedCertificate) == 0


def test_add_refuses_a_duplicate_and_get_names_the_missing(engine: sa.Engine) -> None:
    add(engine, "web")
    with pytest.raises(PermanentError, match="a managed certificate named 'web' already exists"):
        add(engine, "web")
    with pytest.raises(NotFoundError, match="no managed certificate named 'nope'"), read_session(engine) as session:
        managed.get(session, "nope")


# ----------------------------------------------------------------------------------------- schedule

def test_schedule_new_renewed_policy_ari_and_changed_names(engine: sa.Engine, authority: Authority) -> None:
    add(engine, "new")
    add(engine, "plain", validity_days=90)
    add(engine, "strict", validity_days=90, renew_before_days=80)
    add(engine, "ari", validity_days=90)
    add(engine, "no-ari", validity_days=90, use_ari=False)
    issuer = SampleIssuer(authority)
    for name in ("plain", "strict", "ari", "no-ari"):
        renewing.renew_one(engine, name, issuer, ring, ACTOR)
    now = dt.datetime.now(UTC)
    window = RenewalWindow(now - dt.timedelta(hours=2), now - dt.timedelta(hours=1))
    with write_session(engine) as session:
        managed.record_renewal_info(session, {"ari": window, "no-ari": window}, now)
    with read_session(engine) as session:
        plan = {s.managed.name: s for s in managed.schedule(session, now)}
        due = {m.name: d for m, d in managed.due(session, now)}
    assert set(due) == {"new", "ari"}
    assert due["new"].reason == "no certificate issued yet"
    strict = plan["strict"]
    assert "80 days before expiry (the policy's renew-before)" in strict.decision.reason
    assert strict.decision.renew_at <= strict.current.not_after - dt.timedelta(days=80)  # type: ignore[union-attr]
    assert "the CA's renewal window" in due["ari"].reason
    assert not plan["no-ari"].decision.due  # ignores the window
    lifetime = plan["plain"].current.not_after - plan["plain"].current.not_before  # type: ignore[union-attr]
    at = plan["plain"].decision.renew_at
    assert plan["plain"].current.not_before + lifetime * 0.6 < at <= plan["plain"].current.not_before + lifetime * 2 / 3  # type: ignore[union-attr]
    assert "67% of its 90-day lifetime" in plan["plain"].decision.reason

    # A window checked too long ago is not trusted; names that changed make it due at once.
    with read_session(engine) as session:
        later = now + managed.ARI_FRESH_FOR + dt.timedelta(minutes=1)
        assert "ari" not in {m.name for m, _ in managed.due(session, later)}
        stale = {m.name for m, _ in managed.stale_renewal_info(session, later)}
    assert stale == {"plain", "strict", "ari"}  # use ARI and have a certificate; no-ari opted out
    with write_session(engine) as session:
        session.execute(sa.update(ManagedCertificate).where(ManagedCertificate.name == "plain")
                        .values(dns_names=["plain.example.test", "api.example.test"]))
    with read_session(engine) as session:
        reason = dict((m.name, d.reason) for m, d in managed.due(session, now))["plain"]
    assert reason == "its certificate does not cover DNS:api.example.test (names changed)"


# ---------------------------------------------------------------------------------- record_issued

def _csr_and_key(engine: sa.Engine, name: str) -> tuple[keystore.KeyRef, x509.CertificateSigningRequest]:
    plan = renewing.plan(engine, name)
    ref = renewing.new_key(engine, plan, ring, ACTOR)
    return ref, renewing.new_csr(engine, plan, ref, ring).csr


def test_record_issued_links_supersedes_and_audits(engine: sa.Engine, authority: Authority) -> None:
    add(engine, "web", dns_names=("web.example.test", "www.example.test"), ip_addresses=("192.0.2.7",),
        owner="team-web", tags={"env": "prod"})
    first = renewing.renew_one(engine, "web", SampleIssuer(authority), ring, ACTOR)
    issuer = SampleIssuer(authority)
    second = renewing.renew_one(engine, "web", issuer, ring, ACTOR)

    assert issuer.calls[0]["replaces"] is not None  # the issuer is told what it renews (ARI)
    assert managed_fp(issuer.calls[0]["replaces"]) == first.fingerprint_sha256
    cur = current(engine, "web")
    assert cur is not None and cur.fingerprint_sha256 == second.fingerprint_sha256
    assert cur.replaces_fingerprint == first.fingerprint_sha256 == second.replaces
    assert cur.owner == "team-web" and cur.tags == {"env": "prod"} and cur.issuer_fingerprint is not None
    with read_session(engine) as session:
        old = session.get(Certificate, first.fingerprint_sha256)
        assert old is not None and old.status == "superseded" and old.managed_certificate_id == cur.managed_certificate_id
        key = keystore.load_private_key(session, keystore.KeyRef(second.key_ref.removeprefix("key:")), ring())
        assert audit.verify(session).events >= 6
    assert key_matches_certificate(key, x509.load_der_x509_certificate(cur.der))
    issued = [json.loads(e.details) for e in events(engine, "certificate.issued")]
    assert [d["managed"] for d in issued] == ["web", "web"] and issued[1]["replaces"] == first.fingerprint_sha256
    assert [e.object for e in events(engine, "certificate.superseded")] == [f"certificate:{first.fingerprint_sha256}"]
    assert second.as_dict()["key_ref"].startswith("key:") and "PRIVATE" not in json.dumps(second.as_dict())


def managed_fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def test_record_issued_refuses_a_certificate_for_another_key(engine: sa.Engine, authority: Authority) -> None:
    add(engine, "web")
    other = ec.generate_private_key(ec.SECP256R1())
    issuer = SampleIssuer(authority, public_key=other.public_key())
    ref, csr = _csr_and_key(engine, "web")
    issued = issuer.issue(csr, "tls-server")
    before = count(engine, Certificate)
    with pytest.raises(PermanentError, match=rf"carries public key sha256 \w{{16}}\.\.\., not that of {ref}"):
        with write_session(engine) as session:
            renewing.record_issued(session, managed.get(session, "web"), issued, ref, ACTOR)
    assert count(engine, Certificate) == before and current(engine, "web") is None


def test_record_issued_refuses_a_certificate_missing_a_name(engine: sa.Engine, authority: Authority) -> None:
    add(engine, "web", dns_names=("web.example.test", "api.example.test"), ip_addresses=("192.0.2.9",))

    def drop_names(builder: x509.CertificateBuilder, csr: x509.CertificateSigningRequest) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
                .issuer_name(authority.certificate.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(dt.datetime.now(UTC))
                .not_valid_after(dt.datetime.now(UTC) + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.example.test")]), critical=False))

    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew_one(engine, "web", SampleIssuer(authority, tamper=drop_names), ring, ACTOR)
    assert caught.value.step == "store"
    assert "does not cover DNS:api.example.test, IP:192.0.2.9: refusing to store it" in str(caught.value)
    assert current(engine, "web") is None


# --------------------------------------------------------------------------------- failures, renew_one

def test_transient_failure_is_recorded_keeps_the_old_certificate_and_the_new_key_for_the_next_attempt(
        engine: sa.Engine, authority: Authority) -> None:
    add(engine, "web")
    kept = renewing.renew_one(engine, "web", SampleIssuer(authority), ring, ACTOR)
    busy = SampleIssuer(authority, error=TransientError("CA answered 503, try later"))
    with pytest.raises(renewing.TransientRenewalError) as caught:
        renewing.renew_one(engine, "web", busy, ring, ACTOR)
    error = caught.value
    assert isinstance(error, TransientError) and error.step == "issue" and error.kept == kept.fingerprint_sha256
    assert str(error) == (f"renewal of 'web' failed at step 'issue' (issuer sample/ca): CA answered 503, try later; "
                          f"certificate {kept.fingerprint_sha256[:16]} stays in service")
    cur = current(engine, "web")
    assert cur is not None and cur.fingerprint_sha256 == kept.fingerprint_sha256 and cur.status == "active"
    with read_session(engine) as session:
        row = managed.get(session, "web")
        keys = session.exec(select(PrivateKey).order_by(PrivateKey.created_at)).all()
    assert row.last_error == "issue: CA answered 503, try later" and row.last_attempt_at is not None
    assert [k.destroyed_at is not None for k in keys] == [False, False]  # the failed attempt's key is kept...
    assert (row.pending_key_id, row.pending_issuer) == (keys[1].id, "sample/ca")  # ...in the renewal journal
    assert row.pending_since is not None and row.pending_order_url is None  # the sample CA places no orders
    [failed] = events(engine, "renewal.failed")
    assert json.loads(failed.details) == {"step": "issue", "error": "CA answered 503, try later",
                                          "issuer": "sample/ca", "kept": kept.fingerprint_sha256}
    # The next success takes up that key, clears the error and the journal.
    renewed = renewing.renew_one(engine, "web", SampleIssuer(authority), ring, ACTOR)
    assert renewed.key_ref == str(keystore.KeyRef(keys[1].id))
    with read_session(engine) as session:
        row = managed.get(session, "web")
        assert row.last_error is None and row.pending_key_id is None and row.pending_since is None
        assert len(session.exec(select(PrivateKey)).all()) == 2  # no other key made


def test_permanent_failure_after_a_transient_one_shreds_the_pending_key(engine: sa.Engine,
                                                                        authority: Authority) -> None:
    add(engine, "web")
    busy = SampleIssuer(authority, error=TransientError("CA answered 503, try later"))
    with pytest.raises(renewing.TransientRenewalError):
        renewing.renew_one(engine, "web", busy, ring, ACTOR)
    with read_session(engine) as session:
        pending = managed.get(session, "web").pending_key_id
    refusing = SampleIssuer(authority, error=PermanentError("the CA refuses these names"))
    with pytest.raises(renewing.PermanentRenewalError):
        renewing.renew_one(engine, "web", refusing, ring, ACTOR)
    with read_session(engine) as session:
        row = managed.get(session, "web")
        key = session.get(PrivateKey, pending)
        assert row.pending_key_id is None and row.pending_issuer is None
        assert key is not None and key.destroyed_at is not None and key.ciphertext is None
        assert len(session.exec(select(PrivateKey)).all()) == 1  # the refused attempt took up the pending key
    assert [json.loads(e.details)["spki_sha256"] for e in events(engine, "key.destroyed")] == [key.spki_sha256]


def test_the_pending_key_is_a_key_of_the_managed_certificate_for_retirement(engine: sa.Engine,
                                                                          authority: Authority) -> None:
    add(engine, "web")
    renewed = renewing.renew_one(engine, "web", SampleIssuer(authority), ring, ACTOR)
    with pytest.raises(renewing.TransientRenewalError):
        renewing.renew_one(engine, "web", SampleIssuer(authority, error=TransientError("503")), ring, ACTOR)
    with read_session(engine) as session:
        pending = managed.get(session, "web").pending_key_id
        found = [key_id for key_id, _ in retiring.keys_of(session, "web")]
    assert pending is not None and found == [renewed.key_ref.removeprefix("key:"), pending]


def test_a_pending_key_for_another_issuer_or_algorithm_is_destroyed_and_a_new_one_made(
        engine: sa.Engine, authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    add(engine, "web")
    with pytest.raises(renewing.TransientRenewalError):
        renewing.renew_one(engine, "web", SampleIssuer(authority, error=TransientError("503")), ring, ACTOR)
    with write_session(engine) as session:
        row = managed.get(session, "web")
        pending = row.pending_key_id
        row.key_algorithm = "ec-p384"  # the managed certificate was changed meanwhile
        session.add(row)
    with caplog.at_level("WARNING", logger="certpilot.renewing"):
        renewed = renewing.renew_one(engine, "web", SampleIssuer(authority), ring, ACTOR)
    assert f"drops its journal (key key:{pending}" in caplog.text
    assert "its key is ec-p256, the managed certificate now asks for ec-p384" in caplog.text
    with read_session(engine) as session:
        old = session.get(PrivateKey, pending)
        new = session.get(PrivateKey, renewed.key_ref.removeprefix("key:"))
    assert old is not None and old.destroyed_at is not None
    assert new is not None and new.algorithm == "ec-p384" and new.destroyed_at is None


def test_unexpected_errors_are_permanent_and_sanitised(engine: sa.Engine, authority: Authority) -> None:
    add(engine, "web")
    leaky = SampleIssuer(authority, error=ValueError("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"))
    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew_one(engine, "web", leaky, ring, ACTOR)
    assert "BEGIN" not in str(caught.value) and "MIGHAgEA" not in str(caught.value)
    assert "ValueError (its message may hold key material and was withheld) (at tests/sample_issuer.py:" in caught.value.reason
    with pytest.raises(NotFoundError):
        renewing.renew_one(engine, "nope", SampleIssuer(authority), ring, ACTOR)
    assert redact(RuntimeError("x " * 5000)).endswith("...")  # the one redaction: bounded
    assert len(redact(RuntimeError("x " * 5000))) <= 600


def test_renew_one_with_the_private_ca(engine: sa.Engine) -> None:
    from connectors.private_ca import PrivateCAIssuer

    with write_session(engine) as session:
        ca.init_ca(session, ring(), ACTOR, "unit-ca", "http://127.0.0.1:8888")
    add(engine, "intranet", dns_names=("intranet.corp.test",), issuer="private-ca/unit-ca", validity_days=30,
        key_algorithm="rsa-2048")
    issuer = PrivateCAIssuer(engine, "unit-ca", ring)
    first = renewing.renew_one(engine, "intranet", issuer, ring, ACTOR)
    second = renewing.renew_one(engine, "intranet", issuer, ring, ACTOR)
    cur = current(engine, "intranet")
    assert cur is not None and cur.fingerprint_sha256 == second.fingerprint_sha256
    assert cur.replaces_fingerprint == first.fingerprint_sha256 and cur.key_type == "RSA" and cur.key_size == 2048
    assert (cur.not_after - cur.not_before) <= dt.timedelta(days=30)
    with read_session(engine) as session:
        assert [m.name for m, _ in managed.due(session)] == []
    add(engine, "edwards", issuer="private-ca/unit-ca", key_algorithm="ed25519")
    with pytest.raises(renewing.PermanentRenewalError, match="Ed25519PublicKey keys are not accepted for tls-server"):
        renewing.renew_one(engine, "edwards", issuer, ring, ACTOR)


# ------------------------------------------------------------------- the one sequence, one record

def test_the_steps_run_in_order_and_an_issuer_that_cannot_be_had_fails_before_a_key_is_made(
        engine: sa.Engine, authority: Authority) -> None:
    assert [str(s) for s in renewing.Step] == ["load", "policy", "key", "csr", "issue", "store"]
    add(engine, "web")
    seen: list[str] = []

    class Recorded(renewing.DirectSteps):
        def load(self, name: str) -> renewing.RenewalPlan:
            seen.append("load")
            return super().load(name)

        def gate(self, plan: renewing.RenewalPlan) -> None:
            seen.append("policy")
            super().gate(plan)

        def issuer(self, plan: renewing.RenewalPlan) -> Any:
            seen.append("issuer")
            return super().issuer(plan)

        def key(self, plan: renewing.RenewalPlan) -> keystore.KeyRef:
            seen.append("key")
            return super().key(plan)

        def csr(self, plan: renewing.RenewalPlan, key: keystore.KeyRef) -> renewing.SigningRequest:
            seen.append("csr")
            return super().csr(plan, key)

        def issue(self, plan: renewing.RenewalPlan, request: renewing.SigningRequest, issuer: Any) -> Any:
            seen.append("issue")
            return super().issue(plan, request, issuer)

        def store(self, plan: renewing.RenewalPlan, issued: Any, key: keystore.KeyRef) -> renewing.Renewal:
            seen.append("store")
            return super().store(plan, issued, key)

    renewal = renewing.renew(Recorded(engine, lambda block: SampleIssuer(authority), ring, ACTOR), "web")
    assert seen == ["load", "policy", "issuer", "key", "csr", "issue", "store"]
    assert isinstance(renewal, renewing.Renewal) and renewal.issuer == "sample/ca"

    def missing(block: str) -> Any:
        raise PermanentError(f"issuer block {block!r} cannot be loaded: no such block")

    keys_before = count(engine, PrivateKey)
    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew(renewing.DirectSteps(engine, missing, ring, ACTOR), "web")
    assert caught.value.step is renewing.Step.ISSUE and caught.value.kept == renewal.fingerprint_sha256
    assert "issuer block 'sample/ca' cannot be loaded" in caught.value.reason
    assert count(engine, PrivateKey) == keys_before  # no key was made for an order that could not be placed
    with read_session(engine) as session:
        assert managed.get(session, "web").last_error == "issue: issuer block 'sample/ca' cannot be loaded: no such block"


def test_one_audit_event_per_issuance_and_the_ca_still_answers_for_it(engine: sa.Engine) -> None:
    """The private CA only signs; the renewal's store step records the certificate once. OCSP and the
    CRL know it from the inventory: good, then revoked."""
    from cryptography.x509 import ocsp

    from connectors.private_ca import PrivateCAIssuer

    with write_session(engine) as session:
        ca.init_ca(session, ring(), ACTOR, "unit-ca", "http://127.0.0.1:8888")
    add(engine, "intranet", dns_names=("intranet.corp.test",), issuer="private-ca/unit-ca")
    issuer = PrivateCAIssuer(engine, "unit-ca", ring)

    # Signing alone writes nothing: no certificate row, no audit event.
    _, csr = _csr_and_key(engine, "intranet")
    certificates, events_before = count(engine, Certificate), count(engine, AuditEvent)
    signed = issuer.issue(csr, "tls-server")
    assert (count(engine, Certificate), count(engine, AuditEvent)) == (certificates, events_before)
    with read_session(engine) as session:
        assert session.get(Certificate, managed_fp(signed.leaf)) is None

    first = renewing.renew_one(engine, "intranet", issuer, ring, ACTOR)
    second = renewing.renew_one(engine, "intranet", issuer, ring, ACTOR)
    for renewal in (first, second):
        issued = [e for e in events(engine, "certificate.issued") if e.object == f"certificate:{renewal.fingerprint_sha256}"]
        assert len(issued) == 1, issued
        assert json.loads(issued[0].details)["managed"] == "intranet"

    with read_session(engine) as session:
        leaf = x509.load_der_x509_certificate(session.get(Certificate, second.fingerprint_sha256).der)  # type: ignore[union-attr]
        signer = ca.open_signer(session, ring(), "unit-ca")
        request = ocsp.OCSPRequestBuilder().add_certificate(leaf, signer.certificate, hashes.SHA1()).build()
        answer = ocsp.load_der_ocsp_response(ca.respond_ocsp(session, signer, request.public_bytes(
            serialization.Encoding.DER)))
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    with write_session(engine) as session:
        ca.revoke(session, ring(), ACTOR, second.fingerprint_sha256, x509.ReasonFlags.key_compromise)
    with read_session(engine) as session:
        signer = ca.open_signer(session, ring(), "unit-ca")
        answer = ocsp.load_der_ocsp_response(ca.respond_ocsp(session, signer, request.public_bytes(
            serialization.Encoding.DER)))
        crl = x509.load_der_x509_crl(ca.get_ca(session, "unit-ca").crl_der)  # type: ignore[arg-type]
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
