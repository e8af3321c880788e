"""The certificate policy: rules with stable ids, scopes that refine them, waivers, and ownership rules.
Pure functions of what is known about a certificate (``Facts``), an endpoint (``EndpointFacts``) and the
current time; no Prefect, no network, no database here (certpilot.violations stores the results).

The policy is YAML, in the file ``CERTPILOT_POLICY`` names (default ``$CERTPILOT_HOME/policy.yaml``) or in
a ``certpilot-policy`` Prefect block (``CERTPILOT_POLICY=block:<name>``); without either, the built-in
``DEFAULT_POLICY``. Every key is optional:

```yaml
rules:                                   # each rule id: its settings, or off; omitted rules keep the default
  key-size: {rsa: 3072, ec: 256, dsa: 2048, severity: critical}   # minimum bits per algorithm
  key-algorithm: {allowed: [rsa, ec-p256, ec-p384, ec-p521, ed25519]}
  signature-algorithm: {denied: [md2, md4, md5, sha1]}   # by hash; SHA-2, SHA-3, Ed25519, Ed448 pass
  max-validity: {}                       # public: CA/B Forum maximum on the issue date; private: the profile's
  expired: {severity: critical}
  expiring: {days: 21}                   # unmanaged certificates this close to expiry (managed ones renew)
  owner-required: {}
  tags-required: {tags: [env, cost-centre]}
  allowed-issuers:                       # a name under the domain must come from a matching issuer
    domains:
      example.com: ["acme-issuer/letsencrypt", "CN=R1?,O=Let's Encrypt,C=US"]
      corp.example: ["private-ca/*"]
  san-allowed: {patterns: ["*.example.com", "example.com", "*.corp.example", "spiffe://prod.example/*"]}
  san-denied: {patterns: ["*.local", "localhost"]}
  wildcard: {allowed: false}
  tls-min-version: {minimum: TLSv1.2}    # endpoint rules: what discovery and monitoring saw at a place
  chain-complete: {}
  hostname-match: off
scopes:                                  # refine the rules for the certificates a scope matches
  - name: internal
    match: {issuer: private}             # issuer (public or private), owner, tag ("k=v"), domain: all must match
    rules:
      max-validity: {days: 397, severity: low}
      tags-required: off
  - name: payments
    match: {owner: payments, domain: pay.example.com}
    rules:
      key-size: {rsa: 4096}
      wildcard: {allowed: false, severity: high}
issuers:
  private: ["CN=Corp Issuing CA*", "*,O=Example Internal,*"]   # DN globs of issuers that are not public
ownership:                               # the owner of a certificate that has none; the first match wins
  - match: {domain: pay.example.com}     # domain (a SAN under it), locator, source (globs), tag ("k=v")
    owner: payments
  - match: {locator: "ssh://web-*", source: "ssh:*"}
    owner: web
  - owner: platform                      # no match: every certificate not matched above
```

Rules (``RULES``; their defaults in ``DEFAULT_POLICY``). Every rule takes ``severity`` (low, medium, high,
critical) and ``enabled`` (true/false); naming a rule with settings turns it on, ``off`` turns it off, ``on``
turns it on with its defaults. ``tags-required``, ``allowed-issuers``, ``san-allowed``, ``san-denied`` and
``wildcard`` are off until configured (the first four need their list).

- ``key-size`` (high): RSA at least ``rsa`` bits (2048), EC at least ``ec`` (256), DSA at least ``dsa`` (2048);
- ``key-algorithm`` (high): the key's algorithm among ``allowed``: rsa, dsa, ec-p192, ec-p224, ec-p256, ec-p384,
  ec-p521 (other curves: ``ec-<curve name>``, e.g. ec-secp256k1), ed25519, ed448, ml-dsa-44, ml-dsa-65, ml-dsa-87;
  default rsa, ec-p256, ec-p384, ec-p521, ed25519, ml-dsa-44, ml-dsa-65, ml-dsa-87 (FIPS 204: certpilot's private
  CAs issue them; no public CA does);
- ``signature-algorithm`` (high): none of the ``denied`` hashes: md2, md4, md5, sha1, sha224 (default all but
  sha224); matched on the algorithm's name (sha1WithRSAEncryption, ecdsa-with-SHA1...); RSASSA-PSS, SHA-2, SHA-3,
  Ed25519 and Ed448 pass;
- ``max-validity`` (medium): validity counted inclusively (not before to not after plus one second, as the
  Baseline Requirements and certpilot.ca count it) at most: for a publicly trusted certificate the CA/B Forum
  maximum on its issue date (certpilot.ca.max_validity_days: 398 days, 200 from 2026-03-15, 100 from
  2027-03-15, 47 from 2029-03-15); for a private one its profile's ``max_days`` (certpilot.ca.CA_PROFILES,
  tls-server when the profile is not known); ``days`` replaces either;
- ``expired`` (critical); ``expiring`` (high): an unmanaged certificate within ``days`` (30) of its end, or
  within its own renewal window when it has one (managed certificates are renewed, and alerted on, by the
  renewal machinery instead);
- ``owner-required`` (medium); ``tags-required`` (low): every one of ``tags`` set;
- ``allowed-issuers`` (high): ``domains`` maps a DNS suffix to globs on the issuer's names (its DN, its issuer
  block such as acme-issuer/letsencrypt or private-ca/lab-ca); a certificate with a DNS name under the suffix
  (the longest configured suffix decides) must come from an issuer one of them matches;
- ``san-allowed`` / ``san-denied`` (high): every / no DNS name, IP address or URI matches one of ``patterns``;
- ``wildcard`` (medium): wildcard DNS names only where ``allowed`` is true;
- ``tls-min-version`` (high): the TLS version an endpoint negotiated at least ``minimum`` (SSLv2, SSLv3, TLSv1,
  TLSv1.1, TLSv1.2, TLSv1.3); ``chain-complete`` (medium): the endpoint sends a chain that completes;
  ``hostname-match`` (high): the certificate covers the name the endpoint is reached by.

CA certificates (``Facts.is_ca``) are held to the key and signature rules only (key-size, key-algorithm,
signature-algorithm): validity, expiry, owner, tags and names are about the leaves they issue.

Globs are fnmatch patterns (``*`` matches any characters, dots included; ``?``, ``[...]``), compared without
regard to case (locator and source globs with regard to it). A domain (scope, ownership, allowed-issuers)
matches itself and every name under it (example.com: example.com, www.example.com, *.example.com).

Scopes: a certificate takes the top-level rules, then each matching scope's rules in file order (a later
scope overrides an earlier one, key by key: ``{severity: low}`` keeps the rule's other settings).
``issuer: private`` matches certificates that chain to a certpilot private CA, are self-signed, or whose
issuer DN matches ``issuers.private``; every other certificate is public (``Policy.is_public``).

Waivers (certpilot.violations stores them): a rule, a scope (``parse_waiver_scope``), a reason, an approver
and an expiry. A waived violation is still reported, with its ``waiver_id``; an expired waiver no longer
applies and the violation's detail says which waiver lapsed.

A malformed policy is refused with a PolicyFileError naming the source, the line and the problem.
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from cryptography import x509

from certpilot.errors import CertpilotError, InvalidDnsNameError, PermanentError, redact
from certpilot.names import normalise_dns_name
from certpilot.settings import Settings, load_settings
from certpilot.x509info import CertificateRecord, describe_certificate
from certpilot.yaml_file import PolicyFileError, YamlReader, line_of

__all__ = ["DEFAULT_POLICY", "ENDPOINT_RULES", "KEY_ALGORITHMS", "REQUEST_RULES", "RULES", "SIGNATURE_HASHES",
           "TLS_VERSIONS", "EndpointFacts", "Facts", "OwnershipRule", "Policy", "PolicyFileError", "PolicyScope",
           "PolicyViolationError", "RuleSettings", "Severity", "Violation", "Waiver", "WaiverTerm",
           "facts_of_certificate", "facts_of_record", "key_algorithm_name", "load_policy", "parse_policy",
           "parse_waiver_scope", "policy_location", "signature_hash"]

RULES: tuple[str, ...] = (
    "key-size", "key-algorithm", "signature-algorithm", "max-validity", "expired", "expiring", "owner-required",
    "tags-required", "allowed-issuers", "san-allowed", "san-denied", "wildcard", "tls-min-version",
    "chain-complete", "hostname-match")
ENDPOINT_RULES: frozenset[str] = frozenset({"tls-min-version", "chain-complete", "hostname-match"})
REQUEST_RULES: frozenset[str] = frozenset({
    "key-size", "key-algorithm", "max-validity", "owner-required", "tags-required", "allowed-issuers",
    "san-allowed", "san-denied", "wildcard"})
CA_RULES: frozenset[str] = frozenset({"key-size", "key-algorithm", "signature-algorithm"})

KEY_ALGORITHMS: tuple[str, ...] = ("rsa", "dsa", "ec-p192", "ec-p224", "ec-p256", "ec-p384", "ec-p521", "ed25519",
                                   "ed448", "ml-dsa-44", "ml-dsa-65", "ml-dsa-87")
SIGNATURE_HASHES: dict[str, str] = {"md2": "MD2", "md4": "MD4", "md5": "MD5", "sha1": "SHA-1", "sha224": "SHA-224"}
TLS_VERSIONS: tuple[str, ...] = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

_CURVES = {"secp192r1": "ec-p192", "prime192v1": "ec-p192", "secp224r1": "ec-p224", "secp256r1": "ec-p256",
           "prime256v1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}
_MLDSA = re.compile(r"ML-?DSA-?(44|65|87)", re.IGNORECASE)
_SIGNATURE_HASH = re.compile(r"(md2|md4|md5|sha-?1(?![0-9])|sha-?224)", re.IGNORECASE)
_TLS_ALIASES = {"TLSv1.0": "TLSv1", "TLS1.0": "TLSv1", "TLS1.1": "TLSv1.1", "TLS1.2": "TLSv1.2", "TLS1.3": "TLSv1.3"}
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")
_SECOND = dt.timedelta(seconds=1)
_DAY = dt.timedelta(days=1)


class Severity(enum.StrEnum):
    """How much a violation matters: low < medium < high < critical (``Severity.rank``)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    def rank(self) -> int:
        """0 for low up to 3 for critical: ``Severity.rank(s)`` or ``s.rank()``."""
        return _SEVERITY_ORDER.index(self.value)


