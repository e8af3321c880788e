"""certpilot's private CA: own your internal trust, with revocation that really works.

A CA is a root (EC P-384, about ten years) and an issuing intermediate (EC P-256, about five years,
path length 0). Both certificates live in the inventory, both keys in the keystore, and a
CertificateAuthority row ties them together. The root key signs only the intermediate, so it can be
exported and removed (crypto-shredded) to keep it offline; issuance, CRLs and OCSP need only the
issuing key.

Issuance takes a CSR (its signature verified) and a profile, one of ``CA_PROFILES``: a record of its
name, extended key usage, default and maximum validity (``certpilot ca profiles``). ``tls-server``
(serverAuth), ``tls-client`` (clientAuth) and ``mtls`` (both: a service that serves and calls others
with one identity). tls-client and mtls certificates may carry URI names (a SPIFFE ID, checked against
the SPIFFE ID standard by certpilot.names.normalise_uri, and then the only URI: an X.509-SVID has exactly
one). A CA created with name constraints (certpilot.name_constraints: permitted and excluded DNS
subtrees, URI hosts, IP ranges) carries them, critical, on its issuing certificate, and refuses to sign
a name outside them before anything is signed. A private certificate is not a publicly trusted one: the
CA/B Forum maximum (``max_validity_days``, SC-081) does not bind it, the profile's own maximum does.
A request over that maximum is refused (CertificateRequestError naming the profile and its maximum);
a validity that would outlive the issuing CA certificate is cut at its end, and the cut is said (a
``Validity.note`` that ``sign``/``issue`` return with the certificate, printed by the CLI and
recorded with the issuance), never silent. Validity is counted inclusively, as the Baseline
Requirements count it. A tls-server certificate whose validity is within the CA/B Forum maximum on
its issue date (the default always is until 2029-03-15) carries the CA/B Forum DV policy and passes
the Baseline Requirements lint; a longer one does not claim that policy.

Revocation marks the inventory row and issues a new full CRL at once. CRLs are signed by the issuing
key, numbered from 1, valid for ``CRL_VALIDITY`` and reissued when less than ``CRL_REFRESH_MARGIN``
is left (``refresh_crls``, which the HTTP server and a scheduled flow call). OCSP responses (RFC
6960) are signed per request by the issuing key, from the inventory's status of the serial.

The issuing key is decrypted inside a ``CASigner`` and never leaves it: the signer signs many CSRs,
CRLs and OCSP responses with one decryption, and is neither printable nor picklable with its key.
No function here touches the network.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from sqlmodel import Session, col, select

from certpilot import audit, inventory, keystore, name_constraints, token_keys
from certpilot.clock import utcnow
from certpilot.errors import InvalidDnsNameError, InvalidUriError, NotFoundError, PermanentError
from certpilot.issuance import IssuedCertificate
from certpilot.keys import ML_DSA_ALGORITHMS, can_sign_certificates, generate_private_key, key_matches_certificate
from certpilot.keys import ml_dsa_algorithm
from certpilot.keys import signature_hash
from certpilot.models import AuditEvent, Certificate, CertificateAuthority, TokenKey
from certpilot.names import is_spiffe_id, normalise_dns_name, normalise_uri
from certpilot.x509info import describe_certificate, fingerprint_sha256, is_issued_by, serial_hex, spki_sha256

ROOT_VALIDITY = dt.timedelta(days=3652)  # about ten years
ISSUING_VALIDITY = dt.timedelta(days=1826)  # about five years
CRL_VALIDITY = dt.timedelta(days=7)  # thisUpdate to nextUpdate (the Baseline Requirements allow 10 days)
CRL_REFRESH_MARGIN = dt.timedelta(days=3, hours=12)  # reissue the CRL when less than this is left
OCSP_VALIDITY = dt.timedelta(hours=12)  # thisUpdate to nextUpdate of an OCSP response (BR: 8 hours to 10 days)
CABF_DV_POLICY = x509.ObjectIdentifier("2.23.140.1.2.1")
SOURCE = "private-ca"  # the inventory source of certificates this CA issues

# SC-081: the maximum validity of a TLS subscriber certificate, by issue date (latest first).
_CABF_MAXIMUM = ((dt.date(2029, 3, 15), 47), (dt.date(2027, 3, 15), 100), (dt.date(2026, 3, 15), 200))
_CABF_MAXIMUM_BEFORE = 398
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A CA's keys: "ec" (root EC P-384, issuing EC P-256), or ML-DSA (FIPS 204) for both, for internal use.
CA_ALGORITHMS = ("ec", *ML_DSA_ALGORITHMS)

# Revocation reasons a subscriber certificate may carry (Baseline Requirements 7.2.2), by CLI name.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}


class CertificateRequestError(PermanentError):
    """A CSR the CA will not sign; the message says why."""


@dataclass(frozen=True)
class CAProfile:
    """What the private CA issues under one profile name: its extended key usage, and the validity it
    gives when none is asked for (``default_days``) and at most (``max_days``), in days counted
    inclusively; ``why`` justifies the maximum."""

    name: str
    purpose: str
    extended_key_usage: tuple[x509.ObjectIdentifier, ...]
    default_days: int
    max_days: int
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "purpose": self.purpose,
                "extended_key_usage": [_EKU_NAMES.get(o, o.dotted_string) for o in self.extended_key_usage],
                "default_days": self.default_days, "max_days": self.max_days, "why": self.why}


_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}

# The private CA's profiles. The names are certpilot.issuance.PROFILES (what a managed certificate asks for).
CA_PROFILES: dict[str, CAProfile] = {p.name: p for p in (
    CAProfile("tls-server", "TLS servers (serverAuth)", (ExtendedKeyUsageOID.SERVER_AUTH,), 90, 825,
              "825 days is the longest TLS server certificate Apple platforms accept from any CA, private roots "
              "included (iOS 13, macOS 10.15); the default of 90 days keeps renewal automatic and exercised"),
    CAProfile("tls-client", "TLS clients: services, devices, people (clientAuth)", (ExtendedKeyUsageOID.CLIENT_AUTH,),
              365, 1095,
              "no client limits client certificates; three years bounds a key enrolled on a device by hand, "
              "renewed with the device, and revocation covers a compromise before then; the default is a year"),
    CAProfile("mtls", "service-to-service identities: mutual TLS, serving and calling (serverAuth, clientAuth)",
              (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), 90, 825,
              "an mtls certificate is also a TLS server certificate, so the server limit binds it: 825 days is the "
              "longest Apple platforms accept from any CA (as tls-server); machine identities are renewed by "
              "certpilot, so the default is 90 days like tls-server's"),
)}


@dataclass(frozen=True)
class Validity:
    """When a certificate is valid (``not_before`` to ``not_after``, both included): ``days`` asked
    for (the profile's default when none), and a ``note`` when the end was cut at the issuing CA's."""

    profile: CAProfile
    not_before: dt.datetime
    not_after: dt.datetime
    days: int
    note: str | None = None

    @property
    def inclusive_days(self) -> float:
        return (self.not_after - self.not_before + dt.timedelta(seconds=1)) / dt.timedelta(days=1)


def get_profile(name: str) -> CAProfile:
    """The private CA's profile ``name``; CertificateRequestError naming the profiles otherwise."""
    profile = CA_PROFILES.get(name)
    if profile is None:
        raise CertificateRequestError(f"unknown profile {name!r}; choose one of {', '.join(CA_PROFILES)}")
    return profile


def plan_validity(ca_name: str, issuing: x509.Certificate, profile_name: str, validity_days: int | None,
                  now: dt.datetime) -> Validity:
    """The validity of a certificate CA ``ca_name`` (issuing certificate ``issuing``) signs under
    ``profile_name`` at ``now``: ``validity_days`` or the profile's default, counted inclusively (N days
    from 00:00:00 end at 23:59:59). Refused (CertificateRequestError) over the profile's maximum or under
    one day; PermanentError when the issuing certificate is not valid at ``now``; cut at the issuing
    certificate's end, with a note that says so."""
    profile = get_profile(profile_name)
    now = _second(now)
    days = profile.default_days if validity_days is None else validity_days
    if days < 1:
        raise CertificateRequestError(f"validity of {days} days: ask for at least 1")
    if days > profile.max_days:
        raise CertificateRequestError(
            f"validity of {days} days is over profile {profile.name}'s maximum of {profile.max_days} days (CA "
            f"{ca_name}): ask for at most {profile.max_days} (`certpilot ca profiles` lists each profile's limits)")
    ca_start, ca_end = issuing.not_valid_before_utc, issuing.not_valid_after_utc
    if not ca_start <= now < ca_end:
        raise PermanentError(f"CA {ca_name}: the issuing certificate is not valid at {now:%Y-%m-%d %H:%M:%S} UTC "
                             f"(valid {ca_start:%Y-%m-%d} to {ca_end:%Y-%m-%d})")
    not_after = now + dt.timedelta(days=days, seconds=-1)
    if not_after <= ca_end:
        return Validity(profile, now, not_after, days)
    given = (ca_end - now + dt.timedelta(seconds=1)) / dt.timedelta(days=1)
    note = (f"capped at the issuing CA's expiry {ca_end:%Y-%m-%d %H:%M:%S} UTC: {given:.1f} of the {days} days asked "
            f"for (CA {ca_name}'s issuing certificate ends then; a certificate cannot outlive its issuer)")
    return Validity(profile, now, ca_end, days, note)


def max_validity_days(day: dt.date | dt.datetime) -> int:
    """The longest TLS subscriber certificate the CA/B Forum allows when issued on ``day``
    (SC-081: 398 days, 200 from 2026-03-15, 100 from 2027-03-15, 47 from 2029-03-15; UTC dates)."""
    if isinstance(day, dt.datetime):
        if day.tzinfo is None:
            raise ValueError("use an aware UTC datetime")
        day = day.astimezone(dt.timezone.utc).date()
    for since, days in _CABF_MAXIMUM:
        if day >= since:
            return days
    return _CABF_MAXIMUM_BEFORE


def parse_reason(text: str) -> x509.ReasonFlags:
    """A revocation reason by CLI name (key-compromise) or RFC 5280 name (keyCompromise)."""
    for name, flag in REASONS.items():
        if text in (name, flag.value):
            return flag
    raise PermanentError(f"unknown revocation reason {text!r}; choose one of {', '.join(REASONS)}")


def reason_name(flag: x509.ReasonFlags | str | None) -> str | None:
    """The CLI name of a reason (the inventory stores the RFC 5280 name)."""
    if flag is None:
        return None
    value = flag.value if isinstance(flag, x509.ReasonFlags) else flag
    return next((name for name, f in REASONS.items() if f.value == value), value)


@dataclass(frozen=True)
class CAUrls:
    """Where ``certpilot ca serve`` answers for one CA; these URLs go into the certificates."""

    issuing_certificate: str
    root_certificate: str
    crl: str
    ocsp: str

    @classmethod
    def of(cls, base_url: str, name: str) -> CAUrls:
        base = f"{base_url.rstrip('/')}/{name}"
        return cls(f"{base}/issuing.crt", f"{base}/root.crt", f"{base}/issuing.crl", f"{base}/ocsp")


def _second(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("use an aware UTC datetime")
    return value.astimezone(dt.timezone.utc).replace(microsecond=0)


def _check_base_url(base_url: str) -> str:
    base = base_url.strip().rstrip("/")
    if not re.match(r"^http://[^/\s?#]+(/[^\s?#]*)?$", base):
        raise PermanentError(f"base URL {base_url!r} must be a plain http:// URL (clients fetch CRLs, OCSP and CA "
                             "certificates over HTTP: the responses are signed, and https would be circular)")
    return base


# ------------------------------------------------------------------------------------------ creation

def init_ca(session: Session, ring: keystore.KeyRing, actor: audit.Actor, name: str, base_url: str, *,
            now: dt.datetime | None = None,
            constraints: name_constraints.NameConstraintSpec | None = None, algorithm: str = "ec",
            token: token_keys.TokenSpec | None = None,
            tokens: token_keys.TokenOpener | None = None) -> CertificateAuthority:
    """Create a CA: a root and an issuing intermediate, their keys sealed in the keystore, both
    certificates in the inventory, and its first (empty) CRL. In the caller's write transaction.
    ``constraints`` (certpilot.name_constraints.parse): the names the CA may issue for, carried as a
    critical NameConstraints extension on the issuing certificate. ``algorithm``: one of CA_ALGORITHMS
    (``ml-dsa-65``: root and issuing CA on ML-DSA-65). ``token``: make the issuing key (EC P-256) on this
    PKCS#11 token, opened with ``tokens``, instead of in the keystore; it never leaves the token, and a
    failure after it was made removes it again."""
    if algorithm not in CA_ALGORITHMS:
        raise PermanentError(f"CA algorithm {algorithm!r}: choose one of {', '.join(CA_ALGORITHMS)}")
    if token is not None and algorithm != "ec":
        raise PermanentError(f"an issuing key on a PKCS#11 token is EC P-256: {algorithm} keys are made in the "
                             "keystore (PKCS#11 tokens such as SoftHSM2 do not make ML-DSA keys)")
    if not _NAME.match(name):
        raise PermanentError(f"CA name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit (it becomes part of URLs)")
    base = _check_base_url(base_url)
    if session.exec(select(CertificateAuthority.id).where(CertificateAuthority.name == name)).first() is not None:
        raise PermanentError(f"a CA named {name!r} already exists")
    now = _second(now or utcnow())
    urls = CAUrls.of(base, name)
    root_key: ec.EllipticCurvePrivateKey | Any = (ec.generate_private_key(ec.SECP384R1()) if algorithm == "ec"
                                                  else generate_private_key(algorithm))
    if token is None:
        issuing_key: Any = (ec.generate_private_key(ec.SECP256R1()) if algorithm == "ec"
                            else generate_private_key(algorithm))
        return _init_ca(session, ring, actor, name, base, urls, now, constraints, root_key, issuing_key, None)
    if tokens is None:
        raise token_keys.TokenError(token.token_label, "no PKCS#11 connector was given to make the issuing key")
    opened = tokens(token)
    made = opened.generate_ec_key(f"certpilot {name} issuing CA 1", "secp256r1")
    try:
        issuing_key = token_keys.TokenECKey(opened, made.key_id, made.public_key)
        return _init_ca(session, ring, actor, name, base, urls, now, constraints, root_key, issuing_key,
                        (token, made))
    except BaseException:
        opened.destroy_key(made.key_id)  # nothing half-made: no CA row, and no orphan key on the token
        raise


def _init_ca(session: Session, ring: keystore.KeyRing, actor: audit.Actor, name: str, base: str, urls: CAUrls,
             now: dt.datetime, constraints: name_constraints.NameConstraintSpec | None, root_key: Any,
             issuing_key: Any, on_token: tuple[token_keys.TokenSpec, token_keys.TokenKeyInfo] | None,
             ) -> CertificateAuthority:
    root_hash, issuing_hash = signature_hash(root_key), signature_hash(issuing_key)
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                           x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Root CA")])
    issuing_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                              x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Issuing CA 1")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(_serial())
            .not_valid_before(now).not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(digital_signature=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, root_hash))
    issuing_builder = (x509.CertificateBuilder().subject_name(issuing_name).issuer_name(root_name)
               .public_key(issuing_key.public_key()).serial_number(_serial())
               .not_valid_before(now).not_valid_after(now + ISSUING_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_ca_key_usage(digital_signature=True), critical=True)  # it signs OCSP responses
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]),
                              critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuing_key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
               .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                   AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(urls.root_certificate))]),
                   critical=False))
    limits = constraints.extension() if constraints is not None else None
    if limits is not None:  # critical, as RFC 5280 4.2.1.10 requires
        issuing_builder = issuing_builder.add_extension(limits, critical=True)
    issuing = issuing_builder.sign(root_key, root_hash)
    root_ref = keystore.store_private_key(session, root_key, ring, actor, "generated", now)
    issuing_ref = (keystore.store_private_key(session, issuing_key, ring, actor, "generated", now)
                   if on_token is None else None)
    token_row = _token_key_row(session, on_token, issuing, now) if on_token is not None else None
    inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, SOURCE) for c in (root, issuing)],
                     actor, now=now)
    row = CertificateAuthority(name=name, root_fingerprint=fingerprint_sha256(root),
                               issuing_fingerprint=fingerprint_sha256(issuing), root_key_id=root_ref.id,
                               issuing_key_id=issuing_ref.id if issuing_ref else None,
                               issuing_token_key_id=token_row.id if token_row else None,
                               base_url=base, crl_number=0, created_at=now)
    session.add(row)
    session.flush()
    issuing_key_text = (str(issuing_ref) if issuing_ref else
                        f"pkcs11:{token_row.token_label}/{token_row.key_id}" if token_row else "")
    audit.append(session, actor, [audit.Change("ca.created", f"ca:{name}", {
        "root": row.root_fingerprint, "issuing": row.issuing_fingerprint, "root_key": str(root_ref),
        "issuing_key": issuing_key_text, "base_url": base, "algorithm": _algorithm_name(issuing),
        **({"name_constraints": name_constraints.describe(limits)} if limits is not None else {})})], now)
    signer = CASigner(name, urls, issuing, root, issuing_key)
    _publish_crl(session, actor, row, signer, now)
    return row


