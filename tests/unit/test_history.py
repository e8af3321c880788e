"""A managed certificate's history as one run recorded it (certpilot.history), on SQLite and PostgreSQL:
each run's audit events attributed to the certificate they are about (its managed row, its targets,
its certificates and their keys, the places they were found), none of another's, none of another run's."""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import select

from certpilot import audit, history, inventory, keystore, managed, targets
from certpilot.database import read_session, write_session
from certpilot.models import AuditEvent, Certificate
from certpilot.renewing import renew_one
from certpilot.sample_estate import make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from tests.sample_issuer import SampleIssuer

RUN = "11111111-1111-1111-1111-111111111111"
OTHER_RUN = "22222222-2222-2222-2222-222222222222"


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _add(engine: sa.Engine, name: str) -> None:
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.example.test",),
                                                 issuer="private-ca/internal", owner="platform"),
                    audit.Actor("test"))


def test_each_certificate_gets_its_own_events_of_the_run(engine: sa.Engine) -> None:
    for name in ("web", "api", "idle"):
        _add(engine, name)
    issuer = SampleIssuer(make_ca("History CA"))
    renew_one(engine, "web", issuer, _ring, audit.Actor("test"))  # before the run: not its history
    with read_session(engine) as session:
        head = history.audit_head(session)
    run = audit.Actor("prefect:renew-due", RUN)
    web = renew_one(engine, "web", issuer, _ring, run)
    api = renew_one(engine, "api", issuer, _ring, run)
    renew_one(engine, "idle", issuer, _ring, audit.Actor("prefect:renew-due", OTHER_RUN))  # another run
    with write_session(engine) as session:  # web's certificate found in a new place, and a target added
        cert = session.get(Certificate, web.fingerprint_sha256)
        assert cert is not None
        record = describe_certificate(x509.load_der_x509_certificate(cert.der))
        inventory.upsert(session, [inventory.Observation(record, "tls://web.example.test:443", "tls-scan:lab")], run)
        targets.add(session, "web", "nginx-1", "ssh-nginx", "ssh-host/web-1",
                    {"certificate_path": "/etc/ssl/web.pem", "key_path": "/etc/ssl/web.key"}, run)

    with read_session(engine) as session:
        found = history.run_history(session, RUN, head, ["web", "api", "idle"])
        touched = history.run_history(session, RUN, head)  # every managed certificate the run touched
        whole = history.run_history(session, RUN, head, ["web"], whole_run=True)
        later = history.run_history(session, RUN, history.audit_head(session), ["web"])

    actions = {name: [(e.action, e.object) for e in events] for name, events in found.items()}
    web_objects = {o for _, o in actions["web"]}
    assert f"certificate:{web.fingerprint_sha256}" in web_objects and "managed:web" in web_objects
    assert {a for a, _ in actions["web"]} >= {"key.stored", "certificate.issued", "certificate.superseded",
                                              "location.added", "target.added"}
    assert {a for a, _ in actions["api"]} >= {"key.stored", "certificate.issued"}
    assert f"certificate:{web.fingerprint_sha256}" not in {o for _, o in actions["api"]}
    assert f"certificate:{api.fingerprint_sha256}" not in web_objects
    assert actions["idle"] == []  # renewed by another run
    assert set(touched) == {"web", "api"} and touched["web"] == found["web"]
    seqs = [e.seq for e in found["web"]]
    assert seqs == sorted(seqs) and min(seqs) > head
    # A run about one certificate: every event of the run is its own (api's too, here).
    with read_session(engine) as session:
        run_events = session.exec(select(AuditEvent.seq).where(AuditEvent.flow_run_id == RUN,
                                                               AuditEvent.seq > head)).all()
    assert [e.seq for e in whole["web"]] == sorted(run_events)
    assert sorted(e.seq for name in ("web", "api") for e in found[name]) == sorted(run_events)  # none left out
    assert later == {"web": ()}  # nothing after the head read at the end

    markdown = history.history_markdown("web", found["web"], "renew-due run 'amber-fox'")
    assert markdown.startswith("# web: what renew-due run 'amber-fox' did")
    assert "`certificate:web`" in markdown and "`certificate-web`" in markdown
    assert f"certificate:{web.fingerprint_sha256}" in markdown and "location.added" in markdown
    assert "BEGIN" not in markdown
    assert "recorded no audit event" in history.history_markdown("idle", (), "renew-due run 'x'")


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert history.artifact_key("web-1") == "certificate-web-1"
    assert history.artifact_key("Shop_EU.prod") == "certificate-shop-eu-prod"
    assert history.artifact_key("***") == "certificate-unnamed"
    assert len(history.artifact_key("x" * 300)) == 100


def test_many_events_are_listed_up_to_a_bound() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    events = [history.HistoryEvent(i, now, "a", "location.added", "certificate:ab", {"locator": f"tls://h{i}|x"})
              for i in range(history.ROWS_SHOWN + 5)]
    markdown = history.history_markdown("web", events, "discover run 'x'")
    assert f"{history.ROWS_SHOWN + 5} audit event(s)" in markdown and "and 5 more" in markdown
    assert "tls://h0\\|x" in markdown  # a pipe in details does not break the table
    assert json.dumps({"locator": "tls://h0|x"}) not in markdown