_SEVERITY_ORDER = tuple(s.value for s in Severity)


def key_algorithm_name(key_type: str, key_curve: str | None) -> str:
    """The key-algorithm rule's name for a key as certpilot.x509info describes it: rsa, ec-p256, ed25519..."""
    if key_type == "RSA":
        return "rsa"
    if key_type == "EC":
        return _CURVES.get(key_curve or "", f"ec-{(key_curve or 'unknown').lower()}")
    mldsa = _MLDSA.search(key_type)
    if mldsa:
        return f"ml-dsa-{mldsa.group(1)}"
    return key_type.lower()


def signature_hash(algorithm: str) -> str | None:
    """The weak hash (one of SIGNATURE_HASHES) a signature algorithm's name names, or None."""
    found = _SIGNATURE_HASH.search(algorithm)
    return found.group(1).lower().replace("-", "") if found else None


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def _under(name: str, suffix: str) -> bool:
    """``name`` (normalised, possibly ``*.``) is ``suffix`` or a name under it."""
    return name == suffix or name.endswith("." + suffix)


# ------------------------------------------------------------------------------------------ facts

@dataclass(frozen=True)
class Facts:
    """What the rules look at: a certificate (fingerprint set) or a request for one (fingerprint None).
    Times are aware UTC (naive ones are taken as UTC)."""

    fingerprint_sha256: str | None
    dns_names: tuple[str, ...]            # normalised lower-case, wildcards as "*.x"
    ip_addresses: tuple[str, ...]
    uris: tuple[str, ...]
    key_type: str                         # as certpilot.x509info names it: RSA, EC, Ed25519, Ed448, DSA, other
    key_size: int | None
    key_curve: str | None                 # cryptography's curve name: secp256r1, secp384r1...
    signature_algorithm: str | None       # x509info's name (sha256WithRSAEncryption...); None for a request
    not_before: dt.datetime               # a request: the time of the request
    not_after: dt.datetime                # a request: not_before + the days asked (minus 1 s or not: whole days)
    public: bool                          # publicly trusted (Policy.is_public)
    issuer: str                           # the issuer's DN; for a request, the issuer block name
    issuer_names: tuple[str, ...]         # every name the issuer goes by: DN, issuer block...
    profile: str | None                   # a private CA profile name (certpilot.ca.CA_PROFILES) when known
    owner: str | None
    tags: Mapping[str, str]
    managed: bool                         # renewed automatically by certpilot
    is_ca: bool = False
    sources: tuple[str, ...] = ()         # Location.source values where it was seen
    locators: tuple[str, ...] = ()        # Location.locator values
    renew_before: dt.timedelta | None = None  # its renewal window, when it has one
    managed_name: str | None = None       # the managed certificate's name (waiver scopes certificate=<name>)

    def __post_init__(self) -> None:
        if self.not_before.tzinfo is None:
            object.__setattr__(self, "not_before", _aware(self.not_before))
        if self.not_after.tzinfo is None:
            object.__setattr__(self, "not_after", _aware(self.not_after))


@dataclass(frozen=True)
class EndpointFacts:
    """What discovery or monitoring saw at one TLS place."""

    place: str                            # the locator, tls://host:port?sni=name
    certificate: Facts                    # the certificate served there (scoping, waivers, owner)
    tls_version: str | None               # TLSv1.2, TLSv1.3, TLSv1...; None: not seen
    chain_complete: bool | None           # None: not known
    hostname_matches: bool | None         # None: not known


@dataclass(frozen=True)
class Violation:
    rule: str
    severity: Severity
    detail: str                           # precise and public: "RSA key of 1024 bits; policy requires at least 2048"
    fingerprint_sha256: str | None
    place: str = ""                       # "" for certificate rules, the locator for endpoint rules
    waiver_id: int | None = None          # set when a waiver covers it (kept, shown as waived, never gates)

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "fingerprint_sha256": self.fingerprint_sha256, "severity": self.severity.value,
                "detail": self.detail, "place": self.place, "waiver_id": self.waiver_id}