def _token_key_row(session: Session, on_token: tuple[token_keys.TokenSpec, token_keys.TokenKeyInfo],
                   issuing: x509.Certificate, now: dt.datetime) -> TokenKey:
    spec, made = on_token
    row = TokenKey(id=uuid.uuid4().hex, module=spec.module, token_label=spec.token_label, key_label=made.label,
                   key_id=made.key_id, algorithm="ec-p256", spki_sha256=spki_sha256(issuing.public_key()),
                   made_on_token=made.made_on_token, extractable=made.extractable, pin_env=spec.pin.env,
                   pin_file=str(spec.pin.file) if spec.pin.file is not None else None, created_at=now)
    session.add(row)
    session.flush()
    return row


def _algorithm_name(cert: x509.Certificate) -> str:
    """``ec-p256``, ``ml-dsa-65``...: the key algorithm of a CA certificate, as certpilot.keys names it."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return ml_dsa_algorithm(key) or type(key).__name__


def _ca_key_usage(*, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _serial() -> int:
    """A positive serial of 128 random bits (the Baseline Requirements ask for at least 64)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def get_ca(session: Session, name: str) -> CertificateAuthority:
    row = session.exec(select(CertificateAuthority).where(CertificateAuthority.name == name)).first()
    if row is None:
        known = session.exec(select(CertificateAuthority.name).order_by(CertificateAuthority.name)).all()
        raise NotFoundError(f"no CA named {name!r}" + (f" (there are: {', '.join(known)})" if known else
                                                         " (create one with `certpilot ca init`)"))
    return row


