"""certpilot and an ACME CA (pebble) with the fault proxy (lab/fault_proxy.py) between them, in HTTP mode:
TLS ends at the proxy (a certificate for 127.0.0.1 from the tests' CA) and the proxy speaks TLS to pebble.

- A finalize or a certificate download whose answer is lost (the CA acted, the client never heard) is
  retried without a second certificate: the CA's log shows one issuance.
- renew-due over 20 managed certificates with 30% of requests failing (resets, truncated answers, 5xx, 429
  with Retry-After): every renewal ends renewed or failed with a named error, the next run renews those that
  failed, and the CA issued exactly one certificate per renewal, each recorded in the inventory.
- A CA that issues, then is gone until the order's deadline, then back: the renewal fails, keeping its key and
  order in the renewal journal (certpilot.renewing), and the next run downloads the one certificate; a journal
  naming an order the CA no longer has is dropped (said in the log) and a new order placed: one certificate.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from certpilot import managed, renewing
from certpilot.database import read_session, write_session
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from certpilot.models import AuditEvent, PrivateKey
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from lab.fault_proxy import FaultProxy, Faults
from tests.integration.acme_faults import ACTOR, BLOCK, expiring_estate, issuance_counts, renew_due_directly
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


def _journal(engine: sa.Engine, name: str) -> tuple[str | None, str | None]:
    """The renewal journal of ``name``: its pending key id and order URL."""
    with read_session(engine) as session:
        row = managed.get(session, name)
        return row.pending_key_id, row.pending_order_url


def _keys_made(engine: sa.Engine) -> list[PrivateKey]:
    with read_session(engine) as session:
        return list(session.exec(select(PrivateKey).where(PrivateKey.origin == "generated")
                                 .order_by(col(PrivateKey.created_at))))


def test_a_ca_gone_after_finalize_until_the_deadline_then_back(sqlite_engine: sa.Engine, faulty_pebble: Pebble,
                                                               proxy: FaultProxy, key_ring: Callable[[], KeyRing],
                                                               http01_responder: Http01Responder,
                                                               acme_tls: tuple[Path, Path, Path]) -> None:
    """The CA issues, then its answers are lost until the order's deadline (3 s here): the renewal fails
    (transient), keeping its key and order in the renewal journal; the next run takes them up and downloads
    the certificate the CA issued: one certificate, carrying the first attempt's key."""
    expiring_estate(sqlite_engine, key_ring, ["gone"], "faults.certpilot.test")
    before = set(faulty_pebble.issued())
    keys_before = len(_keys_made(sqlite_engine))
    issuer = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, retry_backoff=0.01,
                     order_timeout=3.0)
    issuer.timeout = 0.5
    proxy.set_faults(Faults(black_hole=1.0, only=lambda method, path: path.startswith("/certZ/")))
    first = renew_due_directly(sqlite_engine, issuer, key_ring)
    assert first.failed == 1 and "no answer within 0.5 s" in (first.failures[0].reason or "")
    pending_key, order = _journal(sqlite_engine, "gone")
    assert pending_key is not None and order is not None and f"{proxy.url}/my-order/" in order
    assert len(set(faulty_pebble.issued()) - before) == 1  # the CA issued; certpilot never heard

    proxy.set_faults(Faults())
    second = renew_due_directly(sqlite_engine, issuer, key_ring)
    assert second.renewed == 1 and second.failed == 0, second.failures
    assert issuance_counts(sqlite_engine, faulty_pebble, before).duplicates == 0
    assert _journal(sqlite_engine, "gone") == (None, None)  # cleared once the certificate is stored
    made = _keys_made(sqlite_engine)[keys_before:]
    assert [k.id for k in made] == [pending_key] and made[0].destroyed_at is None  # one key made, and kept
    with read_session(sqlite_engine) as session:
        current = managed.current_certificate(session, managed.get(session, "gone"))
    assert current is not None and current.spki_sha256 == made[0].spki_sha256


def test_a_journal_whose_order_the_ca_no_longer_has_places_a_new_order(
        sqlite_engine: sa.Engine, faulty_pebble: Pebble, proxy: FaultProxy, key_ring: Callable[[], KeyRing],
        http01_responder: Http01Responder, acme_tls: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    """A renewal journal naming an order the CA does not know (forgotten, expired): the next run drops it,
    says so in the log, orders anew with the pending key and gets one certificate."""
    expiring_estate(sqlite_engine, key_ring, ["forgotten"], "faults.certpilot.test")
    before = set(faulty_pebble.issued())
    issuer = _issuer(sqlite_engine, proxy, key_ring, http01_responder, acme_tls, retry_backoff=0.01)
    plan = renewing.plan(sqlite_engine, "forgotten")
    pending = renewing.new_key(sqlite_engine, plan, key_ring, ACTOR)  # the key step of an attempt that then died
    unknown = f"{proxy.url}/my-order/forgotten-by-the-ca"
    with write_session(sqlite_engine) as session:
        row = managed.get(session, "forgotten")
        assert row.pending_key_id == pending.id
        row.pending_order_url = unknown
        session.add(row)

    with caplog.at_level(logging.INFO, logger="certpilot.renewing"):
        summary = renew_due_directly(sqlite_engine, issuer, key_ring)

    assert summary.renewed == 1 and summary.failed == 0, summary.failures
    said = caplog.text
    assert f"takes up its pending key {pending}" in said and f"its order {unknown}" in said
    assert f"the CA could not resume order {unknown}" in said and "dropped from the journal" in said
    counts = issuance_counts(sqlite_engine, faulty_pebble, before)
    assert counts.duplicates == 0 and counts.per_managed == {"forgotten": 1}
    assert _journal(sqlite_engine, "forgotten") == (None, None)
    with read_session(sqlite_engine) as session:
        current = managed.current_certificate(session, managed.get(session, "forgotten"))
        key = session.get(PrivateKey, pending.id)
    assert current is not None and key is not None and current.spki_sha256 == key.spki_sha256