def _normalise_name(name: str) -> str:
    try:
        return normalise_dns_name(name, wildcard=True)
    except InvalidDnsNameError:
        return name.strip().lower()


def facts_of_record(record: CertificateRecord, *, owner: str | None = None, tags: Mapping[str, str] | None = None,
                    managed: bool = False, public: bool | None = None, issuer_names: Sequence[str] = (),
                    profile: str | None = None, sources: Sequence[str] = (), locators: Sequence[str] = (),
                    renew_before: dt.timedelta | None = None, managed_name: str | None = None) -> Facts:
    """The facts of a described certificate. ``public`` None: public unless self-signed (a caller that
    knows the private CAs and the policy passes ``policy.is_public(...)``); ``issuer_names`` are added
    after the issuer's DN."""
    sans = record.sans
    return Facts(
        fingerprint_sha256=record.fingerprint_sha256,
        dns_names=tuple(_normalise_name(v) for k, v in sans if k == "DNS"),
        ip_addresses=tuple(v for k, v in sans if k == "IP"),
        uris=tuple(v for k, v in sans if k == "URI"),
        key_type=record.key_type, key_size=record.key_size, key_curve=record.key_curve,
        signature_algorithm=record.signature_algorithm,
        not_before=record.not_before, not_after=record.not_after,
        public=not record.self_signed if public is None else public,
        issuer=record.issuer, issuer_names=(record.issuer, *issuer_names), profile=profile,
        owner=owner, tags=dict(tags or {}), managed=managed, is_ca=record.is_ca,
        sources=tuple(sources), locators=tuple(locators), renew_before=renew_before, managed_name=managed_name)


def facts_of_certificate(cert: x509.Certificate, **known: Any) -> Facts:
    """``facts_of_record(describe_certificate(cert), **known)``."""
    return facts_of_record(describe_certificate(cert), **known)


# ------------------------------------------------------------------------------------------ waivers

@dataclass(frozen=True)
class WaiverTerm:
    """One term of a waiver scope: ``key`` is certificate, owner, domain, tag, place or ``*``."""

    key: str
    value: str
    tag: str | None = None  # the tag's key, for key "tag"

    def matches(self, violation: Violation, facts: Facts) -> bool:
        if self.key == "*":
            return True
        if self.key == "certificate":
            fingerprint = violation.fingerprint_sha256 or facts.fingerprint_sha256
            return (facts.managed_name == self.value
                    or (bool(_HEX.match(self.value)) and bool(fingerprint)
                        and str(fingerprint).startswith(self.value.lower())))
        if self.key == "owner":
            return facts.owner == self.value
        if self.key == "domain":
            return any(_under(name, self.value) for name in facts.dns_names)
        if self.key == "tag":
            return self.tag is not None and facts.tags.get(self.tag) == self.value
        return fnmatch.fnmatchcase(violation.place, self.value)  # place


_WAIVER_SCOPE_HELP = ("certificate=<sha256 prefix of 8+ hex digits, or a managed name>, owner=<owner>, "
                      "domain=<suffix>, tag:<key>=<value>, place=<glob on the locator>, or * (joined by ',')")


def parse_waiver_scope(text: str) -> tuple[WaiverTerm, ...]:
    """The terms of a waiver scope (all must match); PermanentError naming the part that is wrong."""
    if not text.strip():
        raise PermanentError(f"waiver scope is empty: give {_WAIVER_SCOPE_HELP}")
    if text.strip() == "*":
        return (WaiverTerm("*", "*"),)
    terms = []
    for part in text.split(","):
        item = part.strip()
        if item == "*":
            raise PermanentError(f"waiver scope {text!r}: '*' stands alone (it waives everywhere)")
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise PermanentError(f"waiver scope {text!r}: {item!r} is not key=value; use {_WAIVER_SCOPE_HELP}")
        if key.startswith("tag:"):
            tag = key[4:].strip()
            if not tag:
                raise PermanentError(f"waiver scope {text!r}: {item!r} names no tag; use tag:<key>=<value>")
            terms.append(WaiverTerm("tag", value, tag))
        elif key == "domain":
            try:
                terms.append(WaiverTerm("domain", normalise_dns_name(value)))
            except InvalidDnsNameError as exc:
                raise PermanentError(f"waiver scope {text!r}: domain {value!r}: {exc.reason}") from None
        elif key == "certificate":
            terms.append(WaiverTerm("certificate", value.lower() if _HEX.match(value) else value))
        elif key in ("owner", "place"):
            terms.append(WaiverTerm(key, value))
        else:
            raise PermanentError(f"waiver scope {text!r}: unknown term {key!r}; use {_WAIVER_SCOPE_HELP}")
    return tuple(terms)


@dataclass(frozen=True)
class Waiver:
    """An exception to ``rule`` for what ``scope`` names, until ``expires_at``. The scope is checked when
    the waiver is made (PermanentError naming the bad part)."""

    id: int
    rule: str
    scope: str
    reason: str
    approver: str
    expires_at: dt.datetime
    terms: tuple[WaiverTerm, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise PermanentError(f"waiver {self.id}: unknown rule {self.rule!r}; the rules are {', '.join(RULES)}")
        object.__setattr__(self, "terms", parse_waiver_scope(self.scope))
        object.__setattr__(self, "expires_at", _aware(self.expires_at))

    def covers(self, violation: Violation, facts: Facts) -> bool:
        """Its rule and every term of its scope match (expiry aside: see ``expired``)."""
        return violation.rule == self.rule and all(term.matches(violation, facts) for term in self.terms)

    def expired(self, now: dt.datetime) -> bool:
        return _aware(now) >= self.expires_at


# ------------------------------------------------------------------------------------------ ownership

@dataclass(frozen=True)
class OwnershipRule:
    """Who owns a certificate that matches: every criterion given must match; none given: every certificate."""

    owner: str
    domain: str | None = None     # DNS suffix of any SAN
    locator: str | None = None    # fnmatch glob on any locator
    source: str | None = None     # fnmatch glob on any Location.source (tls-scan:*, ssh:web)
    tag: tuple[str, str] | None = None
    line: int | None = None       # where in the policy file

    def matches(self, facts: Facts) -> bool:
        if self.domain is not None and not any(_under(name, self.domain) for name in facts.dns_names):
            return False
        if self.locator is not None and not any(fnmatch.fnmatchcase(loc, self.locator) for loc in facts.locators):
            return False
        if self.source is not None and not any(fnmatch.fnmatchcase(src, self.source) for src in facts.sources):
            return False
        return self.tag is None or facts.tags.get(self.tag[0]) == self.tag[1]

    def as_dict(self) -> dict[str, Any]:
        match: dict[str, str] = {}
        if self.domain is not None:
            match["domain"] = self.domain
        if self.locator is not None:
            match["locator"] = self.locator
        if self.source is not None:
            match["source"] = self.source
        if self.tag is not None:
            match["tag"] = f"{self.tag[0]}={self.tag[1]}"
        return {"owner": self.owner, "match": match, "line": self.line}


# ------------------------------------------------------------------------------------------ rules

# Each rule's settings besides severity and enabled, and which of them must be non-empty when it is on.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "key-size": ("rsa", "ec", "dsa"), "key-algorithm": ("allowed",), "signature-algorithm": ("denied",),
    "max-validity": ("days",), "expired": (), "expiring": ("days",), "owner-required": (),
    "tags-required": ("tags",), "allowed-issuers": ("domains",), "san-allowed": ("patterns",),
    "san-denied": ("patterns",), "wildcard": ("allowed",), "tls-min-version": ("minimum",), "chain-complete": (),
    "hostname-match": ()}
