"""The error tree: one root, a transient branch (retry with backoff) and a permanent one (do not retry).

Every error carries the data that caused it, never key material or PEM text, so that it is safe to
log, to show in a Prefect state message and to persist as a flow's failure.
"""

from __future__ import annotations


class CertpilotError(Exception):
    """Root of every error certpilot raises on purpose."""


class TransientError(CertpilotError):
    """Worth retrying: a timeout, a refused connection, a busy database."""


class PermanentError(CertpilotError):
    """Retrying cannot help: bad input, a rejected request, a broken invariant."""


class ParseError(PermanentError):
    """Input that is not a certificate, key or bundle in any format certpilot reads.

    ``source`` names the input (a path or ``-``), ``detail`` says exactly what is wrong.
    """

    def __init__(self, detail: str, source: str | None = None) -> None:
        self.detail = detail
        self.source = source
        super().__init__(f"{source}: {detail}" if source else detail)


class PasswordError(ParseError):
    """An encrypted key or PKCS#12 file with no password, or the wrong one."""


class KeyMismatchError(PermanentError):
    """A private key that belongs to none of the certificates it was given with."""

    def __init__(self, key_spki_sha256: str, certificate_fingerprints: list[str]) -> None:
        self.key_spki_sha256 = key_spki_sha256
        self.certificate_fingerprints = certificate_fingerprints
        shown = ", ".join(fp[:16] for fp in certificate_fingerprints) or "none"
        super().__init__(
            f"private key (public key sha256 {key_spki_sha256[:16]}...) matches none of the "
            f"certificates given with it ({shown})"
        )


class NotFoundError(PermanentError):
    """No inventory object matches the identifier given."""


class AmbiguousError(PermanentError):
    """An identifier prefix that matches more than one inventory object."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        self.prefix = prefix
        self.matches = matches
        super().__init__(
            f"{prefix!r} matches {len(matches)} certificates: "
            + ", ".join(m[:16] for m in matches[:5])
            + (" ..." if len(matches) > 5 else "")
            + "; give more of the fingerprint"
        )


class MasterKeyError(PermanentError):
    """The master key is missing, malformed, or not the one that wrapped a stored key."""


class AuditChainError(PermanentError):
    """The audit chain is broken; ``seq`` is the first event that fails."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"audit chain broken at event {seq}: {reason}")
