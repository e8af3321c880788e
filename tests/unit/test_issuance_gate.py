"""The issuance gate with the real private CA, on SQLite and PostgreSQL: a renewal, a first issuance, a
revoke-and-replace replacement and `certpilot ca issue` from a CSR that violate the policy are refused
before the CA signs anything, naming the rule: observed on the CA (its issued count, the certificates in
the inventory, no key made); a waiver lets the same request through until it expires. (ACME:
tests/integration/test_acme_gate.py, where pebble sees no order.)"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, ca, keystore, managed, renewing, replacing, violations
from certpilot.database import read_session, write_session
from certpilot.issuance import build_csr
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey
from certpilot.replacing import Item, Replacer, State
from certpilot.rollout import Outcome, Step
from certpilot.scope import Scope
from certpilot.settings import load_settings
from cli.main import app
from connectors.private_ca import PrivateCAIssuer

CA_NAME = "gate-ca"
ISSUER = f"private-ca/{CA_NAME}"
ACTOR = audit.Actor("test")
UTC = dt.timezone.utc

POLICY = """\
rules:
  wildcard: {allowed: false}
  san-denied: {patterns: ["*.forbidden.test"]}
"""


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _write_policy(home: Path, text: str = POLICY) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "policy.yaml"
    path.write_text(text)
    return path


def _issued_by_ca(engine: sa.Engine) -> int:
    """What the CA says it has issued (`certpilot ca list`)."""
    with read_session(engine) as session:
        [info] = [i for i in ca.list_cas(session) if i["name"] == CA_NAME]
        return int(info["issued"])


def _count(engine: sa.Engine, model: type, *where: Any) -> int:
    with read_session(engine) as session:
        return session.execute(sa.select(sa.func.count()).select_from(model).where(*where)).scalar_one()


def _leaves(engine: sa.Engine) -> int:
    return _count(engine, Certificate, Certificate.is_ca.is_(False))  # type: ignore[attr-defined]


def _add(engine: sa.Engine, name: str, *dns: str, owner: str = "platform") -> None:
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name=name, dns_names=dns, issuer=ISSUER, validity_days=30,
                                                 owner=owner), ACTOR)


@pytest.fixture
def authority(engine: sa.Engine) -> PrivateCAIssuer:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:9")
    return PrivateCAIssuer(engine, CA_NAME, _ring)


def test_a_renewal_the_policy_refuses_is_recorded_at_the_policy_step_and_the_ca_signs_nothing(
        engine: sa.Engine, authority: PrivateCAIssuer, certpilot_home: Path) -> None:
    policy_file = _write_policy(certpilot_home)
    _add(engine, "wild", "*.apps.gate.test")
    _add(engine, "hidden", "db.forbidden.test")
    with write_session(engine) as session:  # a legacy row from before owners were required
        session.add(ManagedCertificate(name="legacy", dns_names=["legacy.gate.test"], issuer=ISSUER, validity_days=30,
                                       created_at=dt.datetime.now(UTC)))
    keys = _count(engine, PrivateKey)

    reasons = {}
    for name in ("wild", "hidden", "legacy"):
        with pytest.raises(renewing.PermanentRenewalError) as caught:
            renewing.renew_one(engine, name, authority, _ring, ACTOR)  # the policy read from the home's file
        assert caught.value.step is renewing.Step.POLICY and caught.value.kept is None
        reasons[name] = caught.value.reason

    assert reasons["wild"] == ("policy refuses managed certificate 'wild': wildcard: wildcard name *.apps.gate.test; "
                               "policy allows no wildcard names")
    assert reasons["hidden"].startswith("policy refuses managed certificate 'hidden': san-denied: ")
    assert "db.forbidden.test" in reasons["hidden"]
    assert reasons["legacy"] == "policy refuses managed certificate 'legacy': owner-required: no owner"
    # Observed on the CA: nothing signed, nothing in the inventory, no key made for an order never placed.
    assert _issued_by_ca(engine) == 0 and _leaves(engine) == 0 and _count(engine, PrivateKey) == keys
    with read_session(engine) as session:
        assert managed.get(session, "legacy").last_error == "policy: " + reasons["legacy"]
        failed = session.exec(select(AuditEvent).where(AuditEvent.action == "renewal.failed")).all()
    assert sorted((e.object, json.loads(e.details)["step"]) for e in failed) == [
        ("managed:hidden", "policy"), ("managed:legacy", "policy"), ("managed:wild", "policy")]
    assert policy_file.exists()

    # A waiver of that rule for that certificate lets it through (and only it).
    now = dt.datetime.now(UTC)
    with write_session(engine) as session:
        violations.grant_waiver(session, "wildcard", "certificate=wild", "the ingress needs it until the split",
                                "ciso", now + dt.timedelta(hours=1), ACTOR)
    renewed = renewing.renew_one(engine, "wild", authority, _ring, ACTOR)
    assert _issued_by_ca(engine) == 1 and renewed.issuer == ISSUER
    with pytest.raises(renewing.PermanentRenewalError, match="'hidden': san-denied"):
        renewing.renew_one(engine, "hidden", authority, _ring, ACTOR)

    # Once the waiver has expired it stops applying: two hours on, the gate refuses again.
    later = now + dt.timedelta(hours=2)
    steps = renewing.DirectSteps(engine, lambda block: authority, _ring, ACTOR, clock=lambda: later)
    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew(steps, "wild")
    assert caught.value.step is renewing.Step.POLICY and "wildcard" in caught.value.reason
    assert caught.value.kept == renewed.fingerprint_sha256  # the certificate in service stays
    assert _issued_by_ca(engine) == 1


def test_the_policy_given_is_the_one_applied(engine: sa.Engine, authority: PrivateCAIssuer,
                                             certpilot_home: Path) -> None:
    """DirectSteps' policy (what the tasks and the CLI pass, read through blocks.policy) wins over the file."""
    from certpilot.policy import DEFAULT_POLICY, parse_policy

    _write_policy(certpilot_home)
    _add(engine, "wild", "*.apps.gate.test")
    renewed = renewing.renew_one(engine, "wild", authority, _ring, ACTOR, policy=DEFAULT_POLICY)
    assert renewed.fingerprint_sha256 and _issued_by_ca(engine) == 1
    strict = parse_policy("rules:\n  key-algorithm: {allowed: [ec-p384]}\n", "test:strict")
    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew_one(engine, "wild", authority, _ring, ACTOR, policy=strict)
    assert "key-algorithm: EC key on secp256r1 (ec-p256); policy allows ec-p384" in caught.value.reason
    assert _issued_by_ca(engine) == 1


