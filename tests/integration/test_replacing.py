"""certpilot.replacing without Prefect, on SQLite and PostgreSQL, with the real private CA: a campaign over
a scope (replace, revoke only, skip), resumed from its recorded items after a stop at any state (never a
fresh look at the scope, the key made once, the certificate issued once), revoke_first, and a replacement
that fails, which is not revoked. The managed certificates here have no targets (a deployment with none
counts as deployed); the flow tests deploy to real nginx and haproxy."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from certpilot import audit, ca, keystore, managed, renewing, replacing
from certpilot.database import read_session, write_session
from certpilot.errors import PermanentError, TransientError
from certpilot.issuance import IssuedCertificate, Issuer, OrderJournal, build_csr
from certpilot.models import AuditEvent, Certificate, PrivateKey, RenewalClaim, ReplacementItem
from certpilot.replacing import Item, Replacer, State
from certpilot.rollout import Outcome, Step
from certpilot.scope import Scope
from certpilot.settings import load_settings
from certpilot.x509info import fingerprint_sha256
from connectors.private_ca import PrivateCAIssuer

CA_NAME = "campaign-ca"
ISSUER = f"private-ca/{CA_NAME}"
ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


class Stopped(BaseException):
    """Stands for the process dying at a checkpoint (not an Exception: nothing records it)."""


def _no_targets(steps: Sequence[Step]) -> list[Outcome | BaseException]:
    raise AssertionError("these managed certificates have no targets: nothing may be deployed")


def _replacer(engine: sa.Engine, issuer: Issuer | None = None) -> Replacer:
    connector = issuer or PrivateCAIssuer(engine, CA_NAME, _ring)
    return Replacer(engine, lambda name: connector, _ring, ACTOR, _no_targets)


def _one_by_one(r: Replacer):  # noqa: ANN202 - a RunItems
    def run(items: Sequence[Item], width: int) -> list[Item | BaseException]:
        out: list[Item | BaseException] = []
        for item in items:
            try:
                out.append(replacing.advance(r, item.id))
            except Exception as exc:  # noqa: BLE001 - the seam returns each item's error
                out.append(exc)
        return out
    return run


@pytest.fixture
def estate(engine: sa.Engine) -> dict[str, str]:
    """CA_NAME with: managed 'alpha' (one certificate), managed 'beta' (a superseded certificate, still valid,
    and its current one), and an unmanaged certificate it issued. {label: fingerprint}."""
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888")
        for name in ("alpha", "beta"):
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.campaign.test",), issuer=ISSUER,
                                                     validity_days=30, owner="platform"), ACTOR)
        unmanaged = ca.issue(session, _ring(), ACTOR, CA_NAME,
                             build_csr(ec.generate_private_key(ec.SECP256R1()), ["stray.campaign.test"]), "tls-server")
    issuer = PrivateCAIssuer(engine, CA_NAME, _ring)
    found = {"alpha": renewing.renew_one(engine, "alpha", issuer, _ring, ACTOR).fingerprint_sha256,
             "beta-old": renewing.renew_one(engine, "beta", issuer, _ring, ACTOR).fingerprint_sha256}
    found["beta"] = renewing.renew_one(engine, "beta", issuer, _ring, ACTOR).fingerprint_sha256
    found["stray"] = fingerprint_sha256(unmanaged.leaf)
    return found


def _row(engine: sa.Engine, fingerprint: str) -> Certificate:
    with read_session(engine) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None
        return row


def _current(engine: sa.Engine, name: str) -> str:
    with read_session(engine) as session:
        row = managed.current_certificate(session, managed.get(session, name))
        assert row is not None
        return row.fingerprint_sha256


def _replacing(engine: sa.Engine, old: str) -> list[str]:
    with read_session(engine) as session:
        return list(session.exec(select(Certificate.fingerprint_sha256).where(Certificate.replaces_fingerprint == old)))


def test_a_campaign_replaces_revokes_only_and_skips(engine: sa.Engine, estate: dict[str, str]) -> None:
    campaign = replacing.open_campaign(engine, Scope(issuer=CA_NAME), "key-compromise", False, ACTOR)
    by_old = {i.old_fingerprint: i for i in campaign.items}
    assert {by_old[estate[k]].action for k in ("alpha", "beta")} == {"replace"}
    assert by_old[estate["beta-old"]].action == "revoke"
    stray = by_old[estate["stray"]]
    assert (stray.action, stray.state) == ("cannot", State.SKIPPED) and "certpilot managed adopt" in (stray.why or "")
    assert [i.action for i in campaign.items][:2] == ["replace", "replace"]  # replacements first

    r = _replacer(engine)
    done = replacing.run_campaign(engine, campaign, _one_by_one(r), 4, ACTOR)

    assert done.status == "done" and {i.state for i in done.items} == {State.DONE, State.SKIPPED}
    for name in ("alpha", "beta"):
        old, new = _row(engine, estate[name]), _row(engine, _current(engine, name))
        assert (old.status, old.revocation_reason) == ("revoked", "keyCompromise")
        assert new.spki_sha256 != old.spki_sha256 and new.replaces_fingerprint == old.fingerprint_sha256
    assert _row(engine, estate["beta-old"]).status == "revoked"  # revoke only: nothing replaces it
    assert _replacing(engine, estate["beta-old"]) == [estate["beta"]]  # its earlier renewal, nothing new
    assert _row(engine, estate["stray"]).status == "active"  # cannot: left alone


def test_the_same_scope_resumes_its_recorded_items(engine: sa.Engine, estate: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    scope = Scope(names=("alpha",))
    first = replacing.open_campaign(engine, scope, "key-compromise", False, ACTOR)
    [item] = first.items

    def stop_after_issued(item_id: int, state: str) -> None:
        if state == State.ISSUED:
            raise Stopped()

    with monkeypatch.context() as patched, pytest.raises(Stopped):
        patched.setattr(replacing, "checkpoint", stop_after_issued)
        replacing.advance(_replacer(engine), item.id)
    stopped = replacing.load_item(engine, item.id)
    assert stopped.state is State.ISSUED and stopped.key_id and stopped.new_fingerprint
    assert _current(engine, "alpha") == stopped.new_fingerprint  # the name now resolves to the new certificate

    again = replacing.open_campaign(engine, scope, "key-compromise", False, ACTOR)

    assert again.id == first.id and again.resumed
    assert [i.old_fingerprint for i in again.items] == [estate["alpha"]]  # the recorded item, not a fresh resolve
    done = replacing.run_campaign(engine, again, _one_by_one(_replacer(engine)), 2, ACTOR)
    assert done.status == "done"
    [finished] = done.items
    assert (finished.key_id, finished.new_fingerprint) == (stopped.key_id, stopped.new_fingerprint)
    assert _replacing(engine, estate["alpha"]) == [stopped.new_fingerprint]  # issued once
    assert _row(engine, estate["alpha"]).status == "revoked"
    # Another reason is another campaign: it resolves the scope afresh (the new certificate now).
    other = replacing.open_campaign(engine, scope, "superseded", False, ACTOR)
    assert other.id != first.id
    assert {(i.old_fingerprint, i.action) for i in other.items} == {(stopped.new_fingerprint, "replace"),
                                                                    (estate["alpha"], "nothing")}


def test_a_key_made_before_a_stop_is_used_after_it(engine: sa.Engine, estate: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = replacing.open_campaign(engine, Scope(names=("alpha",)), "key-compromise", False, ACTOR)
    [item] = campaign.items

    def stop_after_key(item_id: int, state: str) -> None:
        if state == State.KEY:
            raise Stopped()

    with monkeypatch.context() as patched, pytest.raises(Stopped):
        patched.setattr(replacing, "checkpoint", stop_after_key)
        replacing.advance(_replacer(engine), item.id)
    key_id = replacing.load_item(engine, item.id).key_id
    with read_session(engine) as session:
        keys_before = len(session.exec(select(PrivateKey)).all())

    done = replacing.advance(_replacer(engine), item.id)

    assert done.state is State.DONE and done.key_id == key_id
    with read_session(engine) as session:
        assert len(session.exec(select(PrivateKey)).all()) == keys_before  # no second key
        key = session.get(PrivateKey, key_id)
    assert key is not None and key.spki_sha256 == _row(engine, _current(engine, "alpha")).spki_sha256


class RefusingIssuer:
    """A CA that refuses to issue (revocations go to the real private CA)."""

    def __init__(self, inner: Issuer) -> None:
        self.inner, self.name = inner, inner.name

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        raise PermanentError(f"{self.name} refuses: policy forbids {csr.subject.rfc4514_string()}")

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *, key: object = None) -> None:
        self.inner.revoke(certificate, reason)

    def renewal_info(self, certificate: x509.Certificate) -> None:
        return None


@pytest.mark.parametrize("revoke_first", [False, True], ids=["replace-then-revoke", "revoke-first"])
def test_a_replacement_that_fails_is_not_revoked_unless_revoke_first(engine: sa.Engine, estate: dict[str, str],
                                                                    revoke_first: bool) -> None:
    campaign = replacing.open_campaign(engine, Scope(names=("alpha",)), "key-compromise", revoke_first, ACTOR)
    r = _replacer(engine, RefusingIssuer(PrivateCAIssuer(engine, CA_NAME, _ring)))  # type: ignore[arg-type]

    done = replacing.run_campaign(engine, campaign, _one_by_one(r), 1, ACTOR)

    [item] = done.items
    assert done.status == "failed" and item.state is State.FAILED
    assert item.error and item.error.startswith("issue: ") and "refuses" in item.error
    assert _row(engine, estate["alpha"]).status == ("revoked" if revoke_first else "active")
    assert (item.revoked_at is not None) == revoke_first
    if not revoke_first:
        assert _current(engine, "alpha") == estate["alpha"]  # still the certificate in service
    with read_session(engine) as session:
        failed = session.exec(select(AuditEvent).where(AuditEvent.action == "replacement.failed")).all()
    assert [json.loads(e.details)["after"] for e in failed] == ["revoked" if revoke_first else "key"]
    # Run again with a CA that issues: the campaign resumes the failed item from the key it made.
    resumed = replacing.open_campaign(engine, Scope(names=("alpha",)), "key-compromise", revoke_first, ACTOR)
    assert resumed.id == campaign.id
    [again] = resumed.items
    assert again.state is (State.REVOKED if revoke_first else State.KEY) and again.key_id == item.key_id
    finished = replacing.run_campaign(engine, resumed, _one_by_one(_replacer(engine)), 1, ACTOR)
    assert finished.status == "done" and _row(engine, estate["alpha"]).status == "revoked"


def test_a_scope_that_matches_nothing_opens_no_campaign(engine: sa.Engine, estate: dict[str, str]) -> None:
    with pytest.raises(replacing.NothingInScope, match="nothing matched the scope suffix=elsewhere.test"):
        replacing.open_campaign(engine, Scope(domain_suffix="elsewhere.test"), "key-compromise", False, ACTOR)
    with read_session(engine) as session:
        assert session.exec(select(ReplacementItem)).all() == []


def test_an_unknown_reason_is_refused(engine: sa.Engine, estate: dict[str, str]) -> None:
    with pytest.raises(PermanentError, match="unknown revocation reason 'compromised'"):
        replacing.open_campaign(engine, Scope(names=("alpha",)), "compromised", False, ACTOR)



def test_a_failed_canary_stops_the_run_before_the_others_start(engine: sa.Engine, estate: dict[str, str]) -> None:
    """The canary (alpha, first by name) is refused: beta's replacement and the revoke-only item are not
    started, nothing is revoked, the campaign is failed and resumable; run again, it finishes."""
    campaign = replacing.open_campaign(engine, Scope(issuer=CA_NAME), "key-compromise", False, ACTOR)
    refused = _replacer(engine, RefusingIssuer(PrivateCAIssuer(engine, CA_NAME, _ring)))  # type: ignore[arg-type]

    stopped = replacing.run_campaign(engine, campaign, _one_by_one(refused), 4, ACTOR)

    states = {i.old_fingerprint: i.state for i in stopped.items}
    assert stopped.status == "failed" and states[estate["alpha"]] is State.FAILED
    assert states[estate["beta"]] is State.PENDING and states[estate["beta-old"]] is State.PENDING
    assert all(_row(engine, fp).status != "revoked" for fp in (estate["alpha"], estate["beta"], estate["beta-old"]))
    message = str(replacing.RevokeAndReplaceFailed(replacing.CampaignReport.of(engine, stopped, None, 0.0)))
    assert "1 replacement(s) failed" in message and "2 certificate(s) not started because the canary failed" in message

    finished = replacing.run_campaign(engine, replacing.open_campaign(engine, Scope(issuer=CA_NAME), "key-compromise",
                                                                      False, ACTOR), _one_by_one(_replacer(engine)), 4, ACTOR)
    assert finished.status == "done"
    assert all(_row(engine, fp).status == "revoked" for fp in (estate["alpha"], estate["beta"], estate["beta-old"]))


def test_a_replacement_holds_the_renewal_claim_from_its_key_to_its_certificate(engine: sa.Engine,
                                                                               estate: dict[str, str],
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """While another run renews alpha (a live process holds its claim), its replacement waits, then fails as
    transient with nothing made; once that run is gone the replacement takes the claim, and a renew-due
    batch meeting alpha between its key and its certificate leaves it alone; the claim is given back after."""
    campaign = replacing.open_campaign(engine, Scope(names=("alpha",)), "key-compromise", False, ACTOR)
    [item] = campaign.items
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    renewer = f"process:{socket.gethostname()}:{other.pid}"
    try:
        assert renewing.claim(engine, "alpha", renewer) is None
        with pytest.raises(TransientError, match=f"alpha is being renewed by {renewer}: .* within 1 s"):
            replacing.advance(dataclasses.replace(_replacer(engine), claim_wait=1.0), item.id)
        waited = replacing.load_item(engine, item.id)
        assert (waited.state, waited.key_id) == (State.PENDING, None)
        assert waited.error and waited.error.startswith("claim: alpha is being renewed by")
    finally:
        other.kill()
        other.wait()

    def stop_after_key(item_id: int, state: str) -> None:
        if state == State.KEY:
            raise Stopped()

    replacer = _replacer(engine)
    with monkeypatch.context() as patched, pytest.raises(Stopped):
        patched.setattr(replacing, "checkpoint", stop_after_key)
        replacing.advance(replacer, item.id)  # the renewer is gone: its claim is taken over
    steps = renewing.DirectSteps(engine, lambda block: PrivateCAIssuer(engine, CA_NAME, _ring), _ring, ACTOR)
    batch = renewing.renew_claimed(steps, engine, "alpha", "flow-run:renew-due", estate["alpha"])
    assert batch == renewing.Skipped("alpha", f"run {replacer.holder} is renewing it")

    done = replacing.advance(replacer, item.id)

    assert done.state is State.DONE and _replacing(engine, estate["alpha"]) == [done.new_fingerprint]
    with read_session(engine) as session:
        assert session.exec(select(RenewalClaim)).all() == []
