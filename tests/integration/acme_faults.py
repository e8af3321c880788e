"""What the fault tests and bench/renew_under_faults.py share: an estate of managed certificates due for
renewal, renew-due run the way certpilot runs it without a Prefect API, and the count of issuances on both
sides (the CA's log, the inventory).

- ``expiring_estate`` defines ``count`` managed certificates whose current certificate (from a CA of the
  test's own, recorded by certpilot.renewing.record_issued as any issued certificate is) expires in five
  days: all due now; what the ACME CA issues for them (pebble: five years) is not due again.
- ``renew_due_directly`` is cli.renewals._Direct's renew-due (the due list, the renewal steps, the
  retries after the renew task's delays, the outcomes, RenewDueFailed) with the issuer given instead of
  one loaded from a Prefect block and the built-in policy: the code path of `certpilot renew --due`
  without a Prefect API.
- ``issuance_counts`` compares the CA's issued serials with the inventory's.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import col, select

from certpilot import audit, managed, renewing
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.issuance import IssuedCertificate, Issuer
from certpilot.keystore import KeyRing, store_private_key
from certpilot.models import Certificate, ManagedCertificate
from certpilot.policy import DEFAULT_POLICY
from certpilot.renewing import RenewDueFailed, RenewDueSummary
from certpilot.sample_estate import issue_leaf, make_ca
from tests.integration.acme_servers import Pebble

ACTOR = audit.Actor("fault-suite")
BLOCK = "acme-issuer/faulty"  # the issuer every managed certificate of the estate names


def expiring_estate(engine: sa.Engine, ring: Callable[[], KeyRing], names: Sequence[str], domain: str,
                    issuer: str = BLOCK) -> None:
    """Managed certificates ``names`` (DNS name NAME.``domain``), each with a current certificate that
    expires in five days, from a CA of the test's own."""
    now = utcnow()
    previous_ca = make_ca("certpilot fault suite previous CA", now=now)
    with write_session(engine) as session:
        for name in names:
            row = managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.{domain}",), issuer=issuer,
                                                           owner="fault-suite"), ACTOR, now)
            leaf, key = issue_leaf(previous_ca, [f"{name}.{domain}"], now + dt.timedelta(days=5), now=now)
            ref = store_private_key(session, key, ring(), ACTOR, origin="generated", now=now)
            chain = (leaf.public_bytes(Encoding.DER), previous_ca.certificate.public_bytes(Encoding.DER))
            issued = IssuedCertificate(chain)
            renewing.record_issued(session, row, issued, ref, ACTOR, now)


def renew_due_directly(engine: sa.Engine, issuer: Issuer, ring: Callable[[], KeyRing],
                       delays: Sequence[float] = ()) -> RenewDueSummary:
    """One renew-due run, as `certpilot renew --due` runs it without a Prefect API (cli.renewals._Direct),
    ``issuer`` signing for BLOCK; ``delays``: the renew task's retry delays. The summary, also when the run
    raised RenewDueFailed (its summary)."""
    from cli.renewals import _Direct

    direct = object.__new__(_Direct)  # its __init__ reads blocks through Prefect: give it what it would read
    direct.engine, direct.actor, direct.delays = engine, ACTOR, list(delays)
    direct.issuers = {BLOCK: issuer}
    direct.steps = renewing.DirectSteps(engine, direct._issuer, ring, ACTOR, policy=DEFAULT_POLICY)
    try:
        return direct.renew_due(dt.timedelta(0))
    except RenewDueFailed as failed:
        return failed.summary


@dataclass(frozen=True)
class Issuances:
    """Certificates the CA issued (since ``before``) and what the inventory recorded of them."""

    ca_serials: frozenset[int]  # issued by the CA
    recorded_serials: frozenset[int]  # the CA's certificates in the inventory, linked to a managed certificate
    per_managed: dict[str, int]  # managed certificate -> how many of the CA's certificates it has

    @property
    def not_recorded(self) -> frozenset[int]:
        """Issued by the CA, never recorded: a certificate issued for nothing (the next attempt had another)."""
        return self.ca_serials - self.recorded_serials

    @property
    def duplicates(self) -> int:
        """Issuances beyond one per renewal: the CA's certificates never recorded, plus any managed
        certificate holding more than one of them."""
        return len(self.not_recorded) + sum(n - 1 for n in self.per_managed.values() if n > 1)


def issuance_counts(engine: sa.Engine, pebble: Pebble, before: set[int] | frozenset[int] = frozenset()) -> Issuances:
    ca_serials = frozenset(set(pebble.issued()) - set(before))
    recorded: set[int] = set()
    per_managed: Counter[str] = Counter()
    with read_session(engine) as session:
        rows = session.exec(select(Certificate.serial_hex, ManagedCertificate.name).join(
            ManagedCertificate, col(Certificate.managed_certificate_id) == col(ManagedCertificate.id))).all()
    for serial_hex, name in rows:
        serial = int(serial_hex.replace(":", ""), 16)
        if serial in ca_serials:
            recorded.add(serial)
            per_managed[name] += 1
    return Issuances(ca_serials, frozenset(recorded), dict(per_managed))
