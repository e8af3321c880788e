"""The blast radius of a revoke-and-replace: the CA budget per issuer and registered domain against published
limits, the artifact's rows, its truncation, and what revoking first costs."""

from __future__ import annotations

import datetime as dt
import json

from certpilot import rate_limits
from certpilot.blast_radius import ROWS_SHOWN, BlastRadius
from certpilot.rate_limits import LETS_ENCRYPT, RateLimits, limits_for, registered_domain
from certpilot.scope import Action, InScope, LocationView, Scope, TargetView

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
LE = "acme-issuer/le"
CORP = "private-ca/corp"


def fingerprint(n: int) -> str:
    return f"{n:016x}" * 4


def item(n: int, names: tuple[str, ...], action: Action = Action.REPLACE, *, issuer: str | None = LE,
         status: str = "active", targets: tuple[TargetView, ...] = (), locations: tuple[LocationView, ...] = (),
         managed: str | None = None, why: str = "current certificate") -> InScope:
    fp = fingerprint(n)
    return InScope(fp, f"CN={names[0]}", f"{n:040x}", "CN=Issuing CA", issuer, status, NOW + dt.timedelta(days=30),
                   managed if managed is not None else (f"m{n}" if issuer else None), action is Action.REPLACE,
                   "payments", {}, names, "ab" * 32, targets, locations, action, why)


def test_rate_limits_and_registered_domains() -> None:
    assert limits_for("https://acme-v02.api.letsencrypt.org/directory") is LETS_ENCRYPT
    assert limits_for("https://acme-staging-v02.api.letsencrypt.org/directory") is rate_limits.LETS_ENCRYPT_STAGING
    assert limits_for("https://127.0.0.1:14000/dir") is None and limits_for(None) is None
    assert (LETS_ENCRYPT.new_orders_per_account_per_3h, LETS_ENCRYPT.certificates_per_registered_domain_per_week,
            LETS_ENCRYPT.duplicate_certificates_per_week) == (300, 50, 5)
    assert registered_domain("new.blog.Example.co.uk.") == "example.co.uk"
    assert registered_domain("*.shop.example.com") == "example.com"
    assert registered_domain("www.example.com.au") == "example.com.au"
    assert registered_domain("example.org") == "example.org"
    assert registered_domain("2001:DB8::1") == "2001:db8::1" and registered_domain("192.0.2.7") == "192.0.2.7"


def test_budget_per_issuer_and_registered_domain_names_each_exceeded_limit() -> None:
    items = [item(i, (f"shop{i}.example.co.uk", f"www.shop{i}.example.co.uk")) for i in range(55)]
    items += [item(100 + i, ("dup.example.net",)) for i in range(6)]
    items += [item(200, ("api.example.com",), status="revoked")]  # a revoked current one: no second revocation
    items += [item(300, ("old.example.com",), Action.REVOKE)]
    items += [item(400 + i, (f"h{i}.corp.test",), issuer=CORP) for i in range(3)]
    items += [item(500, ("x.example.com",), Action.CANNOT, issuer=None), item(501, ("y.example.com",), Action.NOTHING)]
    radius = BlastRadius.of(Scope(domain_suffix="example.co.uk"), items, {LE: LETS_ENCRYPT, CORP: None})
    assert radius.counts == {"replace": 65, "revoke": 1, "cannot": 1, "nothing": 1}
    budget = {b.issuer: b for b in radius.budget}
    le, corp = budget[LE], budget[CORP]
    assert (le.orders, le.revocations) == (62, 62)  # 62 replacements, one of them revoked already, plus one revoke
    assert le.by_registered_domain == {"example.co.uk": 55, "example.com": 1, "example.net": 6}
    assert le.exceeded == (
        "registered domain example.co.uk: 55 new certificates, more than Let's Encrypt's 50 per registered domain "
        "per week",
        "6 certificates for the same names dup.example.net, more than Let's Encrypt's 5 duplicate certificates per week")
    assert (corp.orders, corp.revocations, corp.limits, corp.exceeded) == (3, 3, None, ())
    assert radius.exceeded == [f"{LE}: {reason}" for reason in le.exceeded]
    assert "2 CA rate limit(s) exceeded" in radius.summary()
    tiny = BlastRadius.of(Scope(owner="payments"), items[:3], {LE: RateLimits("Tiny CA", 2, None, None)})
    assert tiny.budget[0].exceeded == ("3 new orders, more than Tiny CA's 2 per account per 3 hours",)
    markdown = radius.markdown()
    assert "example.co.uk: 55" in markdown and "more than Let's Encrypt's 50 per registered domain" in markdown
    assert "Let's Encrypt: 300 orders/3 h, 50 per registered domain/week, 5 duplicates/week" in markdown
    assert json.loads(json.dumps(radius.as_dict()))["budget"][0]["exceeded"] == list(le.exceeded)


