"""certpilot's private CA with its CRL and OCSP served on a loopback port, for tests that check revocation
the way clients do (over HTTP, at the URLs the certificates carry)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certpilot import audit, ca, inventory, keystore
from certpilot.clock import Clock
from certpilot.database import write_session
from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from connectors.http_service import HTTPService, build_app
from connectors.private_ca import PrivateCAIssuer
from lab.ports import free_port


def key_ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@dataclass
class ServedCA:
    """CA ``name`` whose certificates point at ``url``, where its CRL and OCSP are answered."""

    name: str
    url: str
    engine: sa.Engine
    issuer: PrivateCAIssuer
    root: x509.Certificate
    issuing: x509.Certificate

    def issue(self, *names: str, validity_days: int | None = None) -> IssuedCertificate:
        """A certificate for ``names``, recorded in the inventory (so its OCSP and CRL know it)."""
        return self.issue_with_key(*names, validity_days=validity_days)[0]

    def issue_with_key(self, *names: str, validity_days: int | None = None,
                       ) -> tuple[IssuedCertificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.issuer.issue(build_csr(key, list(names)), "tls-server", validity_days=validity_days)
        with write_session(self.engine) as session:
            inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "issued")
                                       for c in issued.chain], audit.Actor("test"))
        return issued, key

    def revoke(self, certificate: x509.Certificate,
               reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise) -> None:
        self.issuer.revoke(certificate, reason)


@contextmanager
def private_ca_served(engine: sa.Engine, name: str = "corp", clock: Clock | None = None) -> Iterator[ServedCA]:
    """Create CA ``name`` in the inventory of ``engine`` and serve it on a free loopback port (its CRLs are
    reissued when due by ``clock``)."""
    app = build_app(engine, metrics=False, key_ring=key_ring, clock=clock)
    server = HTTPService(app, ("127.0.0.1", free_port())).start()
    try:
        with write_session(engine) as session:
            ca.init_ca(session, key_ring(), audit.Actor("test"), name, server.url)
            root, issuing = ca.ca_certificates(session, ca.get_ca(session, name))
        yield ServedCA(name, server.url, engine, PrivateCAIssuer(engine, name, key_ring), root, issuing)
    finally:
        server.close()