# ------------------------------------------------------------------------------ revoke-and-replace

def _no_targets(steps: Sequence[Step]) -> list[Outcome | BaseException]:
    raise AssertionError("these managed certificates have no targets: nothing may be deployed")


@pytest.mark.parametrize("revoke_first", [False, True])
def test_a_replacement_the_policy_refuses_is_not_issued_and_the_old_one_not_revoked(
        engine: sa.Engine, authority: PrivateCAIssuer, certpilot_home: Path, revoke_first: bool) -> None:
    _add(engine, "api", "api.gate.test")
    _add(engine, "web", "web.gate.test")
    old = {n: renewing.renew_one(engine, n, authority, _ring, ACTOR).fingerprint_sha256 for n in ("api", "web")}
    issued, keys = _issued_by_ca(engine), _count(engine, PrivateKey)
    # The policy changes after they were issued: api's name is now denied.
    _write_policy(certpilot_home, "rules:\n  san-denied: {patterns: [api.gate.test]}\n")

    campaign = replacing.open_campaign(engine, Scope(names=("api",)), "key-compromise", revoke_first, ACTOR)
    replacer = Replacer(engine, lambda block: authority, _ring, ACTOR, _no_targets)
    [item] = campaign.items
    with pytest.raises(replacing.ReplacementFailed) as caught:
        replacing.advance(replacer, item.id)
    assert caught.value.step == "policy" and caught.value.revoked is False
    assert caught.value.reason.startswith("policy refuses managed certificate 'api': san-denied: ")
    failed = replacing.load_item(engine, item.id)
    assert failed.state is State.FAILED and failed.key_id is None and failed.new_fingerprint is None
    assert (failed.error or "").startswith("policy: policy refuses managed certificate 'api'")
    with read_session(engine) as session:
        row = session.get(Certificate, old["api"])
        assert row is not None and row.status == "active" and row.revoked_at is None  # not revoked, even first
    assert _issued_by_ca(engine) == issued and _count(engine, PrivateKey) == keys

    # The same campaign for a certificate the policy accepts goes through (the gate is per certificate).
    other = replacing.open_campaign(engine, Scope(names=("web",)), "key-compromise", revoke_first, ACTOR)
    done = replacing.run_campaign(engine, other, _one_by_one(replacer), 1, ACTOR)
    assert done.status == "done" and _issued_by_ca(engine) == issued + 1


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


