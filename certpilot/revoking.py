"""Revoking one certificate with the CA that issued it, once.

``find_certificate`` turns what an operator types (a managed certificate's name, a SHA-256 fingerprint or
a unique prefix of at least 8 hex digits, or ``serial:<hex>``) into the inventory's certificate;
``issuer_of`` names the issuer block that can revoke it, when the inventory knows it. ``revoke`` asks
that issuer (certpilot.issuance.Issuer) to revoke it and records the revocation: status ``revoked``,
its RFC 5280 reason and time on the certificate's row, and exactly one ``certificate.revoked`` audit
event. The private CA records both itself, in the transaction that publishes its new CRL
(certpilot.ca.revoke): nothing is written twice.

Idempotent: a certificate the inventory already holds as revoked is not sent to the CA again, nothing
is written, and the outcome says when and why it was first revoked (``already``). A CA that answers
that it had revoked it already (ACME ``alreadyRevoked``) is a success, recorded as revoked now.

Signing: the private CA signs its CRL and OCSP itself (``signed_with`` "ca"). An ACME revocation is
signed by the account (``account``), or, for ``key-compromise`` when the keystore holds the
certificate's own key, by that key (``certificate-key``: RFC 8555 7.6, the proof a key-compromise
revocation needs). The key is decrypted only for that one request and is never returned.

A CA that fails or does not answer raises its connector's error (it names the CA and the address);
nothing is recorded then. No Prefect and no network of its own here.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from certpilot import audit, inventory, keystore, managed
from certpilot.ca import reason_name
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from certpilot.issuance import Issuer
from certpilot.managed import KeyRingSource
from certpilot.models import AuditEvent, Certificate, CertificateAuthority, ManagedCertificate
from certpilot.propagation import Propagation

__all__ = ["EVENT", "MIN_PREFIX", "RevocationOutcome", "RevocationReport", "already_revoked", "find_certificate",
           "issuer_of", "managed_name",
           "private_ca_of", "revoke"]

EVENT = "certificate.revoked"
MIN_PREFIX = 8  # hex digits of a fingerprint prefix: revoking the wrong certificate cannot be undone
SERIAL_PREFIX = "serial:"


@dataclass(frozen=True)
class RevocationOutcome:
    """One certificate revoked, or found revoked already (``already``: then nothing changed, and
    ``reason`` and ``revoked_at`` are the first revocation's)."""

    fingerprint_sha256: str
    serial_hex: str
    managed: str | None  # the managed certificate it belongs to, if any
    issuer: str  # the issuer block name (or private CA name) that revoked it
    reason: str  # CLI name: key-compromise, superseded, ... (certpilot.ca.REASONS)
    revoked_at: dt.datetime
    already: bool
    signed_with: str  # "ca" (private CA), "account" or "certificate-key" (ACME); "unknown": revoked outside certpilot

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint_sha256": self.fingerprint_sha256, "serial": self.serial_hex, "managed": self.managed,
                "issuer": self.issuer, "reason": self.reason, "revoked_at": inventory.iso(self.revoked_at),
                "already_revoked": self.already, "signed_with": self.signed_with}


_SIGNED_WITH = {"ca": "the CA's own key (CRL and OCSP)", "account": "the issuer's ACME account",
                "certificate-key": "the certificate's own key", "unknown": "unknown (revoked outside certpilot)"}


@dataclass(frozen=True)
class RevocationReport:
    """What a revocation did (``outcome``) and, when it was watched, how long relying parties took to see
    it (``propagation``; None when not watched, or nothing changed)."""

    outcome: RevocationOutcome
    propagation: Propagation | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.outcome.as_dict(),
                "propagation": self.propagation.as_dict() if self.propagation is not None else None}

    def lines(self) -> list[str]:
        """What happened, for logs and the CLI."""
        o = self.outcome
        what = f"{o.fingerprint_sha256} (serial {o.serial_hex}" + (f", managed certificate {o.managed})" if o.managed
                                                                    else ")")
        when = inventory.iso(o.revoked_at)
        if o.already:
            return [f"{what} was already revoked on {when} (reason {o.reason}) by {o.issuer}: nothing changed"]
        out = [f"revoked {what} with {o.issuer}: reason {o.reason}, at {when}; signed with "
               f"{_SIGNED_WITH.get(o.signed_with, o.signed_with)}"]
        p = self.propagation
        if p is not None and p.seconds is not None:
            parts = [f"{label} {value:.2f} s" for label, value in (("CRL", p.crl_seconds), ("OCSP", p.ocsp_seconds))
                     if value is not None]
            out.append(f"relying parties see it revoked after {p.seconds:.2f} s ({', '.join(parts)})")
        elif p is not None:
            out.append(f"not seen revoked by relying parties within the watch: {p.detail}")
        return out