_NEEDS: dict[str, str] = {"tags-required": "tags", "allowed-issuers": "domains", "san-allowed": "patterns",
                          "san-denied": "patterns"}


@dataclass(frozen=True)
class RuleSettings:
    """One rule as configured: on or off, its severity, and its own settings (``_OPTIONS``)."""

    rule: str
    enabled: bool
    severity: Severity
    options: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        for key, value in self.options.items():
            if key == "domains":
                settings[key] = {suffix: list(globs) for suffix, globs in value}
            elif isinstance(value, tuple):
                settings[key] = list(value)
            else:
                settings[key] = value
        return {"enabled": self.enabled, "severity": self.severity.value, "settings": settings,
                "about": "endpoint" if self.rule in ENDPOINT_RULES else "certificate"}


@dataclass(frozen=True)
class RuleOverride:
    """What a rules mapping (top level or a scope's) says about one rule."""

    rule: str
    enabled: bool
    severity: Severity | None
    options: Mapping[str, Any]
    line: int

    def apply(self, base: RuleSettings) -> RuleSettings:
        return RuleSettings(self.rule, self.enabled, self.severity or base.severity, {**base.options, **self.options})

    def as_dict(self) -> dict[str, Any]:
        shown = RuleSettings(self.rule, self.enabled, self.severity or Severity.LOW, self.options).as_dict()
        out: dict[str, Any] = {"enabled": self.enabled, **shown["settings"]}
        if self.severity is not None:
            out["severity"] = self.severity.value
        return out


def _rs(rule: str, enabled: bool, severity: Severity, **options: Any) -> RuleSettings:
    return RuleSettings(rule, enabled, severity, options)


_DEFAULT_RULES: dict[str, RuleSettings] = {s.rule: s for s in (
    _rs("key-size", True, Severity.HIGH, rsa=2048, ec=256, dsa=2048),
    _rs("key-algorithm", True, Severity.HIGH, allowed=("rsa", "ec-p256", "ec-p384", "ec-p521", "ed25519",
                                                        "ml-dsa-44", "ml-dsa-65", "ml-dsa-87")),
    _rs("signature-algorithm", True, Severity.HIGH, denied=("md2", "md4", "md5", "sha1")),
    _rs("max-validity", True, Severity.MEDIUM),
    _rs("expired", True, Severity.CRITICAL),
    _rs("expiring", True, Severity.HIGH, days=30),
    _rs("owner-required", True, Severity.MEDIUM),
    _rs("tags-required", False, Severity.LOW, tags=()),
    _rs("allowed-issuers", False, Severity.HIGH, domains=()),
    _rs("san-allowed", False, Severity.HIGH, patterns=()),
    _rs("san-denied", False, Severity.HIGH, patterns=()),
    _rs("wildcard", False, Severity.MEDIUM, allowed=False),
    _rs("tls-min-version", True, Severity.HIGH, minimum="TLSv1.2"),
    _rs("chain-complete", True, Severity.MEDIUM),
    _rs("hostname-match", True, Severity.HIGH),
)}
assert tuple(_DEFAULT_RULES) == RULES


# A check returns the violation's detail, or None when the facts pass.
CertificateCheck = Callable[[Facts, dt.datetime], "str | None"]
EndpointCheck = Callable[[EndpointFacts, dt.datetime], "str | None"]


def _days(span: float) -> str:
    whole = round(span)
    return str(whole) if abs(span - whole) < 1 / 1440 else f"{span:.1f}"


def _validity(f: Facts) -> str:
    """How long a certificate is valid, counted inclusively: "825 days", "398 days and 1 second", "90.5 days"."""
    span = f.not_after - f.not_before + _SECOND
    if span.seconds == 0:
        return f"{span.days} days"
    if span.seconds < 3600:
        return f"{span.days} days and {span.seconds} second{'s' if span.seconds > 1 else ''}"
    return f"{span / _DAY:.1f} days"


def _ago(days: int) -> str:
    return "today" if days == 0 else "1 day ago" if days == 1 else f"{days} days ago"


def _within(days: int) -> str:
    return "today" if days == 0 else "in 1 day" if days == 1 else f"in {days} days"


def _glob_regex(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.IGNORECASE)


def _key_size(o: Mapping[str, Any]) -> CertificateCheck:
    rsa, ec, dsa = o.get("rsa"), o.get("ec"), o.get("dsa")

    def check(f: Facts, now: dt.datetime) -> str | None:
        size = f.key_size
        if size is None:
            return None
        if f.key_type == "RSA" and rsa and size < rsa:
            return f"RSA key of {size} bits; policy requires at least {rsa}"
        if f.key_type == "EC" and ec and size < ec:
            return f"EC key on {f.key_curve} ({size} bits); policy requires at least {ec}"
        if f.key_type == "DSA" and dsa and size < dsa:
            return f"DSA key of {size} bits; policy requires at least {dsa}"
        return None
    return check


def _key_text(f: Facts) -> str:
    if f.key_type == "EC":
        return f"EC key on {f.key_curve}"
    if f.key_type in ("RSA", "DSA") and f.key_size:
        return f"{f.key_type} key of {f.key_size} bits"
    return f"{f.key_type} key"


def _key_algorithm(o: Mapping[str, Any]) -> CertificateCheck:
    allowed = frozenset(o["allowed"])
    listed = ", ".join(o["allowed"]) or "none"

    def check(f: Facts, now: dt.datetime) -> str | None:
        name = key_algorithm_name(f.key_type, f.key_curve)
        if name in allowed:
            return None
        return f"{_key_text(f)} ({name}); policy allows {listed}"
    return check


def _signature_algorithm(o: Mapping[str, Any]) -> CertificateCheck:
    denied = frozenset(o["denied"])

    def check(f: Facts, now: dt.datetime) -> str | None:
        if not f.signature_algorithm:
            return None
        weak = signature_hash(f.signature_algorithm)
        if weak is None or weak not in denied:
            return None
        return f"signed with {f.signature_algorithm} ({SIGNATURE_HASHES[weak]}); policy denies {SIGNATURE_HASHES[weak]}"
    return check