def ca_certificates(session: Session, ca: CertificateAuthority) -> tuple[x509.Certificate, x509.Certificate]:
    """The CA's (root, issuing) certificates."""
    certs = []
    for fp in (ca.root_fingerprint, ca.issuing_fingerprint):
        row = session.get(Certificate, fp)
        if row is None:
            raise NotFoundError(f"CA {ca.name}: certificate {fp[:16]} is missing from the inventory")
        certs.append(x509.load_der_x509_certificate(row.der))
    return certs[0], certs[1]


def list_cas(session: Session) -> list[dict[str, Any]]:
    """Every CA, as plain dicts (the --json shape); never key material."""
    out = []
    for ca in session.exec(select(CertificateAuthority).order_by(CertificateAuthority.name)).all():
        root, issuing = ca_certificates(session, ca)
        counts: dict[str, int] = {status: count for status, count in session.execute(
            sa.select(col(Certificate.status), sa.func.count())
            .where(col(Certificate.issuer_fingerprint) == ca.issuing_fingerprint,
                   col(Certificate.fingerprint_sha256) != ca.issuing_fingerprint)
            .group_by(col(Certificate.status))).all()}
        urls = CAUrls.of(ca.base_url, ca.name)
        out.append({
            "name": ca.name, "base_url": ca.base_url, "root_fingerprint": ca.root_fingerprint,
            "root_subject": root.subject.rfc4514_string(), "root_not_after": inventory.iso(root.not_valid_after_utc),
            "root_key": "online" if ca.root_key_id else "offline",
            "algorithm": _algorithm_name(issuing), "issuing_key_custody": _custody(session, ca),
            "issuing_fingerprint": ca.issuing_fingerprint, "issuing_subject": issuing.subject.rfc4514_string(),
            "issuing_not_after": inventory.iso(issuing.not_valid_after_utc),
            "issued": sum(counts.values()), "revoked": counts.get("revoked", 0),
            "crl_number": ca.crl_number, "crl_next_update": inventory.iso(ca.crl_next_update),
            "urls": {"issuing_certificate": urls.issuing_certificate, "root_certificate": urls.root_certificate,
                     "crl": urls.crl, "ocsp": urls.ocsp},
            "name_constraints": name_constraints.describe(name_constraints.of_certificate(issuing)),
            "created_at": inventory.iso(ca.created_at),
        })
    return out


