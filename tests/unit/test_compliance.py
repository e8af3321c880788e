"""The compliance report (certpilot.compliance) over a real inventory: certificates generated here, violations
stored by the policy's real evaluation, waivers granted (one expired, one revoked) through certpilot.violations,
renewals through certpilot.renewing by a flow run and at the CLI (M7, M2 per owner, as certpilot.sli counts
them); the CSV read back with the csv module; ``certpilot report compliance``."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from certpilot import audit, keystore, managed, renewing, sli, violations
from certpilot.clock import utcnow
from certpilot.compliance import CSV_COLUMNS, NO_OWNER, ComplianceReport, compliance_markdown, compliance_report
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidOptionError, TransientError
from certpilot.inventory import iso
from certpilot.policy import DEFAULT_POLICY, RULES
from certpilot.sample_estate import Authority, make_ca
from certpilot.settings import load_settings
from cli.main import app
from tests.sample_issuer import SampleIssuer
from tests.weak_certificates import DAY, Signer, add, resign_with_sha1

CLI = audit.Actor("cli:alice")
RUN = audit.Actor("prefect:renew-due", "6f1c1a52-0d8c-4b8e-9d1e-3f1f2a0b7c11")
WINDOW = dt.timedelta(days=30)


@pytest.fixture(scope="module")
def public_ca() -> Signer:
    return Signer.make("Test Public CA")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("Sample ACME CA")


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@dataclass(frozen=True)
class Estate:
    now: dt.datetime
    pay_legacy: str
    web_legacy: str
    unowned: str
    domain_waiver: int  # signature-algorithm for pay.example.com, waiving pay_legacy's
    web_waiver: int  # signature-algorithm for owner=web
    expired_waiver: int  # tags-required for owner=web, expired 5 days ago
    revoked_waiver: int


def renew(engine: sa.Engine, name: str, issuer: SampleIssuer, actor: audit.Actor, at: dt.datetime) -> Any:
    try:
        return renewing.renew_one(engine, name, issuer, ring, actor, clock=lambda: at, policy=DEFAULT_POLICY)
    except renewing.RenewalError as exc:
        return exc


@pytest.fixture
def estate(engine: sa.Engine, public_ca: Signer, authority: Authority) -> Estate:
    now = utcnow().replace(microsecond=0)
    rsa_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pay_legacy = add(engine, resign_with_sha1(public_ca.leaf(["legacy.pay.example.com"], now + 60 * DAY,
                                                             key=rsa_1024), public_ca), owner="payments")
    web_legacy = add(engine, resign_with_sha1(public_ca.leaf(["legacy.example.com"], now + 70 * DAY), public_ca),
                     owner="web")
    unowned = add(engine, public_ca.leaf(["printer.example.com"], now + 80 * DAY))
    with write_session(engine) as session:
        for name, owner in (("pay-a", "payments"), ("pay-b", "payments"), ("web-a", "web")):
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.example.com",),
                                                     issuer="acme-issuer/letsencrypt", owner=owner), CLI)
        expired = violations.grant_waiver(session, "tags-required", "owner=web", "no tags yet", "ciso",
                                          now - 5 * DAY, CLI, now=now - 20 * DAY)
    ok, broken = SampleIssuer(authority), SampleIssuer(authority, error=TransientError("CA busy (503)"))
    assert isinstance(renew(engine, "pay-a", ok, CLI, now - 40 * DAY), renewing.Renewal)  # before the window
    assert isinstance(renew(engine, "pay-a", ok, RUN, now - 3 * DAY), renewing.Renewal)
    assert isinstance(renew(engine, "pay-b", ok, RUN, now - 2 * DAY), renewing.Renewal)
    assert isinstance(renew(engine, "pay-a", ok, CLI, now - 1 * DAY), renewing.Renewal)
    assert isinstance(renew(engine, "pay-b", broken, RUN, now - dt.timedelta(hours=5)), renewing.RenewalError)
    assert isinstance(renew(engine, "web-a", ok, CLI, now - 1 * DAY), renewing.Renewal)
    with write_session(engine) as session:
        violations.evaluate_certificates(session, DEFAULT_POLICY, RUN, now=now)
        domain = violations.grant_waiver(session, "signature-algorithm", "domain=pay.example.com", "HSM migration",
                                         "ciso", now + 20 * DAY, CLI, now=now)
        web = violations.grant_waiver(session, "signature-algorithm", "owner=web", "vendor appliance", "cto",
                                      now + 10 * DAY, CLI, now=now)
        revoked = violations.grant_waiver(session, "owner-required", f"certificate={unowned[:16]}", "nobody",
                                          "cto", now + 10 * DAY, CLI, now=now)
        violations.revoke_waiver(session, revoked.id or 0, CLI, now=now)
    ids = [w.id for w in (domain, web, expired, revoked)]
    assert all(i is not None for i in ids)
    return Estate(now, pay_legacy, web_legacy, unowned, *[int(i or 0) for i in ids])


def report(engine: sa.Engine, now: dt.datetime, window: dt.timedelta = WINDOW) -> ComplianceReport:
    with read_session(engine) as session:
        return compliance_report(session, now, window)


def test_per_owner_certificates_violations_and_waivers(engine: sa.Engine, estate: Estate) -> None:
    found = report(engine, estate.now)
    assert [o.owner for o in found.owners] == ["payments", "web", NO_OWNER]
    payments, web, nobody = found.owners
    assert (payments.certificates, payments.managed, payments.compliant) == (3, 2, 2)  # pay-a's first is superseded
    assert [r.as_dict() for r in payments.rules] == [{"rule": "key-size", "open": 1, "waived": 0},
                                                     {"rule": "signature-algorithm", "open": 0, "waived": 1}]
    assert payments.compliant_percent == pytest.approx(200 / 3)
    assert [(w.id, w.waived, w.expired) for w in payments.waivers] == [(estate.domain_waiver, 1, False)]
    assert (web.certificates, web.managed, web.compliant, web.open_violations, web.waived_violations) == (2, 1, 2, 0, 1)
    # the active waiver names the owner and waives one; the expired one names it too (expired in the window)
    assert [(w.id, w.rule, w.waived, w.expired) for w in web.waivers] == [
        (estate.expired_waiver, "tags-required", 0, True), (estate.web_waiver, "signature-algorithm", 1, False)]
    expired = web.waivers[0]
    assert expired.days_left == pytest.approx(-5) and expired.expires_at == estate.now - 5 * DAY
    assert (nobody.certificates, nobody.compliant) == (1, 0)
    assert [r.as_dict() for r in nobody.rules] == [{"rule": "owner-required", "open": 1, "waived": 0}]
    assert nobody.waivers == ()  # its waiver was revoked
    assert {w.id for w in found.waivers} == {estate.domain_waiver, estate.web_waiver, estate.expired_waiver}
    # a narrower window leaves the waiver that expired 5 days ago out
    assert estate.expired_waiver not in {w.id for w in report(engine, estate.now, dt.timedelta(days=3)).waivers}


def test_automated_share_and_renewal_success_per_owner(engine: sa.Engine, estate: Estate) -> None:
    found = report(engine, estate.now)
    payments, web, nobody = (found.owner("payments"), found.owner("web"), found.owner(None))
    # payments: pay-a by a flow run and at the CLI, pay-b by a flow run, pay-b failed; the renewal 40 days ago is out
    assert (payments.automated.numerator, payments.automated.denominator) == (2, 3)
    assert payments.automated.value == pytest.approx(200 / 3) and payments.automated.detail("manual") == 1
    assert (payments.renewals.value, payments.renewals.ratio, payments.renewals.detail("failed")) == (75.0, "3 of 4", 1)
    assert (web.automated.value, web.automated.ratio) == (0.0, "0 of 1")
    assert (web.renewals.value, web.renewals.ratio) == (100.0, "1 of 1")
    assert nobody.automated.value is None and nobody.automated.reason == "no managed certificate was issued in the window"
    assert nobody.renewals.value is None and nobody.renewals.reason == "no renewal was attempted in the window"
    # the owners' renewals add up to the fleet's M2 and M7, by the same definitions
    with read_session(engine) as session:
        fleet = sli.compute(session, WINDOW, estate.now)
    for key, per_owner in (("M2", [o.renewals for o in found.owners]), ("M7", [o.automated for o in found.owners])):
        assert sum(s.numerator or 0 for s in per_owner) == fleet.get(key).numerator
        assert sum(s.denominator or 0 for s in per_owner) == fleet.get(key).denominator
        assert {s.definition for s in per_owner} == {fleet.get(key).definition}


def test_the_csv_reads_back_one_row_per_owner(engine: sa.Engine, estate: Estate) -> None:
    text = report(engine, estate.now).to_csv()
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == list(CSV_COLUMNS)
    rows = {row["owner"]: row for row in reader}
    assert list(rows) == ["payments", "web", NO_OWNER]
    payments = rows["payments"]
    assert {k: payments[k] for k in ("certificates", "managed", "compliant", "compliant_percent", "open_violations",
                                      "waived_violations", "open:key-size", "waived:signature-algorithm",
                                      "open:owner-required", "active_waivers", "expired_waivers",
                                      "next_waiver_expiry", "automated_percent", "automated_renewals",
                                      "issued_renewals", "renewal_success_percent", "renewals_succeeded",
                                      "renewals_failed")} == {
        "certificates": "3", "managed": "2", "compliant": "2", "compliant_percent": "66.7", "open_violations": "1",
        "waived_violations": "1", "open:key-size": "1", "waived:signature-algorithm": "1", "open:owner-required": "0",
        "active_waivers": "1", "expired_waivers": "0", "next_waiver_expiry": iso(estate.now + 20 * DAY),
        "automated_percent": "66.7", "automated_renewals": "2", "issued_renewals": "3",
        "renewal_success_percent": "75.0", "renewals_succeeded": "3", "renewals_failed": "1"}
    assert (rows["web"]["active_waivers"], rows["web"]["expired_waivers"]) == ("1", "1")
    nobody = rows[NO_OWNER]
    assert (nobody["automated_percent"], nobody["renewal_success_percent"], nobody["open:owner-required"]) == (
        "", "", "1")
    assert all(nobody[f"open:{rule}"] == "0" for rule in RULES if rule != "owner-required")


def test_the_markdown_escapes_what_it_shows(engine: sa.Engine, public_ca: Signer) -> None:
    now = utcnow()
    add(engine, public_ca.leaf(["odd.example.com"], now + 60 * DAY), owner="ops|<b>x</b>")
    with write_session(engine) as session:
        violations.evaluate_certificates(session, DEFAULT_POLICY, RUN, now=now)
    markdown = compliance_markdown(report(engine, now))
    assert "ops\\|&lt;b&gt;x&lt;/b&gt;" in markdown and "<b>" not in markdown
    assert "| ops\\|&lt;b&gt;x&lt;/b&gt; | 1 | 0 | 1 (100 %) | none | none | none | no data | no data |" in markdown
    assert "No waiver active or expired in the window." in markdown


def test_a_window_must_be_positive(engine: sa.Engine) -> None:
    with read_session(engine) as session, pytest.raises(InvalidOptionError, match="window"):
        compliance_report(session, utcnow(), dt.timedelta(0))


# ------------------------------------------------------------------------------------ the CLI

def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_cli_report_compliance_json_and_text(estate: Estate) -> None:
    result = cli("report", "compliance", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    owners = {o["owner"]: o for o in got["owners"]}
    assert list(owners) == ["payments", "web", NO_OWNER] and got["window_seconds"] == 30 * 86400
    assert owners["payments"]["violations"] == [{"rule": "key-size", "open": 1, "waived": 0},
                                                {"rule": "signature-algorithm", "open": 0, "waived": 1}]
    assert owners["payments"]["renewal_success"]["numerator"] == 3
    assert owners["web"]["automated_renewals"]["value"] == 0.0
    assert [w["id"] for w in owners["web"]["waivers"]] == [estate.expired_waiver, estate.web_waiver]
    text = cli("report", "compliance")
    assert text.exit_code == 0, text.output
    assert "payments" in text.stdout and "key-size: 1" in text.stdout and "75.0 % (3 of 4)" in text.stdout
    narrow = json.loads(cli("report", "compliance", "--window", "36h", "--json").stdout)
    assert next(o for o in narrow["owners"] if o["owner"] == "payments")["renewal_success"]["denominator"] == 2


def test_cli_report_compliance_csv(estate: Estate, tmp_path: Path) -> None:
    result = cli("report", "compliance", "--csv")
    assert result.exit_code == 0, result.output
    assert [row["owner"] for row in csv.DictReader(io.StringIO(result.stdout))] == ["payments", "web", NO_OWNER]
    target = tmp_path / "compliance.csv"
    written = cli("report", "compliance", "--csv", str(target))
    assert written.exit_code == 0, written.output
    assert f"wrote 3 owners to {target}" in written.stderr
    assert list(csv.DictReader(target.open()))[0]["open:key-size"] == "1"
    again = cli("report", "compliance", "--csv", str(target))
    assert again.exit_code == 1 and "exists: refusing to overwrite it (add --force" in again.stderr
    assert cli("report", "compliance", "--csv", str(target), "--force").exit_code == 0


@pytest.mark.parametrize("args", [("--csv", "--json"), ("out.csv",), ("--window", "0d"), ("--window", "soon")])
def test_cli_report_compliance_refuses_bad_usage(engine: sa.Engine, args: tuple[str, ...]) -> None:
    result = cli("report", "compliance", *args)
    assert result.exit_code == 2, result.output