def _max_validity(o: Mapping[str, Any]) -> CertificateCheck:
    from certpilot.ca import CA_PROFILES, max_validity_days  # certpilot.ca imports much of the core: not at load

    days: int | None = o.get("days")

    def check(f: Facts, now: dt.datetime) -> str | None:
        request = f.fingerprint_sha256 is None
        if request:  # a request asks for whole days: N days with or without the last second
            span = float(round((f.not_after - f.not_before) / _DAY))
        else:
            span = (f.not_after - f.not_before + _SECOND) / _DAY
        if days is not None:
            limit, why = days, f"policy allows at most {days} days"
        elif f.public:
            limit = max_validity_days(f.not_before)
            why = f"the CA/B Forum maximum on that date is {limit} days"
        else:
            profile = CA_PROFILES.get(f.profile or "tls-server") or CA_PROFILES["tls-server"]
            limit, why = profile.max_days, f"private profile {profile.name} allows at most {profile.max_days} days"
        if span <= limit:
            return None
        if request:
            return f"asks for {span:.0f} days on {f.not_before:%Y-%m-%d}; {why}"
        return f"valid {_validity(f)}, issued {f.not_before:%Y-%m-%d}; {why}"
    return check


def _expired(o: Mapping[str, Any]) -> CertificateCheck:
    def check(f: Facts, now: dt.datetime) -> str | None:
        if f.not_after >= now:
            return None
        return f"expired {f.not_after:%Y-%m-%d} ({_ago((now - f.not_after).days)})"
    return check


def _expiring(o: Mapping[str, Any]) -> CertificateCheck:
    default_window = dt.timedelta(days=o["days"])

    def check(f: Facts, now: dt.datetime) -> str | None:
        if f.managed or f.not_after < now:
            return None
        window = f.renew_before or default_window
        left = f.not_after - now
        if left > window:
            return None
        return (f"expires {f.not_after:%Y-%m-%d} ({_within(left.days)}) and is not managed; policy flags "
                f"unmanaged certificates {_days(window / _DAY)} days ahead")
    return check


def _owner_required(o: Mapping[str, Any]) -> CertificateCheck:
    def check(f: Facts, now: dt.datetime) -> str | None:
        return None if f.owner else "no owner"
    return check


def _tags_required(o: Mapping[str, Any]) -> CertificateCheck:
    tags: tuple[str, ...] = o["tags"]

    def check(f: Facts, now: dt.datetime) -> str | None:
        missing = [t for t in tags if not f.tags.get(t)]
        if not missing:
            return None
        return f"missing tag{'s' if len(missing) > 1 else ''} {', '.join(missing)}; policy requires {', '.join(tags)}"
    return check


def _allowed_issuers(o: Mapping[str, Any]) -> CertificateCheck:
    # The longest suffix decides a name; each suffix's globs compiled once.
    domains = sorted(((suffix, globs, _glob_regex(globs)) for suffix, globs in o["domains"]),
                     key=lambda item: -len(item[0]))

    def check(f: Facts, now: dt.datetime) -> str | None:
        refused: dict[str, list[str]] = {}
        verdicts: dict[str, bool] = {}
        for name in f.dns_names:
            for suffix, globs, regex in domains:
                if _under(name, suffix):
                    if suffix not in verdicts:
                        verdicts[suffix] = any(regex.match(n) for n in (f.issuer, *f.issuer_names))
                    if not verdicts[suffix]:
                        refused.setdefault(suffix, []).append(name)
                    break
        if not refused:
            return None
        parts = "; ".join(f"{', '.join(names)} (under {suffix}: policy allows {', '.join(globs)})"
                          for suffix, globs, _ in domains if (names := refused.get(suffix)))
        return f"issued by {f.issuer}, not an allowed issuer for {parts}"
    return check


def _all_names(f: Facts) -> tuple[str, ...]:
    return f.dns_names + f.ip_addresses + f.uris


def _san_allowed(o: Mapping[str, Any]) -> CertificateCheck:
    patterns: tuple[str, ...] = o["patterns"]
    regex = _glob_regex(patterns)

    def check(f: Facts, now: dt.datetime) -> str | None:
        outside = [n for n in _all_names(f) if not regex.match(n)]
        if not outside:
            return None
        return (f"name{'s' if len(outside) > 1 else ''} {', '.join(outside)} not allowed; policy allows "
                f"{', '.join(patterns)}")
    return check


def _san_denied(o: Mapping[str, Any]) -> CertificateCheck:
    patterns: tuple[str, ...] = o["patterns"]
    regex = _glob_regex(patterns)
    each = [(p, _glob_regex((p,))) for p in patterns]

    def check(f: Facts, now: dt.datetime) -> str | None:
        denied = [n for n in _all_names(f) if regex.match(n)]
        if not denied:
            return None
        shown = ", ".join(f"{n} (pattern {next(p for p, r in each if r.match(n))})" for n in denied)
        return f"denied name{'s' if len(denied) > 1 else ''} {shown}"
    return check


def _wildcard(o: Mapping[str, Any]) -> CertificateCheck | None:
    if o["allowed"]:
        return None

    def check(f: Facts, now: dt.datetime) -> str | None:
        wild = [n for n in f.dns_names if n.startswith("*.")]
        if not wild:
            return None
        return f"wildcard name{'s' if len(wild) > 1 else ''} {', '.join(wild)}; policy allows no wildcard names"
    return check


def _tls_version(text: str) -> str | None:
    version = _TLS_ALIASES.get(text, text)
    return version if version in TLS_VERSIONS else None


def _tls_min_version(o: Mapping[str, Any]) -> EndpointCheck:
    minimum: str = o["minimum"]
    floor = TLS_VERSIONS.index(minimum)

    def check(e: EndpointFacts, now: dt.datetime) -> str | None:
        version = _tls_version(e.tls_version) if e.tls_version else None
        if version is None or TLS_VERSIONS.index(version) >= floor:
            return None
        return f"served with {e.tls_version} (policy minimum {minimum})"
    return check


def _chain_complete(o: Mapping[str, Any]) -> EndpointCheck:
    def check(e: EndpointFacts, now: dt.datetime) -> str | None:
        if e.chain_complete is not False:
            return None
        return "the chain served is incomplete: it does not lead to a trusted root (an intermediate is missing)"
    return check


def _host_of(place: str) -> str:
    try:
        parts = urlsplit(place)
        sni = parse_qs(parts.query).get("sni")
        return sni[0] if sni else parts.hostname or place
    except ValueError:
        return place


def _hostname_match(o: Mapping[str, Any]) -> EndpointCheck:
    def check(e: EndpointFacts, now: dt.datetime) -> str | None:
        if e.hostname_matches is not False:
            return None
        return f"the certificate served does not cover {_host_of(e.place)}"
    return check


_CERTIFICATE_CHECKS: dict[str, Callable[[Mapping[str, Any]], CertificateCheck | None]] = {
    "key-size": _key_size, "key-algorithm": _key_algorithm, "signature-algorithm": _signature_algorithm,
    "max-validity": _max_validity, "expired": _expired, "expiring": _expiring, "owner-required": _owner_required,
    "tags-required": _tags_required, "allowed-issuers": _allowed_issuers, "san-allowed": _san_allowed,
    "san-denied": _san_denied, "wildcard": _wildcard}