def _custody(session: Session, ca: CertificateAuthority) -> str:
    """Where CA ``ca``'s issuing key is: ``keystore``, or ``pkcs11:<token label>``."""
    if ca.issuing_token_key_id is None:
        return "keystore"
    row = session.get(TokenKey, ca.issuing_token_key_id)
    return f"pkcs11:{row.token_label}" if row is not None else "pkcs11"


# ------------------------------------------------------------------------------------------ signing

@dataclass(frozen=True)
class CertificateStatus:
    """What the inventory says about one serial, for CRLs and OCSP."""

    revoked: bool
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


class CASigner:
    """The issuing CA with its key decrypted once: signs certificates, CRLs and OCSP responses.

    The key stays inside: no method returns it, and the signer is neither shown (repr) nor pickled
    with it. Open one with ``open_signer`` and let it go when the work is done.
    """

    __slots__ = ("name", "urls", "certificate", "root", "_key", "_hash", "_aki", "_aia", "_crl_dp", "_ocsp_ids",
                 "_constraints")

    def __init__(self, name: str, urls: CAUrls, certificate: x509.Certificate, root: x509.Certificate,
                 key: PrivateKeyTypes) -> None:
        if not can_sign_certificates(key) or not (isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
                                                  or ml_dsa_algorithm(key.public_key())):
            raise TypeError("the issuing key must be an EC, RSA or ML-DSA key")
        if not key_matches_certificate(key, certificate):
            raise PermanentError(f"CA {name}: the stored issuing key does not match the issuing certificate")
        self.name = name
        self.urls = urls
        self.certificate = certificate
        self.root = root
        self._key: CertificateIssuerPrivateKeyTypes = key
        self._hash = signature_hash(key)  # None for ML-DSA, which hashes internally
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.Extension(x509.AuthorityKeyIdentifier.oid, False,
                                   x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
        self._aia = x509.Extension(x509.AuthorityInformationAccess.oid, False, x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp)),
            x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                   x509.UniformResourceIdentifier(urls.issuing_certificate))]))
        self._crl_dp = x509.Extension(x509.CRLDistributionPoints.oid, False, x509.CRLDistributionPoints([
            x509.DistributionPoint([x509.UniformResourceIdentifier(urls.crl)], None, None, None)]))
        self._ocsp_ids: dict[str, tuple[bytes, bytes]] = {}
        self._constraints = name_constraints.of_certificate(certificate)

    def __repr__(self) -> str:
        return f"CASigner(name={self.name!r}, issuing={fingerprint_sha256(self.certificate)[:16]})"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a CASigner holds a decrypted private key: it cannot be pickled or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a CASigner holds a decrypted private key: it cannot be pickled or copied")

    # -------------------------------------------------------------------------------- certificates

    def sign(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
             now: dt.datetime | None = None) -> x509.Certificate:
        """A certificate for ``csr`` under ``profile`` (one of CA_PROFILES), its signature and names
        checked first (see ``sign_planned`` for the validity, whose note this drops: callers that
        show or record what they issue use ``sign_planned``)."""
        return self.sign_planned(csr, profile, validity_days=validity_days, now=now)[0]

    def sign_planned(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
                     now: dt.datetime | None = None) -> tuple[x509.Certificate, Validity]:
        """A certificate for ``csr`` under ``profile`` and its validity (``plan_validity``): the
        profile's default or ``validity_days``, refused over the profile's maximum before anything is
        signed, cut at the issuing certificate's end with a note."""
        validity = plan_validity(self.name, self.certificate, profile, validity_days, now or utcnow())
        public_key = _check_csr(csr, profile)
        sans = _check_sans(csr, profile)
        outside = name_constraints.outside(self._constraints, sans)
        if outside:
            raise CertificateRequestError(f"CA {self.name} may not issue for these names (the name constraints on "
                                          f"its issuing certificate): {'; '.join(outside)}")
        common_name = _common_name(csr, sans, dns_only=self._constraints is not None)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
        extensions = [
            x509.Extension(x509.SubjectAlternativeName.oid, not common_name, x509.SubjectAlternativeName(sans)),
            x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=False, path_length=None)),
            x509.Extension(x509.KeyUsage.oid, True, _LEAF_KEY_USAGE),
            x509.Extension(x509.ExtendedKeyUsage.oid, False,
                           x509.ExtendedKeyUsage(list(validity.profile.extended_key_usage))),
            self._aki,
            x509.Extension(x509.SubjectKeyIdentifier.oid, False, x509.SubjectKeyIdentifier.from_public_key(public_key)),
            self._aia,
            self._crl_dp,
        ]
        if profile == "tls-server" and validity.inclusive_days <= max_validity_days(validity.not_before):
            extensions.append(_DV_POLICIES)  # it meets the Baseline Requirements' validity: it may say so
        builder = x509.CertificateBuilder(self.certificate.subject, subject, public_key, _serial(),
                                          validity.not_before, validity.not_after, extensions)
        return builder.sign(self._key, self._hash), validity

    # -------------------------------------------------------------------------------- CRLs

    def sign_crl(self, number: int, revoked: Sequence[tuple[int, dt.datetime, x509.ReasonFlags | None]], *,
                 now: dt.datetime | None = None) -> x509.CertificateRevocationList:
        """A full CRL: ``revoked`` as (serial, revocation time, reason), valid ``CRL_VALIDITY``."""
        now = _second(now or utcnow())
        entries = []
        for serial, revoked_at, reason in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_second(revoked_at))
            if reason is not None and reason != x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            entries.append(entry.build())
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self.certificate.subject, last_update=now, next_update=now + CRL_VALIDITY,
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)), self._aki],
            revoked_certificates=entries)
        return builder.sign(self._key, self._hash)

    # -------------------------------------------------------------------------------- OCSP

    def matches(self, request: ocsp.OCSPRequest) -> bool:
        """Whether ``request`` asks about a certificate this CA issued (issuer name and key hashes)."""
        algorithm = request.hash_algorithm
        ids = self._ocsp_ids.get(algorithm.name)
        if ids is None:
            name_hash = _digest(algorithm, self.certificate.subject.public_bytes())
            key_hash = _digest(algorithm, _subject_public_key_bits(self.certificate.public_key()))
            ids = self._ocsp_ids[algorithm.name] = (name_hash, key_hash)
        return (request.issuer_name_hash, request.issuer_key_hash) == ids

    def ocsp_response(self, request: ocsp.OCSPRequest, status: CertificateStatus | None, *,
                      now: dt.datetime | None = None) -> ocsp.OCSPResponse:
        """A signed response for ``request``: good, revoked (with time and reason) or, with no status
        (a serial the CA never issued), unknown. Valid for ``OCSP_VALIDITY``; a nonce is echoed."""
        now = _second(now or utcnow())
        if status is None:
            cert_status, revoked_at, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
        elif status.revoked:
            cert_status = ocsp.OCSPCertStatus.REVOKED
            revoked_at = _second(status.revoked_at or now)
            reason = None if status.reason == x509.ReasonFlags.unspecified else status.reason
        else:
            cert_status, revoked_at, reason = ocsp.OCSPCertStatus.GOOD, None, None
        builder = (ocsp.OCSPResponseBuilder()
                   .add_response_by_hash(request.issuer_name_hash, request.issuer_key_hash, request.serial_number,
                                         request.hash_algorithm, cert_status, now, now + OCSP_VALIDITY,
                                         revoked_at, reason)
                   .responder_id(ocsp.OCSPResponderEncoding.HASH, self.certificate))
        nonce = _nonce(request)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.sign(self._key, self._hash)


