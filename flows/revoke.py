"""The revoke-certificate flow: revoke one certificate with the CA that issued it, now.

The certificate is named by its managed certificate's name, its SHA-256 fingerprint (or a unique
prefix of at least 8 hex digits) or serial:HEX; its issuer block is the one given, else its managed
certificate's, else the private-ca block of the certpilot CA that issued it. The revocation is
recorded once (status, reason, time, one certificate.revoked audit event); a certificate revoked
already is not sent to the CA again, and the run says when and why it was. With ``wait`` the run then
watches the revocation reach relying parties, as they would see it (the CRL at the certificate's
distribution point and the OCSP responder in its AIA), and records how long that took (seed metric M6).

A managed certificate's run is tagged ``certificate:<name>`` and publishes its history artifact
``certificate-<name>``. No private key is a parameter, a result, a log line or an artifact: the
certificate's own key, which signs an ACME key-compromise revocation, is decrypted inside the revoke
task for that one request.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from certpilot.managed import certificate_tag
from certpilot.propagation import Propagation
from certpilot.revoking import RevocationReport
from flows.tagging import tag_flow_run
from tasks.history import audit_head, publish_certificate_history
from tasks.revocation import WATCH_SECONDS, locate_certificate, revoke_certificate_task, watch_revocation_task

# The revocation reasons a subscriber certificate may carry (certpilot.ca.REASONS), by CLI name: a
# Literal, so the run form offers them as a select.
ReasonName = Literal["unspecified", "key-compromise", "affiliation-changed", "superseded", "cessation-of-operation",
                     "privilege-withdrawn"]


@flow(name="revoke-certificate", flow_run_name="revoke-{certificate}", description=__doc__.split("\n\n")[1],
      timeout_seconds=3600)
def revoke_certificate(certificate: str, reason: ReasonName, issuer: str | None = None, wait: bool = True,
                       timeout: Annotated[float, Field(gt=0, le=600)] = WATCH_SECONDS) -> RevocationReport:
    """Revoke one certificate now, record it once, and watch relying parties see it.

    Args:
        certificate: The managed certificate's name, the certificate's SHA-256 fingerprint (or a unique prefix of
            at least 8 hex digits), or serial:HEX.
        reason: Why (RFC 5280): key-compromise when its private key may be in other hands.
        issuer: The issuer block that revokes it (e.g. acme-issuer/letsencrypt); by default its managed
            certificate's, or the private-ca block of the certpilot CA that issued it.
        wait: Watch the CRL at its distribution point and its OCSP responder until both say revoked, and record
            how long that took.
        timeout: How long to watch, in seconds.
    """
    logger = get_run_logger()
    located = locate_certificate(certificate, issuer)
    if located.managed:
        tag_flow_run(certificate_tag(located.managed))
    head = audit_head()
    propagation: Propagation | None = None
    try:
        outcome = revoke_certificate_task(located, reason)
        if wait and not outcome.already:
            watched = watch_revocation_task(outcome, timeout, return_state=True)
            if watched.is_completed():
                propagation = watched.result()
            else:  # the revocation stands and is recorded: the run says the watch failed, and does not fail
                logger.warning("the revocation of %s was not watched: %s", outcome.fingerprint_sha256[:16],
                               watched.message)
    finally:
        if located.managed:
            history = publish_certificate_history([located.managed], head, whole_run=True, return_state=True)
            if not history.is_completed():
                logger.warning("%s's history artifact was not published: %s", located.managed, history.message)
    report = RevocationReport(outcome, propagation)
    for line in report.lines():
        logger.info("%s", line)
    return report