_ENDPOINT_CHECKS: dict[str, Callable[[Mapping[str, Any]], EndpointCheck]] = {
    "tls-min-version": _tls_min_version, "chain-complete": _chain_complete, "hostname-match": _hostname_match}


@dataclass(frozen=True)
class _RuleSet:
    """The checks in force for one combination of matching scopes, in RULES order."""

    certificate: tuple[tuple[str, Severity, CertificateCheck], ...]
    ca: tuple[tuple[str, Severity, CertificateCheck], ...]
    request: tuple[tuple[str, Severity, CertificateCheck], ...]
    endpoint: tuple[tuple[str, Severity, EndpointCheck], ...]


def _compile(rules: Mapping[str, RuleSettings]) -> _RuleSet:
    certificate: list[tuple[str, Severity, CertificateCheck]] = []
    endpoint: list[tuple[str, Severity, EndpointCheck]] = []
    for rule in RULES:
        settings = rules[rule]
        if not settings.enabled:
            continue
        if rule in ENDPOINT_RULES:
            endpoint.append((rule, settings.severity, _ENDPOINT_CHECKS[rule](settings.options)))
            continue
        check = _CERTIFICATE_CHECKS[rule](settings.options)
        if check is not None:
            certificate.append((rule, settings.severity, check))
    return _RuleSet(tuple(certificate), tuple(c for c in certificate if c[0] in CA_RULES),
                    tuple(c for c in certificate if c[0] in REQUEST_RULES), tuple(endpoint))


# ------------------------------------------------------------------------------------------ the policy

@dataclass(frozen=True)
class PolicyScope:
    """Rules refined for the certificates that match: every criterion given must match."""

    name: str
    overrides: tuple[RuleOverride, ...]
    issuer: str | None = None     # "public" or "private"
    owner: str | None = None
    tag: tuple[str, str] | None = None
    domain: str | None = None     # a SAN under it
    line: int | None = None

    def matches(self, facts: Facts) -> bool:
        if self.issuer is not None and facts.public != (self.issuer == "public"):
            return False
        if self.owner is not None and facts.owner != self.owner:
            return False
        if self.tag is not None and facts.tags.get(self.tag[0]) != self.tag[1]:
            return False
        return self.domain is None or any(_under(name, self.domain) for name in facts.dns_names)

    def as_dict(self) -> dict[str, Any]:
        match: dict[str, str] = {}
        for key in ("issuer", "owner", "domain"):
            if getattr(self, key) is not None:
                match[key] = getattr(self, key)
        if self.tag is not None:
            match["tag"] = f"{self.tag[0]}={self.tag[1]}"
        return {"name": self.name, "match": match, "rules": {o.rule: o.as_dict() for o in self.overrides},
                "line": self.line}


@dataclass(frozen=True)
class Policy:
    """The policy in force: where it came from (``source``: a path, ``block:<name>`` or ``built-in``), its
    text and the text's SHA-256 (None for the built-in default), ownership rules, rules, scopes and the
    private issuer patterns."""

    source: str
    sha256: str | None
    text: str | None
    ownership: tuple[OwnershipRule, ...] = ()
    rules: Mapping[str, RuleSettings] = field(default_factory=lambda: dict(_DEFAULT_RULES))
    scopes: tuple[PolicyScope, ...] = ()
    private_issuers: tuple[str, ...] = ()
    _cache: dict[tuple[int, ...], _RuleSet] = field(default_factory=dict, init=False, repr=False, compare=False)
    _private: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(self.rules) != set(RULES):
            raise ValueError(f"a policy needs settings for every rule: {', '.join(RULES)}")
        if self.private_issuers:
            object.__setattr__(self, "_private", _glob_regex(self.private_issuers))

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its text: the compiled checks are closures, and the text is the policy.
        return (_rebuild_policy, (self.source, self.text))

    def is_public(self, issuer_dn: str, *, private_ca: bool, self_signed: bool) -> bool:
        """False when the certificate chains to a certpilot private CA, is self-signed, or its issuer's DN
        matches one of ``issuers.private``; else True."""
        if private_ca or self_signed:
            return False
        return self._private is None or self._private.match(issuer_dn) is None

    def _rule_set(self, facts: Facts) -> _RuleSet:
        key = tuple(index for index, scope in enumerate(self.scopes) if scope.matches(facts))
        found = self._cache.get(key)
        if found is None:
            rules = dict(self.rules)
            for index in key:
                for override in self.scopes[index].overrides:
                    rules[override.rule] = override.apply(rules[override.rule])
            found = self._cache[key] = _compile(rules)
        return found

    def _run(self, checks: Sequence[tuple[str, Severity, CertificateCheck]], facts: Facts, now: dt.datetime,
             waivers: Sequence[Waiver]) -> list[Violation]:
        now = _aware(now)
        found = []
        for rule, severity, check in checks:
            detail = check(facts, now)
            if detail is not None:
                found.append(Violation(rule, severity, detail, facts.fingerprint_sha256))
        return _waive(found, facts, waivers, now) if found and waivers else found

    def evaluate(self, facts: Facts, now: dt.datetime, waivers: Sequence[Waiver] = ()) -> list[Violation]:
        """Every certificate rule (not ENDPOINT_RULES) in force for ``facts`` under the scopes that it breaks
        (a CA certificate: the key and signature rules only); waived ones carry ``waiver_id``."""
        rule_set = self._rule_set(facts)
        return self._run(rule_set.ca if facts.is_ca else rule_set.certificate, facts, now, waivers)

    def evaluate_request(self, facts: Facts, now: dt.datetime, waivers: Sequence[Waiver] = ()) -> list[Violation]:
        """Only REQUEST_RULES: the issuance gate."""
        return self._run(self._rule_set(facts).request, facts, now, waivers)

    def evaluate_endpoint(self, endpoint: EndpointFacts, now: dt.datetime,
                          waivers: Sequence[Waiver] = ()) -> list[Violation]:
        """Only ENDPOINT_RULES, scoped by the certificate served; ``Violation.place`` is the endpoint's."""
        now = _aware(now)
        facts = endpoint.certificate
        found = []
        for rule, severity, check in self._rule_set(facts).endpoint:
            detail = check(endpoint, now)
            if detail is not None:
                found.append(Violation(rule, severity, detail, facts.fingerprint_sha256, endpoint.place))
        return _waive(found, facts, waivers, now) if found and waivers else found

    def scopes_for(self, facts: Facts) -> tuple[str, ...]:
        """The names of the scopes that match ``facts``, in the order they apply."""
        return tuple(scope.name for scope in self.scopes if scope.matches(facts))

    def owner_for(self, facts: Facts) -> str | None:
        """The owner the first matching ownership rule gives, or None."""
        return next((rule.owner for rule in self.ownership if rule.matches(facts)), None)

    def rule_severity(self, rule: str) -> Severity:
        """The rule's top-level severity (a scope may raise or lower it for the certificates it matches)."""
        if rule not in self.rules:
            raise PermanentError(f"unknown rule {rule!r}; the rules are {', '.join(RULES)}")
        return self.rules[rule].severity

    def describe(self) -> dict[str, Any]:
        """The policy in force, as JSON-ready data (``certpilot policy show --json``)."""
        return {"source": self.source, "sha256": self.sha256,
                "rules": {rule: self.rules[rule].as_dict() for rule in RULES},
                "scopes": [scope.as_dict() for scope in self.scopes],
                "issuers": {"private": list(self.private_issuers)},
                "ownership": [rule.as_dict() for rule in self.ownership]}


