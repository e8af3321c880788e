"""Risk scores (certpilot.risk) over a real inventory: certificates generated here and seen at places as
discovery records them, violations stored by the policy's real evaluation (certpilot.violations), a waiver
granted through it, a managed certificate renewed through certpilot.renewing and served by a verified
target; and ``certpilot report risk``. Each expected score is the sum of the weights its reasons name."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from certpilot import audit, keystore, managed, renewing, risk, targets, violations
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.models import Location
from certpilot.policy import Policy, facts_of_certificate, parse_policy
from certpilot.risk import (EXPIRED_POINTS, EXPOSURE_CAP, PRIVATE_ENDPOINT_POINTS, PUBLIC_ENDPOINT_POINTS,
                            UNMANAGED_POINTS, VIOLATION_POINTS, WEAK_KEY_POINTS, WEAK_SIGNATURE_POINTS, Exposure,
                            RiskReport, risk_markdown, risk_report)
from certpilot.sample_estate import Authority, make_ca
from certpilot.settings import load_settings
from cli.main import app
from tests.sample_issuer import SampleIssuer
from tests.weak_certificates import DAY, Signer, add, resign_with_sha1

RUN = audit.Actor("prefect:renew-due", "6f1c1a52-0d8c-4b8e-9d1e-3f1f2a0b7c11")
CLI = audit.Actor("cli:alice")
POLICY_TEXT = 'issuers:\n  private: ["CN=Lab Internal CA,*"]\n'
GLOBAL_IP = "93.184.215.14"  # a global address (no connection is made: it is only a locator)


@pytest.fixture(scope="module")
def public_ca() -> Signer:
    return Signer.make("Test Public CA")


@pytest.fixture(scope="module")
def lab_ca() -> Signer:
    return Signer.make("Lab Internal CA")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("Sample ACME CA")


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY_TEXT, "risk-policy.yaml")


@dataclass(frozen=True)
class Estate:
    now: dt.datetime
    www: str  # public, RSA-1024, expired 3 days ago, at two public places
    intranet: str  # private, SHA-1, 5 days left, one public and two private places (and a ghost)
    waived: str  # public, RSA-1024 whose key-size violation is waived
    api: str  # public, clean, unmanaged
    shop: str  # managed, served by a verified target


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def estate(engine: sa.Engine, policy: Policy, public_ca: Signer, lab_ca: Signer, authority: Authority) -> Estate:
    now = utcnow().replace(microsecond=0)
    rsa_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    www = add(engine, public_ca.leaf(["www.example.com"], now - 3 * DAY, key=rsa_1024), owner="web",
              locators=["tls://www.example.com:443", f"tls://{GLOBAL_IP}:443?sni=www.example.com"], now=now)
    intranet = add(engine, resign_with_sha1(lab_ca.leaf(["intranet.corp.example"], now + 5 * DAY), lab_ca),
                   owner="it", now=now,
                   locators=["tls://intranet.corp.example:443", "tls://10.1.2.3:8443", f"tls://{GLOBAL_IP}:8443",
                             "tls://old-intranet.corp.example:443", "ssh://files.corp.example/etc/ssl/intranet.pem"])
    waived = add(engine, public_ca.leaf(["legacy.example.com"], now + 200 * DAY, key=rsa_1024, days=180),
                 owner="web", now=now)
    api = add(engine, public_ca.leaf(["api.example.com"], now + 45 * DAY), owner="api", now=now)
    with write_session(engine) as session:  # discovery stopped seeing it there: a ghost
        session.execute(sa.update(Location).where(Location.locator == "tls://old-intranet.corp.example:443")
                        .values(ghost=True))
        managed.add(session, managed.ManagedSpec(name="shop", dns_names=("shop.example.com",),
                                                 issuer="acme-issuer/letsencrypt", owner="shop"), CLI)
    shop = renewing.renew_one(engine, "shop", SampleIssuer(authority), ring, RUN, policy=policy).fingerprint_sha256
    with write_session(engine) as session:
        target = targets.add(session, "shop", "nginx-1", "ssh-nginx", "ssh-host/web-1",
                             {"certificate_path": "/etc/ssl/shop.pem", "key_path": "/etc/ssl/shop.key"}, RUN)
        targets.set_desired(session, target, shop, RUN)
        targets.record_verified(session, target, shop, "tls", RUN)
        violations.evaluate_certificates(session, policy, RUN, now=now)
        violations.grant_waiver(session, "key-size", f"certificate={waived[:16]}", "replaced in Q3", "ciso",
                                now + 90 * DAY, CLI, now=now)
    return Estate(now, www, intranet, waived, api, shop)


def report(engine: sa.Engine, policy: Policy, now: dt.datetime, limit: int = 50) -> RiskReport:
    with read_session(engine) as session:
        return risk_report(session, policy, now, limit)


def test_the_riskiest_first_each_score_with_its_reasons(engine: sa.Engine, policy: Policy, estate: Estate) -> None:
    found = report(engine, policy, estate.now)
    assert found.scored == 5 and found.policy == "risk-policy.yaml"
    by_fp = {r.fingerprint_sha256: r for r in found.risks}
    assert [r.fingerprint_sha256 for r in found.risks] == [estate.www, estate.intranet, estate.waived, estate.api,
                                                          estate.shop]

    www = by_fp[estate.www]
    assert www.reasons == (
        f"expired 3.0 days ago: +{EXPIRED_POINTS}",
        f"served at 2 public endpoints: +{2 * PUBLIC_ENDPOINT_POINTS}",
        f"weak key: RSA key of 1024 bits, under 2048: +{WEAK_KEY_POINTS}",
        f"violates expired (critical), key-size (high): +{VIOLATION_POINTS['critical'] + VIOLATION_POINTS['high']}",
        f"unmanaged: nothing renews it: +{UNMANAGED_POINTS}")
    assert www.score == 100  # 40 + 12 + 25 + 30 + 10 = 117, at most 100
    assert (www.name, www.owner, www.public, www.key, www.violations) == (
        "www.example.com", "web", True, "RSA-1024", ("expired", "key-size"))

    intranet = by_fp[estate.intranet]  # private: only the global address counts as public; the ghost and ssh not
    assert intranet.exposure == Exposure(public=1, private=2) and not intranet.public
    assert intranet.reasons == (
        "expires within 7 days (5.0 left): +30",
        f"served at 1 public endpoint and 2 private endpoints: "
        f"+{PUBLIC_ENDPOINT_POINTS + 2 * PRIVATE_ENDPOINT_POINTS}",
        "weak signature: signed with sha1WithRSAEncryption: SHA-1 collisions are practical (SHAttered, 2017): "
        f"+{WEAK_SIGNATURE_POINTS}",
        "violates expiring (high), signature-algorithm (high): +20",
        f"unmanaged: nothing renews it: +{UNMANAGED_POINTS}")
    assert intranet.score == 30 + 10 + 20 + 20 + 10

    waived = by_fp[estate.waived]  # its key-size violation is waived: the weak key counts, the rule does not
    assert waived.reasons == (f"weak key: RSA key of 1024 bits, under 2048: +{WEAK_KEY_POINTS}",
                              f"unmanaged: nothing renews it: +{UNMANAGED_POINTS}")
    assert waived.score == 35 and waived.violations == ()
    assert by_fp[estate.api].reasons == (f"unmanaged: nothing renews it: +{UNMANAGED_POINTS}",)
    shop = by_fp[estate.shop]  # managed, publicly trusted, served by one verified target
    assert (shop.name, shop.managed, shop.score, shop.reasons) == (
        "shop", True, PUBLIC_ENDPOINT_POINTS, (f"served at 1 public endpoint: +{PUBLIC_ENDPOINT_POINTS}",))
    assert found.distribution == {"75-100": 2, "50-74": 0, "25-49": 1, "1-24": 2, "0": 0}


def test_the_limit_lists_fewer_but_scores_all(engine: sa.Engine, policy: Policy, estate: Estate) -> None:
    two = report(engine, policy, estate.now, limit=2)
    assert [r.fingerprint_sha256 for r in two.risks] == [estate.www, estate.intranet]
    assert two.scored == 5 and two.distribution["1-24"] == 2
    assert report(engine, policy, estate.now, limit=0).risks == ()
    with pytest.raises(ValueError, match="limit must be 0 or more"):
        report(engine, policy, estate.now, limit=-1)


def test_time_moves_the_score(engine: sa.Engine, policy: Policy, estate: Estate) -> None:
    later = report(engine, policy, estate.now + 40 * DAY)  # api.example.com has 5 days left then
    api = next(r for r in later.risks if r.fingerprint_sha256 == estate.api)
    assert api.reasons[0] == "expires within 7 days (5.0 left): +30"


def test_exposure_is_capped_and_says_so(public_ca: Signer) -> None:
    now = utcnow()
    facts = facts_of_certificate(public_ca.leaf(["cdn.example.com"], now + 200 * DAY, days=180), owner="cdn",
                                 public=True, managed=True)
    points, reasons = risk.score(facts, Exposure(public=5, private=1), [], now)
    assert points == EXPOSURE_CAP
    assert reasons == (f"served at 5 public endpoints and 1 private endpoint (capped at {EXPOSURE_CAP}): "
                       f"+{EXPOSURE_CAP}",)
    assert risk.score(facts, Exposure(0, 0), [], now) == (0, ())


def test_public_addresses() -> None:
    assert risk.is_public_address(f"tls://{GLOBAL_IP}:443?sni=www.example.com")
    assert risk.is_public_address("tls://[2606:2800:220:1:248:1893:25c8:1946]:443")
    for private in ("tls://10.0.0.5:443", "tls://127.0.0.1:8443", "tls://[::1]:443", "tls://192.168.1.2:443",
                    "tls://www.example.com:443", "ssh://8.8.8.8/etc/x.pem"):
        assert not risk.is_public_address(private), private


def test_the_markdown_escapes_what_it_shows(engine: sa.Engine, policy: Policy, public_ca: Signer) -> None:
    now = utcnow()
    add(engine, public_ca.leaf(["odd.example.com"], now + 3 * DAY), owner="ops|<i>x</i>")
    markdown = risk_markdown(report(engine, policy, now))
    assert "ops\\|&lt;i&gt;x&lt;/i&gt;" in markdown and "<i>" not in markdown
    assert "| 75-100 | 50-74 | 25-49 | 1-24 | 0 |" in markdown
    assert "expires within 7 days" in markdown and "odd.example.com" in markdown


# ------------------------------------------------------------------------------------ the CLI

def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", "CERTPILOT_POLICY": ""})


def test_cli_report_risk_json(engine: sa.Engine, estate: Estate, certpilot_home: Path) -> None:
    (certpilot_home / "policy.yaml").write_text(POLICY_TEXT)  # the policy in force: $CERTPILOT_HOME/policy.yaml
    result = cli("report", "risk", "--limit", "2", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["scored"] == 5 and got["policy"].endswith("policy.yaml")
    assert [c["fingerprint_sha256"] for c in got["certificates"]] == [estate.www, estate.intranet]
    first = got["certificates"][0]
    assert first["score"] == 100 and first["reasons"][0].startswith("expired ")
    assert first["endpoints"] == {"public": 2, "private": 0}
    assert got["weights"]["unmanaged"] == UNMANAGED_POINTS
    text = cli("report", "risk")
    assert text.exit_code == 0, text.output
    assert "www.example.com" in text.stdout and "75-100: 2" in text.stdout


def test_cli_report_risk_refuses_a_bad_policy_file(engine: sa.Engine, certpilot_home: Path) -> None:
    certpilot_home.mkdir(parents=True, exist_ok=True)
    (certpilot_home / "policy.yaml").write_text("rules:\n  key-size: {rsa: many}\n")
    result = cli("report", "risk", "--json")
    assert result.exit_code == 1
    assert "policy.yaml" in json.loads(result.stdout)["error"]
