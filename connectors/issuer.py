"""The Issuer role: anything that turns a CSR into a certificate (an ACME CA, the private CA).

Issuers only ever see the CSR: the private key stays with the caller, referred to by a KeyRef.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509

from certpilot.renewal import RenewalWindow

PROFILES = ("tls-server", "tls-client")


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf and the chain that goes with it, as DER, leaf first."""

    chain_der: tuple[bytes, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.chain_der[0])

    @property
    def chain(self) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(der) for der in self.chain_der]


@runtime_checkable
class Issuer(Protocol):
    name: str

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None) -> IssuedCertificate:
        """Issue a certificate for ``csr``; ``replaces`` names the certificate it renews (ARI)."""
        ...

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags) -> None: ...

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window, or None when it offers none."""
        ...