def _waive(violations: list[Violation], facts: Facts, waivers: Sequence[Waiver], now: dt.datetime) -> list[Violation]:
    out = []
    for violation in violations:
        lapsed: Waiver | None = None
        waiver_id: int | None = None
        for waiver in waivers:
            if waiver.rule != violation.rule or not waiver.covers(violation, facts):
                continue
            if waiver.expired(now):
                lapsed = lapsed or waiver
                continue
            waiver_id = waiver.id
            break
        if waiver_id is not None:
            violation = replace(violation, waiver_id=waiver_id)
        elif lapsed is not None:
            violation = replace(violation, detail=f"{violation.detail} (waiver {lapsed.id} expired "
                                                  f"{lapsed.expires_at:%Y-%m-%d})")
        out.append(violation)
    return out


DEFAULT_POLICY = Policy("built-in", None, None)


def _rebuild_policy(source: str, text: str | None) -> Policy:
    return DEFAULT_POLICY if text is None else parse_policy(text, source)


# ------------------------------------------------------------------------------------------ parsing

def _glob(reader: YamlReader, node: yaml.Node, what: str, *, spaces: bool = False) -> str:
    value = reader.text(node, what)
    if not spaces and any(c.isspace() for c in value):
        raise reader.fail(node, f"{what} {value!r} has white space; a name pattern cannot")
    start = value.find("[")
    while start >= 0:
        end = value.find("]", start + 2)
        if end < 0:
            raise reader.fail(node, f"{what} {value!r} has a '[' with no closing ']'")
        start = value.find("[", end + 1)
    return value


def _globs(reader: YamlReader, node: yaml.Node, what: str, *, spaces: bool = False) -> tuple[str, ...]:
    items = reader.sequence(node, what)
    if not items:
        raise reader.fail(node, f"{what} must list at least one pattern")
    return tuple(_glob(reader, item, f"a pattern in {what}", spaces=spaces) for item in items)


def _domain(reader: YamlReader, node: yaml.Node, what: str) -> str:
    value = reader.text(node, what)
    try:
        return normalise_dns_name(value)
    except InvalidDnsNameError as exc:
        hint = " (a domain covers every name under it: write example.com, not *.example.com)" \
            if value.startswith("*.") else ""
        raise reader.fail(node, f"{what} {value!r} is not a DNS domain: {exc.reason}{hint}") from None


def _tag(reader: YamlReader, node: yaml.Node, what: str) -> tuple[str, str]:
    text = reader.text(node, what)
    key, sep, value = text.partition("=")
    if not (key.strip() and sep and value.strip()):
        raise reader.fail(node, f"{what} {text!r} must be key=value, e.g. env=prod")
    return key.strip(), value.strip()


def _option(reader: YamlReader, rule: str, key: str, node: yaml.Node, what: str) -> Any:
    name = f"{what}'s {key}"
    if rule == "key-size" or key == "days":
        return reader.integer(node, name)
    if key == "allowed" and rule == "key-algorithm":
        names = tuple(n.lower() for n in reader.texts(node, name))
        for item, value in zip(reader.sequence(node, name), names):
            if value not in KEY_ALGORITHMS and not value.startswith("ec-"):
                raise reader.fail(item, f"unknown key algorithm {value!r} in {name}: use {', '.join(KEY_ALGORITHMS)} "
                                        "or ec-<curve name>")
        if not names:
            raise reader.fail(node, f"{name} must list at least one algorithm")
        return names
    if key == "denied":
        names = tuple(n.lower().replace("-", "") for n in reader.texts(node, name))
        for item, value in zip(reader.sequence(node, name), names):
            if value not in SIGNATURE_HASHES:
                raise reader.fail(item, f"unknown hash {value!r} in {name}: use {', '.join(SIGNATURE_HASHES)}")
        return names
    if key == "tags":
        tags = reader.texts(node, name)
        if not tags:
            raise reader.fail(node, f"{name} must list at least one tag")
        return tags
    if key == "patterns":
        return tuple(p.lower() for p in _globs(reader, node, name))
    if key == "domains":
        pairs = reader.pairs(node, name)
        if not pairs:
            raise reader.fail(node, f"{name} must map at least one domain to its issuers")
        return tuple((_domain(reader, k, f"a domain in {name}"), _globs(reader, v, f"the issuers for {k.value}",
                                                                        spaces=True)) for k, v in pairs)
    if key == "allowed":  # wildcard
        return reader.boolean(node, name)
    if key == "minimum":
        value = reader.text(node, name)
        version = _tls_version(value)
        if version is None:
            raise reader.fail(node, f"{name} {value!r} is not a TLS version: use {', '.join(TLS_VERSIONS)}")
        return version
    raise AssertionError(f"no reader for {rule} {key}")  # pragma: no cover - _OPTIONS and this agree


def _rule_id(reader: YamlReader, node: yaml.Node) -> str:
    name = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    if name not in RULES:
        raise reader.fail(node, f"unknown rule {name!r}: the rules are {', '.join(RULES)}")
    return name


def _override(reader: YamlReader, rule: str, node: yaml.Node, what: str) -> RuleOverride:
    line = line_of(node)
    if reader.is_boolean(node):
        return RuleOverride(rule, reader.boolean(node, what), None, {}, line)
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return RuleOverride(rule, True, None, {}, line)
    keys = ("severity", "enabled", *_OPTIONS[rule])
    if not isinstance(node, yaml.MappingNode):
        raise reader.fail(node, f"{what} must be off, on, or a mapping of its settings ({', '.join(keys)})")
    found = reader.mapping(node, what, keys)
    severity = None
    if "severity" in found:
        value_node = found["severity"][1]
        value = reader.text(value_node, f"{what}'s severity")
        if value.lower() not in _SEVERITY_ORDER:
            raise reader.fail(value_node, f"{what}'s severity {value!r} is not one of {', '.join(_SEVERITY_ORDER)}")
        severity = Severity(value.lower())
    enabled = reader.boolean(found["enabled"][1], f"{what}'s enabled") if "enabled" in found else True
    options = {key: _option(reader, rule, key, found[key][1], what) for key in _OPTIONS[rule] if key in found}
    return RuleOverride(rule, enabled, severity, options, line)


def _checked(reader: YamlReader, override: RuleOverride, base: RuleSettings, node: yaml.Node,
             what: str) -> RuleSettings:
    settings = override.apply(base)
    need = _NEEDS.get(settings.rule)
    if settings.enabled and need and not settings.options.get(need):
        raise reader.fail(node, f"{what} is on but has no {need}: give {settings.rule}'s {need} (or set it off)")
    return settings


