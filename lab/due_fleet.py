"""A fleet of managed certificates due for renewal, issued by certpilot's private CA, for the renewal
benchmarks and the work-pool tests: each gets a 30-day certificate issued 25 days ago (past two thirds
of its lifetime, so due), recorded as any issuance is (certpilot.renewing.record_issued). ``not_renewed_once``
says which of them a run renewed other than exactly once."""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import col, select

from certpilot import audit, ca, keystore, managed, renewing
from certpilot.database import read_session, write_session
from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.keys import generate_private_key
from certpilot.models import AuditEvent, Certificate, RenewalClaim

__all__ = ["define_due", "init_backdated_ca", "not_renewed_once"]


def init_backdated_ca(engine: sa.Engine, ring: keystore.KeyRing, actor: audit.Actor, name: str) -> None:
    """A private CA made 60 days ago, so that it can have signed the backdated certificates."""
    with write_session(engine) as session:
        ca.init_ca(session, ring, actor, name, "http://127.0.0.1:8888",
                   now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60))


def define_due(engine: sa.Engine, ring: keystore.KeyRing, actor: audit.Actor, ca_name: str, prefix: str,
               count: int, *, chunk: int = 100) -> list[str]:
    """``count`` managed certificates ``<prefix>-0000``... issued by ``private-ca/<ca_name>``, each with a
    30-day certificate issued 25 days ago (so: due). Returns their names."""
    back = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=25)
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    for start in range(0, count, chunk):
        with write_session(engine) as session:
            rows = [managed.add(session, managed.ManagedSpec(name=n, dns_names=(f"{n}.fleet.test",),
                                                             issuer=f"private-ca/{ca_name}", validity_days=30,
                                                             owner="fleet"), actor)
                    for n in names[start:start + chunk]]
            signer = ca.open_signer(session, ring, ca_name)
            for row in rows:
                key = generate_private_key(row.key_algorithm)
                ref = keystore.store_private_key(session, key, ring, actor, "generated")
                cert = signer.sign(build_csr(key, row.dns_names), "tls-server", validity_days=30, now=back)
                issued = IssuedCertificate((cert.public_bytes(Encoding.DER),
                                            signer.certificate.public_bytes(Encoding.DER)))
                renewing.record_issued(session, row, issued, ref, actor)
    return names


def not_renewed_once(engine: sa.Engine, names: list[str], after_seq: int) -> list[str]:
    """What shows that the certificates ``names`` (each with one certificate before) were not renewed exactly
    once since audit event ``after_seq``: a certificate without exactly one active and one superseded
    certificate, a ``certificate.issued`` event count other than one each, a renewal claim still held.
    Empty when each was renewed once."""
    wrong = []
    with read_session(engine) as session:
        for name in names:
            row = managed.get(session, name)
            statuses = sorted(session.exec(select(Certificate.status).where(
                col(Certificate.managed_certificate_id) == row.id)))
            if statuses != ["active", "superseded"]:
                wrong.append(f"{name}: certificates {statuses}")
        issued = [json.loads(e.details).get("managed") for e in session.exec(select(AuditEvent).where(
            AuditEvent.action == "certificate.issued", col(AuditEvent.seq) > after_seq))]
        if sorted(issued) != sorted(names):
            wrong.append(f"certificate.issued events for {sorted(issued)}, not once for each of {sorted(names)}")
        wrong += [f"claim still held on managed certificate {c.managed_certificate_id} by {c.holder}"
                  for c in session.exec(select(RenewalClaim))]
    return wrong