# ------------------------------------------------------------------------------ ca issue from a CSR

def _csr_file(path: Path, key: object, names: list[str]) -> Path:
    path.write_bytes(build_csr(key, names).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ca_issue_refuses_a_csr_that_violates_the_policy_before_signing(
        engine: sa.Engine, authority: PrivateCAIssuer, certpilot_home: Path, tmp_path: Path,
        no_prefect_api: None) -> None:
    weak = _csr_file(tmp_path / "weak.pem", rsa.generate_private_key(65537, 1024), ["weak.gate.test"])
    good = _csr_file(tmp_path / "good.pem", ec.generate_private_key(ec.SECP256R1()), ["good.gate.test"])
    runner = CliRunner()

    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(weak), "--owner", "platform"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert (f"error: policy refuses the certificate requested by {weak} from CA {CA_NAME}: key-size: RSA key of "
            "1024 bits; policy requires at least 2048") in message
    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(good)])  # no owner, no ownership rule
    assert result.exit_code == 1 and "owner-required: no owner" in " ".join(result.stderr.split())
    assert _issued_by_ca(engine) == 0 and _leaves(engine) == 0  # the CA signed nothing

    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(good), "--owner", "platform", "--tag",
                                 "env=lab", "--json"])
    assert result.exit_code == 0, result.output
    issued = json.loads(result.stdout)
    with read_session(engine) as session:
        row = session.get(Certificate, issued["fingerprint_sha256"])
        assert row is not None and (row.owner, row.tags) == ("platform", {"env": "lab"})
    # The policy's ownership rules give the owner when --owner is not given.
    _write_policy(certpilot_home, POLICY + "ownership:\n  - match: {domain: gate.test}\n    owner: gate-team\n")
    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(good), "--json"])
    assert result.exit_code == 0, result.output
    with read_session(engine) as session:
        row = session.get(Certificate, json.loads(result.stdout)["fingerprint_sha256"])
        assert row is not None and row.owner == "gate-team"
    # A denied name is refused; a waiver of that rule for its domain lets it through.
    denied = _csr_file(tmp_path / "denied.pem", ec.generate_private_key(ec.SECP256R1()), ["db.forbidden.test"])
    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(denied), "--owner", "db-team"])
    assert result.exit_code == 1
    assert "san-denied: denied name db.forbidden.test" in " ".join(result.stderr.split())
    assert _issued_by_ca(engine) == 2
    with write_session(engine) as session:
        violations.grant_waiver(session, "san-denied", "domain=forbidden.test", "the old database", "ciso",
                                dt.datetime.now(UTC) + dt.timedelta(days=7), ACTOR)
    result = runner.invoke(app, ["ca", "issue", CA_NAME, "--csr", str(denied), "--owner", "db-team", "--json"])
    assert result.exit_code == 0, result.output
    assert _issued_by_ca(engine) == 3