# ------------------------------------------------------------------------------------------ finding

def _managed_certificate(session: Session, row: ManagedCertificate) -> Certificate:
    """Its current certificate; else (its current one was revoked) the newest it has had."""
    current = managed.current_certificate(session, row)
    if current is not None:
        return current
    newest = session.exec(select(Certificate).where(Certificate.managed_certificate_id == row.id)
                          .order_by(col(Certificate.not_before).desc(), col(Certificate.created_at).desc())
                          .limit(1)).first()
    if newest is None:
        raise NotFoundError(f"managed certificate {row.name!r} has no certificate yet: there is nothing to revoke")
    return newest


def _by_serial(session: Session, text: str) -> Certificate:
    digits = text[len(SERIAL_PREFIX):].replace(":", "").strip().lower()
    if not digits or any(ch not in "0123456789abcdef" for ch in digits):
        raise NotFoundError(f"{text!r}: a serial number is hex digits (colons allowed), e.g. serial:0a1b2c")
    digits = digits.lstrip("0") or "0"
    digits = digits if len(digits) % 2 == 0 else "0" + digits
    rows = session.exec(select(Certificate).where(Certificate.serial_hex == digits)
                        .where(col(Certificate.is_ca).is_(False)).limit(6)).all()
    if not rows:
        raise NotFoundError(f"no certificate with serial number {digits} in the inventory")
    if len(rows) > 1:
        raise PermanentError(f"serial number {digits} belongs to {len(rows)} certificates of different CAs ("
                             + ", ".join(f"{r.fingerprint_sha256[:16]} from {r.issuer}" for r in rows[:5])
                             + "): give the fingerprint")
    return rows[0]


def find_certificate(session: Session, fingerprint_or_name: str) -> Certificate:
    """The certificate ``fingerprint_or_name`` names: a managed certificate's name (its current
    certificate; once that is revoked, the newest it has had), else a SHA-256 fingerprint or a unique
    prefix of it (at least MIN_PREFIX hex digits, colons and case ignored), or ``serial:<hex>``.
    NotFoundError naming what was looked for; AmbiguousError for a prefix several fingerprints share."""
    text = fingerprint_or_name.strip()
    if not text:
        raise NotFoundError("no certificate named: give a managed certificate's name, a fingerprint or serial:HEX")
    named = session.exec(select(ManagedCertificate).where(ManagedCertificate.name == text)).first()
    if named is not None:
        return _managed_certificate(session, named)
    if text.lower().startswith(SERIAL_PREFIX):
        return _by_serial(session, text)
    digits = text.replace(":", "").lower()
    if len(digits) < MIN_PREFIX or any(ch not in "0123456789abcdef" for ch in digits):
        raise NotFoundError(f"no managed certificate named {text!r}, and it is not a fingerprint (at least "
                            f"{MIN_PREFIX} hex digits of the SHA-256 fingerprint) or serial:HEX")
    try:
        return inventory.resolve(session, text)
    except NotFoundError:
        raise NotFoundError(f"no managed certificate named {text!r} and no certificate with fingerprint "
                            f"{text!r} in the inventory") from None


def issuer_of(session: Session, certificate: Certificate) -> str | None:
    """The issuer block that can revoke ``certificate``: its managed certificate's issuer; None when
    the inventory does not know one (an unmanaged certificate)."""
    if certificate.managed_certificate_id is None:
        return None
    row = session.get(ManagedCertificate, certificate.managed_certificate_id)
    return row.issuer if row is not None else None


def private_ca_of(session: Session, certificate: Certificate) -> str | None:
    """The name of the certpilot private CA that issued ``certificate``, or None."""
    if certificate.issuer_fingerprint is None:
        return None
    return session.exec(select(CertificateAuthority.name)
                        .where(CertificateAuthority.issuing_fingerprint == certificate.issuer_fingerprint)).first()


