"""Issuance: the Issuer role every CA connector plays, and the core steps around it.

The role lives here, in the core, because the core's renewal steps call it and the core imports
nothing above itself; connectors (ACME, the private CA) implement it. Issuers only ever see the CSR:
the private key stays in the keystore, referred to by a KeyRef.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from certpilot.keys import can_sign_certificates, signature_hash
from certpilot.renewal import RenewalWindow

PROFILES = ("tls-server", "tls-client", "mtls")  # the private CA's (certpilot.ca.CA_PROFILES); ACME: tls-server


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf and the chain that goes with it, as DER, leaf first; ``issuance_seconds``: how long the
    CA took, from the request to the certificate received (set by certpilot.renewing.issue, which
    times the issuer; None when not measured); ``notes``: what the issuer changed from the request and
    says so (the private CA: a validity cut at its issuing certificate's expiry), recorded with the
    issuance."""

    chain_der: tuple[bytes, ...]
    issuance_seconds: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.chain_der[0])

    @property
    def chain(self) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(der) for der in self.chain_der]


class OrderJournal(Protocol):
    """Where an issuance remembers the CA's order, so that a run killed after ordering resumes that
    order instead of placing a second one (revoke-and-replace keeps it in its item row). Issuers with
    no orders (the private CA, which signs at once) ignore it."""

    def order_url(self) -> str | None:
        """The order placed earlier for this request, to resume; None: place a new one."""
        ...

    def record_order(self, url: str) -> None:
        """Called once, as soon as the CA has created the order (before it is finalized)."""
        ...


@runtime_checkable
class Issuer(Protocol):
    """A CA: signs CSRs, revokes, and may suggest when to renew."""

    name: str

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        """Issue a certificate for ``csr``; ``replaces`` names the certificate it renews (ARI);
        ``journal`` lets a killed issuance resume its order (see OrderJournal)."""
        ...

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        """Revoke ``certificate`` with an RFC 5280 reason. ``key``: the certificate's own private key,
        where certpilot holds it, to sign the request with (ACME: a key-compromise revocation proves
        possession of the key); None signs with the issuer's own credentials. Revoking a certificate
        the CA already revoked is not an error."""
        ...

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window, or None when it offers none."""
        ...


def build_csr(key: PrivateKeyTypes, dns_names: Sequence[str], ip_addresses: Sequence[str] = (),
              uris: Sequence[str] = ()) -> x509.CertificateSigningRequest:
    """A CSR for these names (URIs such as SPIFFE IDs as uniformResourceIdentifier SANs), signed by
    ``key``. The subject CN is the first DNS name, else the first IP address, else the first URI, and
    only when it fits the 64 characters a CN may have; otherwise the subject is empty (the SANs are the
    names: a SPIFFE X.509-SVID needs no CN)."""
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if not names:
        raise ValueError("a certificate needs at least one name: a DNS name, an IP address or a URI")
    common_name = (list(dns_names) + list(ip_addresses) + list(uris))[0]
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if len(common_name) <= 64 else []
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name(subject))
               .add_extension(x509.SubjectAlternativeName(names), critical=False))
    algorithm = None if signature_hash(key) is None else hashes.SHA256()  # Ed25519, ML-DSA: no separate hash
    if can_sign_certificates(key):
        return builder.sign(key, algorithm)
    # refused with the builder's own error
    raise TypeError("Key must be an rsa, dsa, ec, ed25519, ed448, ml-dsa-44, ml-dsa-65, or ml-dsa-87 private key.")