_LEAF_KEY_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                encipher_only=False, decipher_only=False)
_DV_POLICIES = x509.Extension(x509.CertificatePolicies.oid, False,
                              x509.CertificatePolicies([x509.PolicyInformation(CABF_DV_POLICY, None)]))
_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _check_csr(csr: x509.CertificateSigningRequest, profile: str) -> Any:
    try:
        public_key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateRequestError(f"the CSR's key or signature cannot be read: {exc}") from None
    if not valid:
        raise CertificateRequestError("the CSR's signature does not verify: it was not signed by the key it carries "
                                      "(altered or corrupted request)")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048 or public_key.key_size % 8:
            raise CertificateRequestError(f"RSA key of {public_key.key_size} bits: use at least 2048 (a multiple of 8)")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _EC_CURVES:
            raise CertificateRequestError(f"EC curve {public_key.curve.name}: use P-256, P-384 or P-521")
    elif ml_dsa_algorithm(public_key) is not None:
        pass  # ML-DSA (FIPS 204), for internal use: relying parties must verify it (OpenSSL 3.5 or later)
    elif not (isinstance(public_key, ed25519.Ed25519PublicKey) and profile == "tls-client"):
        raise CertificateRequestError(f"{type(public_key).__name__.removeprefix('_')} keys are not accepted for "
                                      f"{profile}: use EC P-256/P-384, RSA 2048+ or ML-DSA")
    return public_key


