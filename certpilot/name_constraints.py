"""Name constraints on a private CA's issuing certificate (RFC 5280 4.2.1.10), and the check the CA
makes before it signs.

A CA created with constraints (``certpilot ca init --permit-dns/--exclude-dns/--permit-uri/--permit-ip``)
carries them as a critical NameConstraints extension on its issuing certificate, so every relying
party that checks name constraints refuses a leaf outside them even if the issuing key signed one;
certpilot's CA refuses to sign such a leaf in the first place (``outside``), naming each name and the
constraints it breaks.

The rules, per name type (a type with no permitted subtree is not limited by permitted subtrees):

- DNS (dNSName): ``example.com`` covers example.com and every name under it (RFC 5280: labels added on
  the left). A wildcard SAN ``*.a.example.com`` is inside a permitted subtree when a.example.com is,
  and is refused by an excluded subtree it could match (``x.a.example.com``, or one covering
  a.example.com).
- URI (uniformResourceIdentifier): the constraint applies to the URI's host: ``prod.example`` is that
  host only (a SPIFFE trust domain), ``.example`` every host under example. A URI with no host (urn:...)
  is outside any permitted URI subtree.
- IP (iPAddress): a network (CIDR); an address must be inside one of the permitted networks, IPv4 and
  IPv6 alike.

Excluded subtrees win over permitted ones. No network, no Prefect.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from certpilot.errors import InvalidDnsNameError, PermanentError
from certpilot.names import normalise_dns_name, uri_host

__all__ = ["NameConstraintSpec", "describe", "of_certificate", "outside", "parse"]


@dataclass(frozen=True)
class NameConstraintSpec:
    """What a new CA's issuing certificate is limited to: DNS subtrees permitted and excluded, URI hosts or
    domains permitted, IP networks permitted (each normalised)."""

    permitted_dns: tuple[str, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    permitted_uri: tuple[str, ...] = ()
    permitted_ip: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.permitted_dns or self.excluded_dns or self.permitted_uri or self.permitted_ip)

    def extension(self) -> x509.NameConstraints | None:
        """The NameConstraints extension value, or None when there is no constraint."""
        if self.empty:
            return None
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.permitted_dns]
        permitted += [x509.UniformResourceIdentifier(u) for u in self.permitted_uri]
        permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.permitted_ip]
        excluded: list[x509.GeneralName] = [x509.DNSName(d) for d in self.excluded_dns]
        return x509.NameConstraints(permitted_subtrees=permitted or None, excluded_subtrees=excluded or None)


def _dns_subtree(value: str, flag: str) -> str:
    text = value.strip()
    if text.startswith("."):
        raise PermanentError(f"{flag} {value!r}: a DNS name constraint covers the name and every name under it; "
                             f"give {text.lstrip('.')!r}, without the leading '.'")
    try:
        return normalise_dns_name(text)
    except InvalidDnsNameError as exc:
        raise PermanentError(f"{flag} {value!r}: {exc.reason}") from None


def _uri_subtree(value: str, flag: str) -> str:
    text = value.strip()
    if "://" in text or "/" in text:
        raise PermanentError(f"{flag} {value!r}: a URI name constraint is a host (prod.example: a SPIFFE trust "
                             "domain) or a domain with a leading '.' (.example: every host under it), not a URI "
                             "(RFC 5280 4.2.1.10)")
    domain = text.startswith(".")
    try:
        host = normalise_dns_name(text[1:] if domain else text)
    except InvalidDnsNameError as exc:
        raise PermanentError(f"{flag} {value!r}: {exc.reason} (a URI constraint is a fully qualified domain "
                             "name)") from None
    return "." + host if domain else host


def _ip_subtree(value: str, flag: str) -> str:
    text = value.strip()
    if "/" not in text:
        raise PermanentError(f"{flag} {value!r}: give a network in CIDR form, e.g. 10.0.0.0/8 or 10.1.2.3/32")
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        raise PermanentError(f"{flag} {value!r}: not a network in CIDR form ({exc})") from None


def parse(permit_dns: Iterable[str] = (), exclude_dns: Iterable[str] = (), permit_uri: Iterable[str] = (),
          permit_ip: Iterable[str] = ()) -> NameConstraintSpec:
    """Constraints as given on the command line, validated and normalised; PermanentError naming the flag
    and the value that is wrong."""
    return NameConstraintSpec(
        tuple(dict.fromkeys(_dns_subtree(v, "--permit-dns") for v in permit_dns)),
        tuple(dict.fromkeys(_dns_subtree(v, "--exclude-dns") for v in exclude_dns)),
        tuple(dict.fromkeys(_uri_subtree(v, "--permit-uri") for v in permit_uri)),
        tuple(dict.fromkeys(_ip_subtree(v, "--permit-ip") for v in permit_ip)))


def of_certificate(certificate: x509.Certificate) -> x509.NameConstraints | None:
    """The certificate's NameConstraints, or None when it has none."""
    try:
        return certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def describe(constraints: x509.NameConstraints | None) -> dict[str, list[str]]:
    """The constraints as plain lists (the --json shape): permitted_dns, excluded_dns, permitted_uri,
    excluded_uri, permitted_ip, excluded_ip (empty lists when none)."""
    out: dict[str, list[str]] = {f"{which}_{kind}": [] for which in ("permitted", "excluded")
                                 for kind in ("dns", "uri", "ip")}
    if constraints is None:
        return out
    for which, subtrees in (("permitted", constraints.permitted_subtrees), ("excluded", constraints.excluded_subtrees)):
        for general in subtrees or ():
            if isinstance(general, x509.DNSName):
                out[f"{which}_dns"].append(general.value)
            elif isinstance(general, x509.UniformResourceIdentifier):
                out[f"{which}_uri"].append(general.value)
            elif isinstance(general, x509.IPAddress):
                out[f"{which}_ip"].append(str(general.value))
    return out