def test_the_artifact_lists_each_certificate_with_owner_targets_locations_action_and_why() -> None:
    seen = LocationView("tls://10.0.0.5:443?sni=shop.example.com", "tls-scan:lab", NOW, False)
    gone = LocationView("ssh://old-web/etc/ssl/shop.pem", "ssh:old-web", NOW - dt.timedelta(days=40), True)
    nginx = TargetView("nginx-1", "ssh-nginx", fingerprint(1), fingerprint(1))
    items = [item(1, ("shop.example.com",), targets=(nginx,), locations=(seen, gone), managed="shop"),
             item(2, ("legacy.example.com",), Action.CANNOT, issuer=None,
                  why="unmanaged: adopt it | first: certpilot managed adopt ..."),
             item(3, ("old-shop.example.com",), Action.REVOKE, targets=(TargetView("haproxy-1", "ssh-haproxy", None,
                                                                                 fingerprint(3)),), managed="shop",
                  why="superseded")]
    radius = BlastRadius.of(Scope(names=("shop",), domain_suffix="example.com"), items, {LE: None})
    lines = radius.markdown().splitlines()
    assert lines[0] == "# Blast radius: name=shop suffix=example.com"
    assert lines[2].startswith("**3 certificate(s) in scope: 1 to replace, 1 to revoke only, 1 that cannot be handled")
    rows = [line for line in lines if line.startswith(f"| shop | `{1:016x}`")]
    assert rows == [f"| shop | `{1:016x}` | `{1:040x}` | payments | nginx-1 (ssh-nginx) | "
                    "tls://10.0.0.5:443?sni=shop.example.com, ssh://old-web/etc/ssl/shop.pem (ghost) | 2026-07-01 | "
                    "**replace** | current certificate |"]
    cannot = next(line for line in lines if line.startswith("| legacy.example.com"))
    assert r"adopt it \| first" in cannot and cannot.count(" | ") == 8  # a | in a cell does not split it
    # Replace first: only the revoke-only certificate's target that holds it would serve a revoked certificate.
    assert radius.exposed_while_revoked() == [(items[2], ["target haproxy-1 (ssh-haproxy)"])]
    assert "Replace first" in radius.markdown()
    first = BlastRadius.of(radius.scope, items, {LE: None}, revoke_first=True)
    cost = first.markdown()
    assert "clients that check revocation" in cost and "fail their handshakes" in cost
    assert (f"| shop `{1:016x}` | replace | target nginx-1 (ssh-nginx), tls://10.0.0.5:443?sni=shop.example.com |"
            in cost.splitlines())  # the ghost location is not served any more
    assert any(line.startswith("revoked while served: shop") for line in first.lines())


def test_the_table_is_capped_and_says_how_many_are_left_out() -> None:
    items = [item(i, (f"h{i}.example.com",), Action.CANNOT, issuer=None) for i in range(ROWS_SHOWN + 20)]
    radius = BlastRadius.of(Scope(domain_suffix="example.com"), items, {})
    lines = radius.markdown().splitlines()
    assert sum(1 for line in lines if line.startswith("| h")) == ROWS_SHOWN
    assert any("20 more certificate(s) in scope are not listed" in line for line in lines)
    assert radius.lines()[ROWS_SHOWN + 1] == "... and 20 more certificate(s) not listed"
    assert len(radius.as_dict()["items"]) == ROWS_SHOWN + 20  # the JSON keeps them all
    assert "_No issuer would be asked for anything._" in radius.markdown()
