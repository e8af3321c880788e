"""DNS names and IP addresses as certpilot accepts them, and RFC 6125 matching of a certificate to a name.

One rule for every place a name is typed, certified or checked: a managed certificate's names, the
private CA's SANs, TLS scan targets and SNI names, the hostname a deployment is verified against.

A DNS name (``normalise_dns_name``):

- surrounding white space and one trailing dot (the root) are dropped; letters are lower-cased;
- a name with non-ASCII characters is mapped by UTS #46 and its U-labels become A-labels by IDNA 2008
  (``Bücher.example`` -> ``xn--bcher-kva.example``); an ASCII ``xn--`` label must be a valid A-label;
- every label is 1 to 63 letters, digits and hyphens, neither starting nor ending with a hyphen: the
  host name syntax of RFC 1123 and RFC 5280's "preferred name syntax" for a dNSName. No underscore:
  RFC 5280 and the CA/B Forum Baseline Requirements (7.1.4.2) forbid it in a certificate, no public CA
  issues one, and a name no certificate can carry is refused where it is typed rather than at issuance
  (a host whose DNS name has an underscore is scanned by its address);
- the whole name is at most 253 characters in A-label form;
- a wildcard only where one is allowed (``wildcard=True``: names to certify, SANs to match), only as
  the whole left-most label, and only over at least two labels: ``*.example.com``, never ``*.com``,
  ``f*.example.com`` or ``www.*.example.com``.

An IP address (``normalise_ip_address``): IPv4 in dotted-quad form or IPv6 in any RFC 4291 form, IPv6
optionally in brackets (``[::1]``), without a zone index (``%eth0``: a certificate cannot carry one);
returned in the ``ipaddress`` module's canonical text (``2001:DB8:0::1`` -> ``2001:db8::1``).

Hostname matching (``check_hostname``, RFC 6125 / RFC 9525): a DNS name is compared with the
certificate's DNS SANs, both normalised as above; a wildcard SAN matches exactly one left-most label
(``*.a.b`` matches ``x.a.b``, not ``a.b`` nor ``y.x.a.b``); SANs that break the rule (``*.com``,
``f*.part.test``) match nothing. An IP address is compared with IP SANs only. The subject CN is never used.
"""

from __future__ import annotations

import ipaddress
import re

import idna
from cryptography import x509
from cryptography.x509.oid import NameOID

from certpilot.errors import InvalidDnsNameError, InvalidIpAddressError

__all__ = ["MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "IPAddress", "check_hostname", "is_ip_address", "matches",
           "normalise_dns_name", "normalise_ip_address", "parse_ip_address"]

MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253  # without the trailing dot
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise_dns_name(name: str, *, wildcard: bool = False) -> str:
    """``name`` in the one form certpilot stores and compares (see the module docstring); raises
    InvalidDnsNameError (a PermanentError and a ValueError) saying what is wrong with it."""
    text = name.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    if not text:
        raise InvalidDnsNameError(name, "it is empty")
    prefix = ""
    if text.startswith("*."):
        if not wildcard:
            raise InvalidDnsNameError(name, "a wildcard is not allowed here")
        prefix, text = "*.", text[2:]
    if "*" in text:
        raise InvalidDnsNameError(name, "a wildcard may only be the whole left-most label ('*.')")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise InvalidDnsNameError(name, f"not a valid internationalised name ({exc})") from None
    text = text.lower()
    labels = text.split(".")
    if prefix and len(labels) < 2:
        raise InvalidDnsNameError(name, "a wildcard must stand over at least two labels (*.example.com)")
    text = prefix + text
    for label in labels:
        _check_label(name, label)
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidDnsNameError(name, f"{len(text)} characters, more than the {MAX_NAME_LENGTH} a name may have")
    return text


def _check_label(name: str, label: str) -> None:
    if not label:
        raise InvalidDnsNameError(name, "it has an empty label")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidDnsNameError(name, f"label {label[:20]}... has {len(label)} characters, more than "
                                        f"{MAX_LABEL_LENGTH}")
    if not _LDH_LABEL.fullmatch(label):
        raise InvalidDnsNameError(name, f"label {label!r} is not letters, digits and inner hyphens")
    if label.startswith("xn--"):
        try:
            idna.decode(label)
        except (idna.IDNAError, UnicodeError):
            raise InvalidDnsNameError(name, f"label {label!r} is not a valid A-label") from None


def parse_ip_address(text: str) -> IPAddress | None:
    """The address ``text`` holds (IPv6 optionally in brackets), or None when it is not an IP address."""
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
        if ":" not in value:
            return None  # brackets are for IPv6 only
    if "%" in value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def is_ip_address(text: str) -> bool:
    return parse_ip_address(text) is not None


def normalise_ip_address(text: str) -> str:
    """``text`` as the canonical text of its IP address; raises InvalidIpAddressError."""
    address = parse_ip_address(text)
    if address is None:
        reason = ("a zone index (%) cannot be in a certificate" if "%" in text
                  else "neither a dotted-quad IPv4 nor an IPv6 address")
        raise InvalidIpAddressError(text, reason)
    return str(address)


def matches(pattern: str, host: str) -> bool:
    """True when the normalised SAN ``pattern`` (possibly ``*.``) covers the normalised DNS name ``host``."""
    if host.startswith("*"):
        return False  # a host is never a wildcard
    if pattern == host:
        return True
    if not pattern.startswith("*."):
        return False
    first, _, rest = host.partition(".")
    return bool(first) and rest == pattern[2:]


def check_hostname(cert: x509.Certificate, hostname: str) -> str | None:
    """None when ``hostname`` (a DNS name or an IP address) matches the certificate's subjectAltName,
    else why not (see the module docstring for the rules)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        shown = f" (CN={cn[0].value!s} is not used)" if cn else ""
        return f"hostname {hostname} not in SANs []: the certificate has no subjectAltName{shown}"
    except ValueError as exc:
        return f"the certificate's subjectAltName cannot be parsed: {exc}"
    dns_names = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    shown = "[" + ", ".join([*dns_names, *(str(i) for i in ips)]) + "]"
    address = parse_ip_address(hostname)
    if address is not None:
        if address in ips:
            return None
        return f"IP address {address} not in SANs {shown}"
    try:
        host = normalise_dns_name(hostname)
    except InvalidDnsNameError:
        return f"hostname {hostname!r} is not a valid DNS name"
    for name in dns_names:
        try:
            pattern = normalise_dns_name(name, wildcard=True)
        except InvalidDnsNameError:
            continue  # a SAN that breaks the rules matches nothing
        if matches(pattern, host):
            return None
    return f"hostname {hostname} not in SANs {shown}"