def _check_sans(csr: x509.CertificateSigningRequest, profile: str) -> list[x509.GeneralName]:
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        ext = None
    except ValueError as exc:
        raise CertificateRequestError(f"the CSR's extensions cannot be parsed: {exc}") from None
    if ext is None or len(ext) == 0:
        raise CertificateRequestError("the CSR has no subjectAltName: put every DNS name (and IP address) the "
                                      "certificate is for in a SAN extension; the subject CN alone is not used")
    allowed: tuple[type[x509.GeneralName], ...] = (x509.DNSName, x509.IPAddress)
    if profile == "mtls":
        allowed += (x509.UniformResourceIdentifier,)
    if profile == "tls-client":
        allowed += (x509.UniformResourceIdentifier, x509.RFC822Name)
    sans: list[x509.GeneralName] = []
    for name in ext:
        if not isinstance(name, allowed):
            hint = (" (URI names such as SPIFFE IDs go in the tls-client or mtls profile)"
                    if isinstance(name, x509.UniformResourceIdentifier) else "")
            raise CertificateRequestError(f"{profile} certificates carry only "
                                          f"{', '.join(t.__name__ for t in allowed)} SANs, not {name!r}{hint}")
        if isinstance(name, x509.DNSName):
            try:
                name = x509.DNSName(normalise_dns_name(name.value, wildcard=True))
            except InvalidDnsNameError as exc:
                raise CertificateRequestError(f"SAN {name.value!r} is not a valid DNS name: {exc.reason} (letters, "
                                              "digits and hyphens, A-labels for IDNs, an optional leading "
                                              "'*.')") from None
        elif isinstance(name, x509.UniformResourceIdentifier):
            try:
                name = x509.UniformResourceIdentifier(normalise_uri(name.value))
            except InvalidUriError as exc:
                raise CertificateRequestError(f"URI SAN: {exc}") from None
        if name not in sans:
            sans.append(name)
    uris = [n.value for n in sans if isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) > 1 and any(is_spiffe_id(u) for u in uris):
        raise CertificateRequestError(f"the CSR has {len(uris)} URI SANs ({', '.join(uris)}) with a SPIFFE ID among "
                                      "them: an X.509-SVID carries exactly one URI SAN, its SPIFFE ID")
    return sans


def _common_name(csr: x509.CertificateSigningRequest, sans: list[x509.GeneralName], *,
                 dns_only: bool = False) -> str | None:
    """The CSR's CN when it is one of the SANs, else the first SAN; None when none fits in 64 characters.
    ``dns_only`` (a CA with name constraints): only a DNS SAN, since relying parties such as OpenSSL check
    a CN that looks like a host name against the DNS constraints (an IP address in a CN would fail them)."""
    if dns_only:
        values = [str(n.value) for n in sans if isinstance(n, x509.DNSName)]
    else:
        values = [str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)] or \
                 [str(n.value) for n in sans]
    requested = [str(a.value).lower() for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    for candidate in requested + values:
        if candidate in values and len(candidate) <= 64:
            return candidate
    return None


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _subject_public_key_bits(public_key: CertificatePublicKeyTypes) -> bytes:
    """The contents of the subjectPublicKey BIT STRING, which OCSP's issuerKeyHash covers."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _nonce(request: ocsp.OCSPRequest) -> bytes | None:
    try:
        nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except (x509.ExtensionNotFound, ValueError):
        return None
    return nonce if 1 <= len(nonce) <= 32 else None  # RFC 8954


def open_signer(session: Session, ring: keystore.KeyRing, name: str, *,
                tokens: token_keys.TokenOpener | None = None) -> CASigner:
    """The CA ``name`` ready to sign: its issuing key decrypted once, inside the signer; or, for a CA whose
    issuing key is on a PKCS#11 token, that token opened with ``tokens`` (token_keys.TokenError when it
    cannot be: nothing is signed, so nothing is written)."""
    ca = get_ca(session, name)
    root, issuing = ca_certificates(session, ca)
    key: PrivateKeyTypes
    if ca.issuing_token_key_id is not None:
        key = token_keys.open_token_key(session, ca.issuing_token_key_id, tokens, f"CA {ca.name}")
    elif ca.issuing_key_id is not None:
        key = keystore.load_private_key(session, keystore.KeyRef(ca.issuing_key_id), ring)
    else:
        raise PermanentError(f"CA {ca.name} records no issuing key")
    return CASigner(ca.name, CAUrls.of(ca.base_url, ca.name), issuing, root, key)


def store_issued(session: Session, actor: audit.Actor, signer: CASigner, certificates: Sequence[x509.Certificate],
                 profile: str, *, replaces: x509.Certificate | None = None, now: dt.datetime | None = None,
                 notes: Sequence[str] = ()) -> None:
    """Record certificates the signer issued in the inventory (no location: they were issued, not seen)."""
    records = [describe_certificate(c) for c in certificates]
    inventory.upsert(session, [inventory.Observation(r, None, SOURCE) for r in records], actor, now=now)
    replaced = fingerprint_sha256(replaces) if replaces is not None else None
    if replaced is not None and session.get(Certificate, replaced) is not None:
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256).in_([r.fingerprint_sha256 for r in records]))
                        .values(replaces_fingerprint=replaced), execution_options={"synchronize_session": False})
    else:
        replaced = None
    audit.append(session, actor, [audit.Change("certificate.issued", f"certificate:{r.fingerprint_sha256}", {
        "ca": signer.name, "profile": profile, "serial": r.serial_hex, "not_after": r.not_after.isoformat(),
        "replaces": replaced, **({"notes": list(notes)} if notes else {})}) for r in records], now)


def sign(session: Session, ring: keystore.KeyRing, name: str, csr: x509.CertificateSigningRequest, profile: str, *,
         validity_days: int | None = None, now: dt.datetime | None = None,
         tokens: token_keys.TokenOpener | None = None) -> IssuedCertificate:
    """Sign ``csr`` with CA ``name``; nothing is written (the Issuer role: whoever asked records the
    certificate, and OCSP and CRLs know it once it is in the inventory). Returns the leaf and the
    issuing CA certificate, with the validity's note (a cut at the CA's expiry) in ``notes``.
    A request over the profile's maximum is refused before the issuing key is decrypted."""
    get_profile(profile)
    signer = open_signer(session, ring, name, tokens=tokens)
    cert, validity = signer.sign_planned(csr, profile, validity_days=validity_days, now=now)
    return _issued(signer, cert, validity)


def _issued(signer: CASigner, cert: x509.Certificate, validity: Validity) -> IssuedCertificate:
    return IssuedCertificate((cert.public_bytes(serialization.Encoding.DER),
                              signer.certificate.public_bytes(serialization.Encoding.DER)),
                             notes=(validity.note,) if validity.note else ())