def _overrides(reader: YamlReader, node: yaml.Node, what: str,
               within: str | None = None) -> list[tuple[RuleOverride, yaml.Node]]:
    """The rules mapping ``what`` (top level, or a scope's: ``within`` names the scope)."""
    out = []
    for key, value in reader.pairs(node, what):
        rule = _rule_id(reader, key)
        out.append((_override(reader, rule, value, f"rule {rule}" + (f" in {within}" if within else "")), value))
    return out


def _scopes(reader: YamlReader, node: yaml.Node, rules: Mapping[str, RuleSettings]) -> tuple[PolicyScope, ...]:
    scopes: list[PolicyScope] = []
    names: set[str] = set()
    for index, item in enumerate(reader.sequence(node, "scopes")):
        entry = reader.mapping(item, f"scope {index + 1}", ("name", "match", "rules"),
                               required=("name", "match", "rules"))
        name = reader.text(entry["name"][1], f"scope {index + 1}'s name")
        if name in names:
            raise reader.fail(entry["name"][1], f"scope name {name!r} given twice")
        names.add(name)
        what = f"scope {name!r}"
        match_node = entry["match"][1]
        match = reader.mapping(match_node, f"{what}'s match", ("issuer", "owner", "tag", "domain"))
        if not match:
            raise reader.fail(match_node, f"{what}'s match needs issuer, owner, tag or domain")
        issuer = None
        if "issuer" in match:
            issuer = reader.text(match["issuer"][1], f"{what}'s issuer").lower()
            if issuer not in ("public", "private"):
                raise reader.fail(match["issuer"][1], f"{what}'s issuer {issuer!r} must be public or private")
        owner = reader.text(match["owner"][1], f"{what}'s owner") if "owner" in match else None
        tag = _tag(reader, match["tag"][1], f"{what}'s tag") if "tag" in match else None
        domain = _domain(reader, match["domain"][1], f"{what}'s domain") if "domain" in match else None
        overrides = _overrides(reader, entry["rules"][1], f"{what}'s rules", what)
        if not overrides:
            raise reader.fail(entry["rules"][1], f"{what}'s rules are empty: name the rules it refines")
        for override, value in overrides:
            _checked(reader, override, rules[override.rule], value, f"rule {override.rule} in {what}")
        scopes.append(PolicyScope(name, tuple(o for o, _ in overrides), issuer, owner, tag, domain, line_of(item)))
    return tuple(scopes)


def _ownership(reader: YamlReader, node: yaml.Node) -> tuple[OwnershipRule, ...]:
    rules = []
    for index, item in enumerate(reader.sequence(node, "ownership")):
        what = f"ownership rule {index + 1}"
        entry = reader.mapping(item, what, ("match", "owner"), required=("owner",))
        owner = reader.text(entry["owner"][1], f"{what}'s owner")
        criteria: dict[str, Any] = {}
        if "match" in entry:
            match_node = entry["match"][1]
            match = reader.mapping(match_node, f"{what}'s match", ("domain", "locator", "source", "tag"))
            if not match:
                raise reader.fail(match_node, f"{what}'s match needs domain, locator, source or tag (leave match "
                                              "out to give every remaining certificate this owner)")
            if "domain" in match:
                criteria["domain"] = _domain(reader, match["domain"][1], f"{what}'s domain")
            for key in ("locator", "source"):
                if key in match:
                    criteria[key] = _glob(reader, match[key][1], f"{what}'s {key}")
            if "tag" in match:
                criteria["tag"] = _tag(reader, match["tag"][1], f"{what}'s tag")
        rules.append(OwnershipRule(owner, line=line_of(item), **criteria))
    return tuple(rules)


def parse_policy(text: str, source: str = "policy") -> Policy:
    """The policy ``text`` describes (see the module docstring); PolicyFileError naming ``source``, the
    line and the problem otherwise."""
    reader = YamlReader(source)
    root = reader.document(text)
    found = reader.mapping(root, "the policy", ("rules", "scopes", "issuers", "ownership"))
    rules = dict(_DEFAULT_RULES)
    if "rules" in found:
        for override, value in _overrides(reader, found["rules"][1], "rules"):
            rules[override.rule] = _checked(reader, override, rules[override.rule], value, f"rule {override.rule}")
    scopes = _scopes(reader, found["scopes"][1], rules) if "scopes" in found else ()
    private: tuple[str, ...] = ()
    if "issuers" in found:
        issuers = reader.mapping(found["issuers"][1], "issuers", ("private",), required=("private",))
        private = _globs(reader, issuers["private"][1], "issuers' private", spaces=True)
    ownership = _ownership(reader, found["ownership"][1]) if "ownership" in found else ()
    return Policy(source, hashlib.sha256(text.encode()).hexdigest(), text, ownership, rules, scopes, private)


# ------------------------------------------------------------------------------------------ loading

def policy_location(settings: Settings) -> str:
    """Where the policy comes from: CERTPILOT_POLICY as given (a path or block:<name>), else the
    home's policy.yaml (which may not exist: then the built-in policy is in force)."""
    return settings.policy or str(settings.home / "policy.yaml")


def load_policy(settings: Settings | None = None, read_block: Callable[[str], str] | None = None) -> Policy:
    """The policy in force: CERTPILOT_POLICY=block:<name> reads the YAML with ``read_block(name)``;
    CERTPILOT_POLICY=<path> that file, which must exist; unset, $CERTPILOT_HOME/policy.yaml when it
    exists, else DEFAULT_POLICY. PolicyFileError for a malformed policy, PermanentError naming what is
    missing otherwise."""
    settings = settings or load_settings()
    if settings.policy and settings.policy.startswith("block:"):
        name = settings.policy.removeprefix("block:").strip()
        if not name:
            raise PermanentError("CERTPILOT_POLICY=block: names no block; use block:<name>")
        if read_block is None:
            raise PermanentError(f"CERTPILOT_POLICY names the policy block {name!r}, which cannot be read here "
                                 "(no Prefect block reader): set CERTPILOT_POLICY to a file instead")
        try:
            text = read_block(name)
        except CertpilotError:
            raise
        except Exception as exc:  # the block layer's own failure: named, not a traceback
            raise PermanentError(f"policy block {name!r} (CERTPILOT_POLICY) cannot be read: {redact(exc)}") from None
        return parse_policy(text, f"block:{name}")
    path = Path(settings.policy).expanduser() if settings.policy else settings.home / "policy.yaml"
    if not path.exists():
        if settings.policy:
            raise PermanentError(f"policy file {path} (CERTPILOT_POLICY) does not exist")
        return DEFAULT_POLICY
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PermanentError(f"policy file {path} cannot be read: {exc}") from None
    return parse_policy(text, str(path))


class PolicyViolationError(PermanentError):
    """The issuance gate's refusal: ``what`` (a managed certificate, a CSR) breaks ``violations``."""

    def __init__(self, what: str, violations: Sequence[Violation]) -> None:
        self.what = what
        self.violations = tuple(violations)
        reasons = "; ".join(f"{v.rule}: {v.detail}" for v in self.violations) or "no reason given"
        super().__init__(f"policy refuses {what}: {reasons}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.violations))
