"""certpilot and an ACME CA (pebble) with the fault proxy (lab/fault_proxy.py) between them, in HTTP mode:
TLS ends at the proxy (a certificate for 127.0.0.1 from the tests' CA) and the proxy speaks TLS to pebble.

- A finalize or a certificate download whose answer is lost (the CA acted, the client never heard) is
  retried without a second certificate: the CA's log shows one issuance.
- renew-due over 20 managed certificates with 30% of requests failing (resets, truncated answers, 5xx, 429
  with Retry-After): every renewal ends renewed or failed with a named error, the next run renews those that
  failed, and the CA issued exactly one certificate per renewal, each recorded in the inventory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from certpilot import managed
from certpilot.database import read_session
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from certpilot.models import AuditEvent
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from lab.fault_proxy import FaultProxy, Faults
from tests.integration.acme_faults import BLOCK, expiring_estate, issuance_counts, renew_due_directly
from tests.integration.acme_servers import ChallTestSrv, Pebble

CERTIFICATES = 20
# 30% of requests fail transiently; a 429 asks for a one-second wait.
FLAKY = Faults(reset=0.08, truncate=0.08, status_5xx=0.10, status_429=0.04, retry_after=1)


@pytest.fixture(scope="module")
def faulty_pebble(acme_workdir: Path, challtestsrv: ChallTestSrv, http01_responder: Http01Responder,
                  acme_tls: tuple[Path, Path, Path]) -> Iterator[Pebble]:
    """A pebble of this module's own, so that its log counts only this module's issuances."""
    with Pebble.start(acme_workdir / "pebble-faults", dns=challtestsrv, http_port=http01_responder.port,
                      tls=acme_tls) as server:
        yield server


@pytest.fixture
def proxy(faulty_pebble: Pebble, acme_tls: tuple[Path, Path, Path]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=("127.0.0.1", faulty_pebble.port), seed=12, mode="http", tls=(acme_tls[1], acme_tls[2]),
                    upstream_ca=faulty_pebble.ca_bundle, timeout=10) as server:
        yield server


def _issuer(engine: sa.Engine, proxy: FaultProxy, ring: Callable[[], KeyRing], solver: Http01Responder,
            acme_tls: tuple[Path, Path, Path], **options: object) -> AcmeIssuer:
    return AcmeIssuer(engine, "faulty", f"{proxy.url}/dir", key_ring=ring, solver=solver, ca_bundle=acme_tls[0],
                      timeout=5.0, **options)  # type: ignore[arg-type]


class FirstOf:
    """A fault aim: the first ``count`` requests whose path starts with ``prefix``."""

    def __init__(self, prefix: str, count: int = 1) -> None:
        self.prefix, self.left = prefix, count
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str) -> bool:
        with self.lock:
            if path.startswith(self.prefix) and self.left > 0:
                self.left -= 1
                return True
            return False


@pytest.mark.parametrize("path", ["/finalize-order/", "/certZ/"])
def test_a_lost_answer_after_finalize_gets_the_one_certificate(sqlite_engine: sa.Engine, faulty_pebble: Pebble,
                                                               proxy: FaultProxy, key_ring: Callable[[], KeyRing],
                                                               http01_responder: Http01Responder,
                                                               acme_tls: tuple[Path, Path, Path], path: str) -> None:
    issuer = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, retry_backoff=0.01)
    issuer.account()
    before = set(faulty_pebble.issued())
    proxy.set_faults(Faults(truncate=1.0, only=FirstOf(path)))  # the CA acts, its answer is cut in half
    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), [f"lost{len(before)}.faults.certpilot.test"]),
                          "tls-server")
    assert proxy.stats.injected["truncate"] == 1
    new = set(faulty_pebble.issued()) - before
    assert new == {issued.leaf.serial_number}  # one certificate, the one certpilot holds


def test_renew_due_through_a_flaky_link_renews_each_once(sqlite_engine: sa.Engine, faulty_pebble: Pebble,
                                                         proxy: FaultProxy, key_ring: Callable[[], KeyRing],
                                                         http01_responder: Http01Responder,
                                                         acme_tls: tuple[Path, Path, Path]) -> None:
    names = [f"flaky{i}" for i in range(CERTIFICATES)]
    expiring_estate(sqlite_engine, key_ring, names, "faults.certpilot.test")
    before = set(faulty_pebble.issued())
    _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls).account()  # registered on a sound link
    proxy.set_faults(FLAKY)

    # A first run by an impatient certpilot (one retry per request, none per renewal): some renewals fail.
    impatient = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, transient_retries=1,
                        retry_backoff=0.01)
    first = renew_due_directly(sqlite_engine, impatient, key_ring)
    assert first.due == CERTIFICATES and first.renewed + first.failed == CERTIFICATES
    assert first.failed > 0, "30% of requests failing with one retry each must fail some renewals"
    for failure in first.failures:  # failed loudly: the step, the CA, and what went wrong where
        assert failure.step == "issue" and failure.kept is not None
        assert failure.reason and "faulty: " in failure.reason
        assert re.search(rf"127\.0\.0\.1:{proxy.port}|HTTP 5\d\d|HTTP 429|rateLimited|serverInternal",
                         failure.reason), failure.reason
    with read_session(sqlite_engine) as session:
        for failure in first.failures:
            assert managed.get(session, failure.name).last_error.startswith("issue: ")  # type: ignore[union-attr]

    # The next run (certpilot's defaults, the renew task's retries) renews exactly those that failed.
    patient = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, retry_backoff=0.02)
    second = renew_due_directly(sqlite_engine, patient, key_ring, delays=(0.05, 0.1, 0.2))
    assert sorted(o.name for o in second.failures) == [], second.failures
    assert second.due == first.failed and second.renewed == first.failed
    assert renew_due_directly(sqlite_engine, patient, key_ring).due == 0

    injected = proxy.stats.injected
    assert all(injected[kind] > 0 for kind in ("reset", "truncate", "status_5xx", "status_429")), injected
    counts = issuance_counts(sqlite_engine, faulty_pebble, before)
    assert counts.not_recorded == frozenset()  # nothing issued for nothing
    assert counts.per_managed == dict.fromkeys(names, 1)  # one certificate per renewal
    assert len(counts.ca_serials) == CERTIFICATES
    with read_session(sqlite_engine) as session:
        issued_events = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued")).all()
        assert len(issued_events) == 2 * CERTIFICATES  # the certificates expiring, then one renewal each
        for name in names:
            row = managed.get(session, name)
            assert row.last_error is None and row.issuer == BLOCK
            current = managed.current_certificate(session, row)
            assert current is not None and int(current.serial_hex, 16) in counts.ca_serials


@pytest.mark.xfail(strict=True, reason="a renewal that fails after its order was finalized does not keep its key "
                   "and order for the next attempt (no renewal journal yet), so the next run has another certificate "
                   "issued; within one attempt certpilot retries until the order's deadline, which covers short faults")
def test_a_ca_gone_after_finalize_until_the_deadline_then_back(sqlite_engine: sa.Engine, faulty_pebble: Pebble,
                                                               proxy: FaultProxy, key_ring: Callable[[], KeyRing],
                                                               http01_responder: Http01Responder,
                                                               acme_tls: tuple[Path, Path, Path]) -> None:
    expiring_estate(sqlite_engine, key_ring, ["gone"], "faults.certpilot.test")
    before = set(faulty_pebble.issued())
    issuer = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, retry_backoff=0.01,
                     order_timeout=3.0)
    issuer.timeout = 0.5
    proxy.set_faults(Faults(black_hole=1.0, only=lambda method, path: path.startswith("/certZ/")))
    first = renew_due_directly(sqlite_engine, issuer, key_ring)
    assert first.failed == 1 and "no answer within 0.5 s" in (first.failures[0].reason or "")
    proxy.set_faults(Faults())
    assert renew_due_directly(sqlite_engine, issuer, key_ring).renewed == 1
    assert issuance_counts(sqlite_engine, faulty_pebble, before).duplicates == 0
