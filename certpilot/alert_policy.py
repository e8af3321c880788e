"""The alert policy: who is told about what, through which Prefect notification blocks; the expiry
bands; when the daily digest goes out. YAML, stored in the AlertPolicy table (the newest row rules),
so every machine that runs certpilot routes the same way.

```yaml
routes:                                # the first route that matches an alert takes it
  - match: {owner: payments}           # owner, tag ("k=v"), or both (both must match)
    notify: [custom-webhook/payments]  # CRITICAL alerts, resolutions, and the owner's daily digest
    page: [pager-duty-webhook/payments]  # PAGE alerts (none: they go to notify)
  - match: {tag: "env=staging"}
    notify: [email-notification/staging-team]
default:                               # everything no route takes
  notify: [custom-webhook/ops]
  page: []
bands: {critical_days: 7, warning_days: 30}
digest: {at: "08:00"}                  # UTC; TICKET alerts go to their owner's digest once a day
```

Channels are notification block documents, ``<block-type-slug>/<block-name>`` (custom-webhook,
slack-webhook, microsoft-teams-webhook, pager-duty-webhook, email-notification...), configured in the
Prefect UI. A suppressions file has the same line-numbered validation:

```yaml
suppressions:
  - scope: owner=payments,condition=expiring
    start: 2030-01-01T00:00:00Z        # optional: from now
    end: 2030-01-02T06:00:00Z
    reason: planned migration of the payment gateways
```

A malformed policy or suppressions file is refused with a PolicyFileError naming the file, the line
and the problem. No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml
from sqlmodel import Session, col, select

from certpilot import audit
from certpilot.alerts import Bands, Severity, parse_scope
from certpilot.errors import InvalidOptionError
from certpilot.models import AlertPolicy
from certpilot.yaml_file import PolicyFileError, YamlReader, line_of

__all__ = ["DEFAULT_POLICY", "Policy", "PolicyFileError", "Route", "StoredPolicy", "SuppressionSpec", "current_policy",
           "load_policy", "parse_policy", "parse_suppressions", "stored_policy"]

_BLOCK = re.compile(r"^[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Route:
    """Where an owner's (or a tag's) alerts go. ``owner``/``tag`` None: any."""

    notify: tuple[str, ...] = ()
    page: tuple[str, ...] = ()
    owner: str | None = None
    tag: tuple[str, str] | None = None

    def matches(self, owner: str | None, tags: Mapping[str, str]) -> bool:
        if self.owner is not None and owner != self.owner:
            return False
        return self.tag is None or tags.get(self.tag[0]) == self.tag[1]

    def channels(self, severity: Severity) -> tuple[str, ...]:
        """The blocks told at once about an alert of ``severity``: PAGE the page channels (or the notify
        ones when none), CRITICAL the notify channels, TICKET none (it waits for the daily digest)."""
        if severity == Severity.PAGE:
            return self.page or self.notify
        return self.notify if severity == Severity.CRITICAL else ()


@dataclass(frozen=True)
class Policy:
    routes: tuple[Route, ...] = ()
    default: Route = Route()
    bands: Bands = Bands()
    digest_at: dt.time = dt.time(8, 0)
    sha256: str | None = None  # of the text it was parsed from; None for the built-in default

    def route(self, owner: str | None, tags: Mapping[str, str]) -> Route:
        """The first route matching the owner and tags, else the default route."""
        return next((r for r in self.routes if r.matches(owner, tags)), self.default)

    def channels(self) -> tuple[str, ...]:
        """Every block the policy names, each once."""
        names: dict[str, None] = {}
        for route in (*self.routes, self.default):
            names.update(dict.fromkeys(route.notify + route.page))
        return tuple(names)


DEFAULT_POLICY = Policy()  # before any policy is loaded: nowhere to send, which deliveries record


# ------------------------------------------------------------------------------------------ parsing

class _Reader(YamlReader):
    """The shared line-numbered reader, plus notification block references."""

    def blocks(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        names = []
        for item in self.sequence(node, what):
            name = self.text(item, f"each of {what}")
            if not _BLOCK.match(name):
                raise self.fail(item, f"{name!r} in {what} is not a notification block reference: use "
                                      "<block-type-slug>/<block-name>, e.g. custom-webhook/ops")
            names.append(name)
        return tuple(names)


def _route(reader: _Reader, node: yaml.Node, what: str, with_match: bool) -> Route:
    keys = ("match", "notify", "page") if with_match else ("notify", "page")
    found = reader.mapping(node, what, keys, required=("match", "notify") if with_match else ("notify",))
    notify = reader.blocks(found["notify"][1], f"{what}'s notify")
    page = reader.blocks(found["page"][1], f"{what}'s page") if "page" in found else ()
    if not with_match:
        return Route(notify, page)
    match_node = found["match"][1]
    match = reader.mapping(match_node, f"{what}'s match", ("owner", "tag"))
    if not match:
        raise reader.fail(match_node, f"{what}'s match needs an owner or a tag")
    owner = reader.text(match["owner"][1], "owner") if "owner" in match else None
    tag = None
    if "tag" in match:
        text = reader.text(match["tag"][1], "tag")
        key, sep, value = text.partition("=")
        if not (key.strip() and sep):
            raise reader.fail(match["tag"][1], f"tag {text!r} must be key=value, e.g. env=prod")
        tag = (key.strip(), value.strip())
    if not notify and not page:
        raise reader.fail(node, f"{what} sends nowhere: give notify (and page) blocks")
    return Route(notify, page, owner, tag)


def parse_policy(text: str, source: str = "policy") -> Policy:
    """The policy ``text`` describes; PolicyFileError naming the line and the problem otherwise."""
    reader = _Reader(source)
    root = reader.document(text)
    found = reader.mapping(root, "the policy", ("routes", "default", "bands", "digest"), required=("default",))
    items = reader.sequence(found["routes"][1], "routes") if "routes" in found else []
    routes = tuple(_route(reader, item, f"route {index + 1}", True) for index, item in enumerate(items))
    default = _route(reader, found["default"][1], "default", False)
    bands = Bands()
    if "bands" in found:
        node = found["bands"][1]
        band = reader.mapping(node, "bands", ("critical_days", "warning_days"))
        critical = reader.number(band["critical_days"][1], "critical_days") if "critical_days" in band else 7.0
        warning = reader.number(band["warning_days"][1], "warning_days") if "warning_days" in band else 30.0
        if critical >= warning:
            raise reader.fail(node, f"critical_days ({critical:g}) must be fewer than warning_days ({warning:g})")
        bands = Bands(critical, warning)
    digest_at = dt.time(8, 0)
    if "digest" in found:
        digest = reader.mapping(found["digest"][1], "digest", ("at",), required=("at",))
        node = digest["at"][1]
        clock = _CLOCK.match(reader.text(node, "digest's at"))
        if clock is None:
            raise reader.fail(node, f"digest's at {node.value!r} must be a UTC time of day as HH:MM, e.g. \"08:00\"")
        digest_at = dt.time(int(clock.group(1)), int(clock.group(2)))
    return Policy(routes, default, bands, digest_at, hashlib.sha256(text.encode()).hexdigest())


@dataclass(frozen=True)
class SuppressionSpec:
    scope: str
    ends_at: dt.datetime
    reason: str
    starts_at: dt.datetime | None = None  # None: from when it is loaded
    line: int = 0


def parse_suppressions(text: str, source: str = "suppressions") -> list[SuppressionSpec]:
    """The suppression windows a suppressions file gives; PolicyFileError naming the line otherwise."""
    reader = _Reader(source)
    root = reader.document(text)
    found = reader.mapping(root, "the file", ("suppressions",), required=("suppressions",))
    specs = []
    for index, item in enumerate(reader.sequence(found["suppressions"][1], "suppressions")):
        what = f"suppression {index + 1}"
        entry = reader.mapping(item, what, ("scope", "start", "end", "reason"), required=("scope", "end", "reason"))
        scope_node = entry["scope"][1]
        scope = reader.text(scope_node, f"{what}'s scope")
        try:
            parse_scope(scope)
        except InvalidOptionError as exc:
            raise reader.fail(scope_node, str(exc)) from None
        start = reader.when(entry["start"][1], f"{what}'s start") if "start" in entry else None
        end = reader.when(entry["end"][1], f"{what}'s end")
        if start is not None and end <= start:
            raise reader.fail(entry["end"][1], f"{what} ends before it starts")
        specs.append(SuppressionSpec(scope, end, reader.text(entry["reason"][1], f"{what}'s reason"), start,
                                     line_of(item)))
    return specs


# ------------------------------------------------------------------------------------------ storage

@dataclass(frozen=True)
class StoredPolicy:
    id: int | None
    policy: Policy
    text: str | None
    loaded_by: str | None
    loaded_at: dt.datetime | None
    problem: str | None = field(default=None)  # the stored text no longer parses (edited by hand)


def _newest(session: Session) -> AlertPolicy | None:
    return session.exec(select(AlertPolicy).order_by(col(AlertPolicy.id).desc()).limit(1)).first()


def load_policy(session: Session, text: str, who: str, now: dt.datetime, source: str = "policy") -> StoredPolicy:
    """Check ``text`` and store it as the policy in force (audited). An unchanged policy is not stored
    again."""
    policy = parse_policy(text, source)
    current = _newest(session)
    if current is not None and current.sha256 == policy.sha256:
        return StoredPolicy(current.id, policy, current.text, current.loaded_by, current.loaded_at)
    row = AlertPolicy(text=text, sha256=policy.sha256 or "", loaded_by=who, loaded_at=now)
    session.add(row)
    session.flush()
    audit.append(session, audit.Actor(who), [audit.Change("alert-policy.loaded", f"alert-policy:{row.id}", {
        "sha256": row.sha256, "source": source, "routes": len(policy.routes), "channels": list(policy.channels()),
        "bands": {"critical_days": policy.bands.critical_days, "warning_days": policy.bands.warning_days},
        "digest_at": policy.digest_at.strftime("%H:%M")})], now)
    return StoredPolicy(row.id, policy, text, who, now)


def stored_policy(session: Session) -> StoredPolicy:
    """The policy in force (the newest stored), or the built-in default when none was loaded. A stored
    text that no longer parses falls back to the default and says why in ``problem``."""
    row = _newest(session)
    if row is None:
        return StoredPolicy(None, DEFAULT_POLICY, None, None, None)
    try:
        return StoredPolicy(row.id, parse_policy(row.text, f"alert policy {row.id}"), row.text, row.loaded_by,
                            row.loaded_at)
    except PolicyFileError as exc:
        return StoredPolicy(row.id, DEFAULT_POLICY, row.text, row.loaded_by, row.loaded_at, str(exc))


def current_policy(session: Session) -> Policy:
    """The routes, bands and digest time in force."""
    return stored_policy(session).policy
