"""A test Issuer that really signs: a CA from certpilot.sample_estate (a seam the tests own), with
knobs to return something wrong (another public key, a changed certificate) or to fail."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpilot.issuance import IssuedCertificate, OrderJournal
from certpilot.renewal import RenewalWindow
from certpilot.sample_estate import Authority

UTC = dt.timezone.utc


class SampleIssuer:
    """Signs what it is asked with a real CA; ``tamper`` lets a test return something else."""

    def __init__(self, authority: Authority, name: str = "sample/ca",
                 tamper: Callable[[x509.CertificateBuilder, x509.CertificateSigningRequest], x509.CertificateBuilder] | None = None,
                 error: BaseException | None = None, public_key: Any = None) -> None:
        self.authority, self.name, self.tamper, self.error = authority, name, tamper, error
        self.public_key = public_key  # a key other than the CSR's, to sign for
        self.calls: list[dict[str, Any]] = []

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        self.calls.append({"profile": profile, "validity_days": validity_days, "replaces": replaces})
        if self.error is not None:
            raise self.error
        now = dt.datetime.now(UTC)
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.authority.certificate.subject)
                   .public_key(self.public_key or csr.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1))
                   .not_valid_after(now + dt.timedelta(days=validity_days or 90))
                   .add_extension(sans, critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if self.tamper:
            builder = self.tamper(builder, csr)
        leaf = builder.sign(self.authority.key, hashes.SHA256())  # type: ignore[arg-type]
        return IssuedCertificate((leaf.public_bytes(serialization.Encoding.DER),
                                  self.authority.certificate.public_bytes(serialization.Encoding.DER)))

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        raise NotImplementedError

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        return None