# ------------------------------------------------------------------------------------------ matching

def _in_dns_subtree(name: str, subtree: str) -> bool:
    """Whether the DNS name (not a wildcard) is the subtree's name or a name under it."""
    name, subtree = name.lower().rstrip("."), subtree.lower().rstrip(".")
    if not subtree:
        return True
    if subtree.startswith("."):  # some CAs write a leading dot: names under it only
        return name.endswith(subtree)
    return name == subtree or name.endswith("." + subtree)


def _dns_permitted(name: str, subtree: str) -> bool:
    if name.startswith("*."):  # every name it matches (one label over its base) is under the subtree
        return _in_dns_subtree(name[2:], subtree.lstrip("."))
    return _in_dns_subtree(name, subtree)


def _dns_excluded(name: str, subtree: str) -> bool:
    if name.startswith("*."):  # refused when any name it matches (one label over its base) is excluded
        base = name[2:]
        return _in_dns_subtree(base, subtree.lstrip(".")) or (
            not subtree.startswith(".") and subtree.lower().partition(".")[2] == base)
    return _in_dns_subtree(name, subtree)


def _uri_matches(uri: str, subtree: str) -> bool:
    host = uri_host(uri)
    if host is None:
        return False
    subtree = subtree.lower()
    return host.endswith(subtree) if subtree.startswith(".") else host == subtree


def _ip_matches(address: Any, network: Any) -> bool:
    return isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network) and address.version == network.version \
        and address in network


def _value(general: x509.GeneralName) -> str:
    return str(general.value)


def outside(constraints: x509.NameConstraints | None, names: Sequence[x509.GeneralName]) -> list[str]:
    """Why each of ``names`` that breaks ``constraints`` does (one line per name); [] when all are inside."""
    if constraints is None:
        return []
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    problems: list[str] = []
    for general in names:
        kind: type[x509.GeneralName]
        if isinstance(general, x509.DNSName):
            kind, label = x509.DNSName, "DNS name"
            name = general.value.lower()
            inside = lambda s: _dns_permitted(name, s.value)  # noqa: E731
            hit = lambda s: _dns_excluded(name, s.value)  # noqa: E731
        elif isinstance(general, x509.UniformResourceIdentifier):
            kind, label = x509.UniformResourceIdentifier, "URI"
            uri = general.value
            inside = hit = lambda s: _uri_matches(uri, s.value)  # noqa: E731
        elif isinstance(general, x509.IPAddress):
            kind, label = x509.IPAddress, "IP address"
            address = general.value
            inside = hit = lambda s: _ip_matches(address, s.value)  # noqa: E731
        else:
            continue  # a type the CA puts no constraint on
        blocking = [_value(s) for s in excluded if isinstance(s, kind) and hit(s)]
        if blocking:
            problems.append(f"{label} {_value(general)} is in the excluded subtree {', '.join(blocking)}")
            continue
        allowed = [s for s in permitted if isinstance(s, kind)]
        if allowed and not any(inside(s) for s in allowed):
            why = " (it has no host)" if kind is x509.UniformResourceIdentifier and uri_host(_value(general)) is None \
                else ""
            problems.append(f"{label} {_value(general)}{why} is outside the permitted "
                            f"{label.split()[0] if kind is not x509.IPAddress else 'IP'} subtrees "
                            f"{', '.join(_value(s) for s in allowed)}")
    return problems