def issue(session: Session, ring: keystore.KeyRing, actor: audit.Actor, name: str,
          csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
          replaces: x509.Certificate | None = None, now: dt.datetime | None = None,
          tokens: token_keys.TokenOpener | None = None) -> IssuedCertificate:
    """Sign ``csr`` with CA ``name`` and record the certificate in the inventory, with one
    certificate.issued event (caller's write transaction): `certpilot ca issue`, a CSR from a file.
    A renewal signs only (``sign``) and records through certpilot.renewing. Returns the leaf and the
    issuing CA certificate, with the validity's note in ``notes`` (recorded in the event too)."""
    get_profile(profile)
    signer = open_signer(session, ring, name, tokens=tokens)
    cert, validity = signer.sign_planned(csr, profile, validity_days=validity_days, now=now)
    issued = _issued(signer, cert, validity)
    store_issued(session, actor, signer, [cert], profile, replaces=replaces, now=now, notes=issued.notes)
    return issued


# ------------------------------------------------------------------------------------------ revocation

def ca_of(session: Session, cert: Certificate) -> CertificateAuthority:
    """The certpilot CA that issued the inventory certificate ``cert``."""
    ca = None
    if cert.issuer_fingerprint:
        ca = session.exec(select(CertificateAuthority)
                          .where(CertificateAuthority.issuing_fingerprint == cert.issuer_fingerprint)).first()
    if ca is None:
        own = session.exec(select(CertificateAuthority.name).where(sa.or_(
            col(CertificateAuthority.root_fingerprint) == cert.fingerprint_sha256,
            col(CertificateAuthority.issuing_fingerprint) == cert.fingerprint_sha256))).first()
        if own is not None:
            raise PermanentError(f"certificate {cert.fingerprint_sha256[:16]} is a certificate of CA {own}: "
                                 "revoking a CA certificate is not supported")
        raise PermanentError(f"certificate {cert.fingerprint_sha256[:16]} ({cert.subject}) was not issued by a "
                             "certpilot private CA: revoke it with the CA that issued it")
    issuing = session.get(Certificate, ca.issuing_fingerprint)
    if issuing is None:
        raise NotFoundError(f"CA {ca.name}: certificate {ca.issuing_fingerprint[:16]} is missing from the inventory")
    if not is_issued_by(x509.load_der_x509_certificate(cert.der), x509.load_der_x509_certificate(issuing.der)):
        raise PermanentError(f"certificate {cert.fingerprint_sha256[:16]} is not signed by CA {ca.name}'s issuing key")
    return ca


def revoke(session: Session, ring: keystore.KeyRing, actor: audit.Actor, fingerprint: str,
           reason: x509.ReasonFlags, *, ca_name: str | None = None, now: dt.datetime | None = None,
           publish: bool = True, tokens: token_keys.TokenOpener | None = None) -> Certificate:
    """Revoke a certificate a certpilot CA issued (CA ``ca_name`` only, when given) and publish that
    CA's new CRL, in the caller's write transaction.

    With ``publish=False`` the CA's CRL is only marked stale: the next fetch (``current_crl``, which the
    HTTP listener serves) or refresh issues one CRL for every revocation since, so a burst of revocations
    (an emergency revoke-and-replace of a fleet) costs one CRL per fetch instead of one per revocation.
    OCSP answers from the inventory, so it says revoked as soon as the transaction commits either way.

    Revoking again changes nothing, except that a later ``keyCompromise`` replaces an earlier reason
    (the revocation time stays)."""
    if reason not in REASONS.values():
        raise PermanentError(f"revocation reason {reason.value} is not allowed for subscriber certificates; "
                             f"choose one of {', '.join(REASONS)}")
    now = now or utcnow()
    row = inventory.resolve(session, fingerprint)
    ca = ca_of(session, row)
    if ca_name is not None and ca.name != ca_name:
        raise PermanentError(f"certificate {row.fingerprint_sha256[:16]} was issued by CA {ca.name}, not {ca_name}")
    if row.status == "revoked":
        if reason != x509.ReasonFlags.key_compromise or row.revocation_reason == reason.value:
            return row
        change = audit.Change("certificate.revocation_reason_changed", f"certificate:{row.fingerprint_sha256}",
                              {"ca": ca.name, "serial": row.serial_hex, "reason": [row.revocation_reason, reason.value]})
    else:
        change = audit.Change("certificate.revoked", f"certificate:{row.fingerprint_sha256}", {
            "ca": ca.name, "serial": row.serial_hex, "reason": reason.value, "previous_status": row.status})
        row.status = "revoked"
        row.revoked_at = now
    row.revocation_reason = reason.value
    session.add(row)
    session.flush()
    audit.append(session, actor, [change], now)
    if publish:
        _publish_crl(session, actor, ca, open_signer(session, ring, ca.name, tokens=tokens), now)
    else:
        ca.crl_der = None  # stale: crl_due() now says so, and the next reader issues the new CRL
        session.add(ca)
        session.flush()
    return row


def certificate_status(session: Session, ca: CertificateAuthority, serial: int) -> CertificateStatus | None:
    """The inventory's status of ``serial`` under CA ``ca``; None for a serial it never issued."""
    row = session.execute(sa.select(col(Certificate.status), col(Certificate.revoked_at), col(Certificate.revocation_reason))
                          .where(col(Certificate.serial_hex) == serial_hex(serial),
                                 col(Certificate.issuer_fingerprint) == ca.issuing_fingerprint)).first()
    if row is None:
        return None
    if row.status != "revoked":
        return CertificateStatus(False)
    reason = next((f for f in x509.ReasonFlags if f.value == row.revocation_reason), None)
    return CertificateStatus(True, row.revoked_at, reason)


# ------------------------------------------------------------------------------------------ CRLs

def _publish_crl(session: Session, actor: audit.Actor, ca: CertificateAuthority, signer: CASigner,
                 now: dt.datetime) -> x509.CertificateRevocationList:
    now = _second(now)
    rows = session.execute(sa.select(col(Certificate.serial_hex), col(Certificate.revoked_at),
                                     col(Certificate.revocation_reason))
                           .where(col(Certificate.issuer_fingerprint) == ca.issuing_fingerprint,
                                  col(Certificate.status) == "revoked", col(Certificate.not_after) >= now)
                           .order_by(col(Certificate.revoked_at))).all()
    flags = {f.value: f for f in x509.ReasonFlags}
    entries = [(int(r.serial_hex, 16), r.revoked_at or now, flags.get(r.revocation_reason or "")) for r in rows]
    number = ca.crl_number + 1
    crl = signer.sign_crl(number, entries, now=now)
    ca.crl_number = number
    ca.crl_der = crl.public_bytes(serialization.Encoding.DER)
    ca.crl_next_update = crl.next_update_utc
    session.add(ca)
    session.flush()
    audit.append(session, actor, [audit.Change("ca.crl_issued", f"ca:{ca.name}", {
        "crl_number": number, "revoked": len(entries), "next_update": inventory.iso(crl.next_update_utc)})], now)
    return crl


