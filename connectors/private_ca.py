"""certpilot's own private CA as an Issuer (certpilot.issuance.Issuer).

The CA lives in the inventory (certpilot.ca): this connector decrypts the issuing key inside a
signer for one call and lets it go. Issuing only signs: like any issuer, it returns the chain and
writes nothing; the renewal's store step records the certificate (one certificate.issued event), and
from then on OCSP and the CRL know its serial. Revoking marks the inventory row and the CA's CRL
stale; OCSP answers from the inventory, so it reflects a revocation as soon as the transaction
commits, and the next fetch of the CRL (certpilot serve) issues one listing it.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot import audit, ca, keystore, token_keys
from certpilot.database import read_session, write_session
from certpilot.issuance import IssuedCertificate, OrderJournal
from certpilot.renewal import RenewalWindow
from certpilot.x509info import fingerprint_sha256

__all__ = ["PrivateCAIssuer", "open_token"]


def open_token(spec: token_keys.TokenSpec) -> token_keys.KeyToken:
    """The token a CA's issuing key is on (connectors.pkcs11_token), python-pkcs11 imported only then."""
    from connectors.pkcs11_token import open_token as open_pkcs11

    return open_pkcs11(spec)


class PrivateCAIssuer:
    """Issue and revoke with the private CA ``ca_name``. ``key_ring`` returns the master key ring
    (called only when a key must be decrypted); ``tokens`` opens the PKCS#11 token of a CA whose issuing
    key is on one."""

    def __init__(self, engine: sa.Engine, ca_name: str, key_ring: Callable[[], keystore.KeyRing], *,
                 actor: audit.Actor | None = None, tokens: token_keys.TokenOpener = open_token) -> None:
        self._tokens = tokens
        self.engine = engine
        self.ca_name = ca_name
        self.name = ca_name
        self._key_ring = key_ring
        self._actor = actor or audit.Actor(f"private-ca:{ca_name}")

    def __repr__(self) -> str:
        return f"PrivateCAIssuer(ca_name={self.ca_name!r})"

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        """Sign ``csr`` (tls-server or tls-client); nothing is recorded here. The chain is the leaf
        and the issuing CA certificate. Raises certpilot.ca.CertificateRequestError for a CSR the CA
        refuses (bad signature, no SAN, a weak key). ``replaces`` is not needed: the CA offers no ARI."""
        with read_session(self.engine) as session:
            return ca.sign(session, self._key_ring(), self.ca_name, csr, profile, validity_days=validity_days,
                           tokens=self._tokens)

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        """Mark ``certificate`` revoked in the inventory (OCSP says so at once) and the CA's CRL stale: the
        next fetch of the CRL issues a new one listing it (one CRL for a burst of revocations)."""
        with write_session(self.engine) as session:
            ca.revoke(session, self._key_ring(), self._actor, fingerprint_sha256(certificate), reason,
                      ca_name=self.ca_name, publish=False, tokens=self._tokens)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        """The private CA offers no ARI: renewal follows the managed certificate's own policy."""
        return None
