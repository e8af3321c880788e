"""What a relying party sees of a certificate's revocation, asked the way clients ask: `openssl ocsp`
against the OCSP responder named in the certificate's AIA, and the CRL fetched from its own CRL
distribution point (signature checked against the issuing CA)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID


@dataclass(frozen=True)
class RelyingPartyView:
    ocsp_text: str  # what `openssl ocsp` printed
    crl_entry: x509.RevokedCertificate | None  # the certificate's entry in the CRL at its distribution point

    @property
    def crl_reason(self) -> x509.ReasonFlags | None:
        if self.crl_entry is None:
            return None
        try:
            return self.crl_entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            return None


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def ocsp_url(leaf: x509.Certificate) -> str:
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    return next(str(d.access_location.value) for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP)


def crl_url(leaf: x509.Certificate) -> str:
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return next(str(name.value) for point in points for name in (point.full_name or ()))


def relying_party_view(leaf: x509.Certificate, issuing: x509.Certificate, root: x509.Certificate,
                       workdir: Path) -> RelyingPartyView:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "leaf.pem").write_bytes(_pem(leaf))
    (workdir / "issuing.pem").write_bytes(_pem(issuing))
    (workdir / "root.pem").write_bytes(_pem(root))
    run = subprocess.run(["openssl", "ocsp", "-issuer", "issuing.pem", "-cert", "leaf.pem", "-url", ocsp_url(leaf),
                          "-CAfile", "root.pem", "-timeout", "10"],
                         cwd=workdir, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    response = httpx.get(crl_url(leaf), timeout=10)
    assert response.status_code == 200, response.status_code
    crl = x509.load_der_x509_crl(response.content)
    assert crl.issuer == issuing.subject and crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    return RelyingPartyView(run.stdout + run.stderr, crl.get_revoked_certificate_by_serial_number(leaf.serial_number))