def publish_crl(session: Session, ring: keystore.KeyRing, actor: audit.Actor, name: str, *,
                now: dt.datetime | None = None,
                tokens: token_keys.TokenOpener | None = None) -> x509.CertificateRevocationList:
    """Issue a new full CRL for CA ``name`` now (caller's write transaction)."""
    ca = get_ca(session, name)
    return _publish_crl(session, actor, ca, open_signer(session, ring, name, tokens=tokens), now or utcnow())


def crl_due(ca: CertificateAuthority, now: dt.datetime, margin: dt.timedelta = CRL_REFRESH_MARGIN) -> bool:
    return ca.crl_der is None or ca.crl_next_update is None or ca.crl_next_update - now < margin


def refresh_crls(engine: sa.Engine, ring: keystore.KeyRing, actor: audit.Actor, *, now: dt.datetime | None = None,
                 margin: dt.timedelta = CRL_REFRESH_MARGIN, names: Sequence[str] | None = None,
                 tokens: token_keys.TokenOpener | None = None) -> list[str]:
    """Reissue the CRL of every CA (or of ``names``) whose CRL is missing or whose nextUpdate is less
    than ``margin`` away. Each in its own write transaction, re-checked there so that concurrent
    callers issue one CRL, not two. Returns the names of the CAs that got a new CRL."""
    from certpilot.database import read_session, write_session

    now = now or utcnow()
    with read_session(engine) as session:
        query = select(CertificateAuthority)
        if names is not None:
            query = query.where(col(CertificateAuthority.name).in_(list(names)))
        due = [ca.name for ca in session.exec(query.order_by(CertificateAuthority.name)).all() if crl_due(ca, now, margin)]
    done = []
    for name in due:
        with write_session(engine) as session:
            ca = get_ca(session, name)
            if crl_due(ca, now, margin):
                _publish_crl(session, actor, ca, open_signer(session, ring, name, tokens=tokens), now)
                done.append(name)
    return done


def current_crl(engine: sa.Engine, key_ring: Callable[[], keystore.KeyRing], actor: audit.Actor, name: str, *,
                now: dt.datetime | None = None, tokens: token_keys.TokenOpener | None = None) -> bytes:
    """CA ``name``'s CRL as DER, reissued first if it is missing or due (only then is ``key_ring``
    called and the issuing key decrypted)."""
    from certpilot.database import read_session

    now = now or utcnow()
    with read_session(engine) as session:
        ca = get_ca(session, name)
        if not crl_due(ca, now) and ca.crl_der is not None:
            return ca.crl_der
    refresh_crls(engine, key_ring(), actor, now=now, names=[name], tokens=tokens)
    with read_session(engine) as session:
        der = get_ca(session, name).crl_der
    assert der is not None
    return der


# ------------------------------------------------------------------------------------------ OCSP

def respond_ocsp(session: Session, signer: CASigner, request_der: bytes, *, now: dt.datetime | None = None) -> bytes:
    """The DER OCSP response to a DER OCSP request for the signer's CA. A request that cannot be
    parsed (or asks about more than one certificate) gets malformedRequest; one about another CA's
    certificate gets unauthorized. Never raises for bad input."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        request.hash_algorithm  # noqa: B018 - an unsupported hash raises here, not later
    except (ValueError, UnsupportedAlgorithm, TypeError):
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    if not signer.matches(request):
        return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    ca = get_ca(session, signer.name)
    status = certificate_status(session, ca, request.serial_number)
    response = signer.ocsp_response(request, status, now=now)
    return response.public_bytes(serialization.Encoding.DER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


def malformed_ocsp_response() -> bytes:
    return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)


# ------------------------------------------------------------------------------------------ the root key

def export_root_key(session: Session, ring: keystore.KeyRing, actor: audit.Actor, name: str, *,
                    password: bytes | None = None) -> bytes:
    """The root certificate and key as PEM (the key PKCS#8, encrypted when ``password`` is given), for
    keeping offline. An audit event, in the caller's write transaction."""
    ca = get_ca(session, name)
    if ca.root_key_id is None:
        raise NotFoundError(f"CA {name}'s root key was removed from the inventory: only exported copies remain")
    ref = keystore.KeyRef(ca.root_key_id)
    key = keystore.load_private_key(session, ref, ring)
    root, _ = ca_certificates(session, ca)
    audit.append(session, actor, [audit.Change("ca.root_key_exported", f"ca:{name}", {
        "key": str(ref), "root": ca.root_fingerprint, "encrypted": password is not None})])
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return root.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def root_key_exported(session: Session, name: str) -> bool:
    return session.exec(select(AuditEvent.seq).where(AuditEvent.object == f"ca:{name}",
                                                     AuditEvent.action == "ca.root_key_exported")).first() is not None


def remove_root_key(engine: sa.Engine, actor: audit.Actor, name: str) -> bool:
    """Take the root key offline: crypto-shred it (keystore.shred) and forget it on the CA row.
    Issuance, CRLs and OCSP go on with the issuing key. Returns False when it was already removed."""
    from certpilot.database import read_session, write_session

    with read_session(engine) as session:
        ca = get_ca(session, name)
        if ca.root_key_id is None:
            return False
        ref = keystore.KeyRef(ca.root_key_id)
    keystore.shred(engine, ref, actor)  # first: a crash after it leaves a reference to a destroyed key, not a live key
    with write_session(engine) as session:
        ca = get_ca(session, name)
        ca.root_key_id = None
        session.add(ca)
        audit.append(session, actor, [audit.Change("ca.root_key_removed", f"ca:{name}", {
            "key": str(ref), "root": ca.root_fingerprint})])
    return True
