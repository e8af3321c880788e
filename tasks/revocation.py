"""Revocation tasks: thin units over certpilot.revoking and connectors.revocation.

``locate`` says which certificate an operator named and which issuer block revokes it: the one given,
else its managed certificate's issuer, else (a certificate a certpilot private CA issued that nothing
manages) the saved private-ca block whose ca_name is that CA. A certificate already revoked needs no
issuer at all: the outcome of revoking it again is read from the inventory. ``revoke_located`` loads
the issuer block and revokes (certpilot.revoking.revoke); ``watch_and_record`` watches the revocation
reach relying parties (the CRL at its distribution point and its OCSP responder) and records how long
that took (certpilot.propagation). The CLI calls these plain functions directly when it has no
Prefect API; the tasks below wrap them for the revoke-certificate flow.

Secrets: no task takes or returns a private key. The certificate's own key, for a key-compromise
revocation signed by it, is decrypted inside certpilot.revoking.revoke for that one request. Errors
leave the tasks redacted (certpilot.errors.redact), since Prefect logs them and keeps their text.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from cryptography import x509
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

import blocks.issuers  # noqa: F401  (registers the issuer block types, so load_block finds them)
from certpilot import audit, revoking
from certpilot.ca import parse_reason
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import CertpilotError, NotFoundError, PermanentError, TransientError, redact
from certpilot.models import Certificate
from certpilot.propagation import Propagation, record_propagation
from certpilot.revoking import RevocationOutcome
from connectors.revocation import watch_revocation
from tasks.inventory import retry_transient_only, run_actor
from tasks.renewal import key_ring, load_issuer

PRIVATE_CA = "private-ca"  # PrivateCABlock's block type slug
WATCH_SECONDS = 30.0  # how long a revocation is watched by default


@dataclass(frozen=True)
class Located:
    """The certificate to revoke, and who revokes it. ``already``: it is revoked already (then
    ``issuer`` is who revoked it, and nothing is to be done)."""

    fingerprint_sha256: str
    serial_hex: str
    managed: str | None
    issuer: str
    already: RevocationOutcome | None = None


def private_ca_block(ca_name: str) -> str | None:
    """The saved private-ca issuer block whose ca_name is ``ca_name`` (``private-ca/<name>``; the first by
    name when several are), or None."""
    with get_client(sync_client=True) as client:
        try:
            documents = client.read_block_documents_by_type(PRIVATE_CA, include_secrets=False)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 404:  # the block type was never registered
                return None
            raise
    names = sorted(d.name for d in documents
                   if d.name and not d.is_anonymous and (d.data or {}).get("ca_name") == ca_name)
    return f"{PRIVATE_CA}/{names[0]}" if names else None


def locate(certificate: str, issuer: str | None = None) -> Located:
    """The certificate ``certificate`` names (a managed certificate's name, a fingerprint or a unique
    prefix, or serial:HEX) and the issuer block that revokes it (``issuer`` when given). NotFoundError
    naming what was looked for; PermanentError when nothing says which issuer can revoke it."""
    with read_session(get_engine()) as session:
        row = revoking.find_certificate(session, certificate)
        already = revoking.already_revoked(session, row, issuer)
        block = issuer or revoking.issuer_of(session, row)
        ca_name = revoking.private_ca_of(session, row)
        found = (row.fingerprint_sha256, row.serial_hex, revoking.managed_name(session, row), row.subject)
    fingerprint, serial, managed, subject = found
    if already is not None:
        return Located(fingerprint, serial, managed, already.issuer, already)
    if block is None and ca_name is not None:
        block = private_ca_block(ca_name)
        if block is None:
            raise PermanentError(f"certificate {fingerprint[:16]} ({subject}) was issued by private CA {ca_name}, and "
                                 "no private-ca issuer block names that CA: save one with "
                                 f"`certpilot ca register-block {ca_name}`, or name the issuer block with --issuer")
    if block is None:
        raise PermanentError(f"certificate {fingerprint[:16]} ({subject}) is not managed and was not issued by a "
                             "certpilot private CA: name the issuer block that can revoke it (--issuer, e.g. "
                             "acme-issuer/NAME)")
    return Located(fingerprint, serial, managed, block)


def revoke_located(located: Located, reason: x509.ReasonFlags, actor: audit.Actor) -> RevocationOutcome:
    """Revoke ``located`` with its issuer block (loaded now), or say it was revoked already."""
    if located.already is not None:
        return located.already
    engine, ring = get_engine(), key_ring()
    issuer = load_issuer(located.issuer, engine, ring, actor)
    return revoking.revoke(engine, located.fingerprint_sha256, reason, issuer, ring, actor)


def watch_and_record(outcome: RevocationOutcome, timeout: float, actor: audit.Actor,
                     transport: httpx.BaseTransport | None = None) -> Propagation | None:
    """Watch ``outcome``'s revocation reach relying parties for up to ``timeout`` seconds and record it
    (one certificate.revocation_visible event). None for a certificate that was revoked already (nothing
    changed: nothing to measure) or that names neither a CRL nor an OCSP responder (nothing recorded)."""
    if outcome.already:
        return None
    with read_session(get_engine()) as session:
        row = session.get(Certificate, outcome.fingerprint_sha256)
        if row is None:
            raise NotFoundError(f"certificate {outcome.fingerprint_sha256[:16]} is no longer in the inventory")
        leaf = x509.load_der_x509_certificate(row.der)
        parent = session.get(Certificate, row.issuer_fingerprint) if row.issuer_fingerprint else None
        issuing = x509.load_der_x509_certificate(parent.der) if parent is not None else None
    if issuing is None:
        return Propagation(None, None, None, None, None, f"the certificate's issuer ({row.issuer}) is not in the "
                                                           "inventory, so its CRL and OCSP answers cannot be verified")
    propagation = watch_revocation(leaf, issuing, outcome.revoked_at, timeout=timeout, transport=transport)
    if propagation.crl_url is None and propagation.ocsp_url is None:
        return propagation
    with write_session(get_engine()) as session:
        record_propagation(session, outcome.fingerprint_sha256, propagation, actor)
    return propagation


def _redacted(exc: Exception) -> CertpilotError:
    """``exc`` as a certpilot error whose text went through redact (transient stays transient)."""
    if isinstance(exc, CertpilotError) and str(exc) == redact(exc):
        return exc
    cls = TransientError if isinstance(exc, TransientError) else PermanentError
    return cls(redact(exc))


# ------------------------------------------------------------------------------------------ tasks

@task(name="locate-certificate", task_run_name="locate-{certificate}", cache_policy=NO_CACHE, timeout_seconds=120)
def locate_certificate(certificate: str, issuer: str | None = None) -> Located:
    """Which certificate to revoke and which issuer block revokes it (see ``locate``)."""
    try:
        return locate(certificate, issuer)
    except Exception as exc:  # noqa: BLE001 - redacted and re-raised
        raise _redacted(exc) from None


@task(name="revoke-certificate", task_run_name="revoke-{located.fingerprint_sha256:.16}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient_only, timeout_seconds=600)
def revoke_certificate_task(located: Located, reason: str) -> RevocationOutcome:
    """Revoke the located certificate with its issuer (retried when the CA failed transiently: a
    revocation the CA already did is no error). Returns the outcome, never a key."""
    try:
        return revoke_located(located, parse_reason(reason), run_actor())
    except Exception as exc:  # noqa: BLE001 - redacted and re-raised
        raise _redacted(exc) from None


@task(name="watch-revocation", task_run_name="watch-{outcome.fingerprint_sha256:.16}", cache_policy=NO_CACHE,
      timeout_seconds=900)
def watch_revocation_task(outcome: RevocationOutcome, timeout: float = WATCH_SECONDS) -> Propagation | None:
    """Watch the revocation reach relying parties (CRL and OCSP) and record how long it took."""
    try:
        return watch_and_record(outcome, timeout, run_actor())
    except Exception as exc:  # noqa: BLE001 - redacted and re-raised
        raise _redacted(exc) from None