def managed_name(session: Session, certificate: Certificate) -> str | None:
    """The name of the managed certificate ``certificate`` belongs to, or None."""
    if certificate.managed_certificate_id is None:
        return None
    row = session.get(ManagedCertificate, certificate.managed_certificate_id)
    return row.name if row is not None else None


# ------------------------------------------------------------------------------------------ revoking

def _first_event(session: Session, fingerprint: str) -> dict[str, Any]:
    """The details of the certificate's first certificate.revoked event ({} when it has none)."""
    details = session.execute(sa.select(col(AuditEvent.details))
                              .where(col(AuditEvent.action) == EVENT,
                                     col(AuditEvent.object) == f"certificate:{fingerprint}")
                              .order_by(col(AuditEvent.seq)).limit(1)).scalar_one_or_none()
    return dict(json.loads(details)) if details else {}


def already_revoked(session: Session, certificate: Certificate, issuer: str | None = None) -> RevocationOutcome | None:
    """The outcome of revoking ``certificate`` again when the inventory holds it as revoked: the first
    revocation's reason and time, who revoked it and how (from its audit event); None when it is not
    revoked. ``issuer`` names the issuer when the event does not."""
    if certificate.status != "revoked":
        return None
    first = _first_event(session, certificate.fingerprint_sha256)
    ca_name = private_ca_of(session, certificate)
    signed_with = "ca" if ca_name else str(first.get("signed_with") or "unknown")
    return RevocationOutcome(
        fingerprint_sha256=certificate.fingerprint_sha256, serial_hex=certificate.serial_hex,
        managed=managed_name(session, certificate),
        issuer=str(first.get("issuer") or first.get("ca") or issuer or ca_name or "unknown"),
        reason=reason_name(certificate.revocation_reason) or "unspecified",
        revoked_at=certificate.revoked_at or certificate.created_at, already=True, signed_with=signed_with)


def revoke(engine: sa.Engine, fingerprint: str, reason: x509.ReasonFlags, issuer: Issuer,
           key_ring: KeyRingSource, actor: audit.Actor, *, now: dt.datetime | None = None) -> RevocationOutcome:
    """Revoke the certificate ``fingerprint`` (SHA-256 hex, or a unique prefix) with ``issuer`` for
    ``reason``, and record it: see the module docstring. Raises what the issuer raises (nothing is
    recorded then); NotFoundError when the inventory has no such certificate."""
    with read_session(engine) as session:
        row = inventory.resolve(session, fingerprint)
        done = already_revoked(session, row, issuer.name)
        if done is not None:
            return done
        fingerprint = row.fingerprint_sha256
        leaf = x509.load_der_x509_certificate(row.der)
        ca_name = private_ca_of(session, row)
        key = None
        if ca_name is None and reason == x509.ReasonFlags.key_compromise and row.spki_sha256:
            ref = keystore.find_key(session, row.spki_sha256)
            if ref is not None:
                key = keystore.load_private_key(session, ref, key_ring())
    signed_with = "ca" if ca_name else ("certificate-key" if key is not None else "account")
    try:
        issuer.revoke(leaf, reason, key=key)
    finally:
        del key  # decrypted for this one request only
    now = now or utcnow()
    with write_session(engine) as session:
        stored = session.get(Certificate, fingerprint)
        if stored is None:  # removed from the inventory while the CA revoked it
            raise NotFoundError(f"certificate {fingerprint[:16]} left the inventory while {issuer.name} revoked it: "
                                "the revocation at the CA stands, but was not recorded")
        row = stored
        if row.status != "revoked":  # the private CA has recorded it already (certpilot.ca.revoke)
            previous = row.status
            row.status, row.revoked_at, row.revocation_reason = "revoked", now, reason.value
            session.add(row)
            session.flush()
            audit.append(session, actor, [audit.Change(EVENT, f"certificate:{fingerprint}", {
                "issuer": issuer.name, "serial": row.serial_hex, "reason": reason.value,
                "previous_status": previous, "signed_with": signed_with})], now)
        return RevocationOutcome(
            fingerprint_sha256=fingerprint, serial_hex=row.serial_hex, managed=managed_name(session, row),
            issuer=issuer.name, reason=reason_name(row.revocation_reason) or "unspecified",
            revoked_at=row.revoked_at or now, already=False, signed_with=signed_with)
