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

A URI name (``normalise_uri``, a uniformResourceIdentifier SAN): an absolute URI (RFC 3986 scheme, then
a scheme-specific part; RFC 5280 4.2.1.6), printable ASCII without spaces, at most 2048 bytes. A SPIFFE
ID (``spiffe://`` scheme) must follow the SPIFFE ID standard: the scheme in lower case; a trust domain
of lower-case letters, digits, '.', '-' and '_' (at most 255); no userinfo, port, query or fragment;
a path (optional) of segments of letters, digits, '.', '-' and '_', none empty, '.' or '..', and no
trailing '/'. URIs are compared exactly as given (a SPIFFE path is case-sensitive).

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

from certpilot.errors import InvalidDnsNameError, InvalidIpAddressError, InvalidUriError

__all__ = ["MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "MAX_URI_LENGTH", "IPAddress", "check_hostname", "is_ip_address",
           "is_spiffe_id", "matches", "normalise_dns_name", "normalise_ip_address", "normalise_uri",
           "parse_ip_address", "uri_host"]

MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253  # without the trailing dot
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")

MAX_URI_LENGTH = 2048  # bytes: the SPIFFE ID standard's limit (2.3), applied to every URI name
MAX_TRUST_DOMAIN_LENGTH = 255
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")

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


def is_spiffe_id(uri: str) -> bool:
    """Whether ``uri`` claims to be a SPIFFE ID (its scheme is spiffe, in any case)."""
    return uri.strip().lower().startswith("spiffe:")


def normalise_uri(uri: str) -> str:
    """``uri`` as a certificate's URI name (surrounding white space dropped, nothing else changed);
    raises InvalidUriError saying what is wrong (see the module docstring for the rules)."""
    text = uri.strip()
    if not text:
        raise InvalidUriError(uri, "it is empty")
    if not text.isascii() or any(c <= " " or c == "\x7f" for c in text):
        raise InvalidUriError(uri, "only printable ASCII without spaces (percent-encode anything else, RFC 3986)")
    if len(text.encode()) > MAX_URI_LENGTH:
        raise InvalidUriError(uri, f"{len(text.encode())} bytes, more than the {MAX_URI_LENGTH} a URI name may have")
    scheme, colon, rest = text.partition(":")
    if not colon or not _URI_SCHEME.fullmatch(scheme):
        raise InvalidUriError(uri, "not an absolute URI: it needs a scheme (letters, digits, '+', '-', '.', "
                                   "starting with a letter) and ':', e.g. spiffe://prod.example/ns/api/sa/web")
    if not rest or rest == "//":
        raise InvalidUriError(uri, f"nothing follows {scheme}: (RFC 5280 4.2.1.6 wants a scheme-specific part)")
    if scheme.lower() == "spiffe":
        _check_spiffe_id(uri, scheme, rest)
    return text


def _check_spiffe_id(uri: str, scheme: str, rest: str) -> None:
    def bad(reason: str) -> InvalidUriError:
        return InvalidUriError(uri, f"not a SPIFFE ID: {reason}")

    if scheme != "spiffe":
        raise bad(f"the scheme must be 'spiffe' in lower case, not {scheme!r}")
    if not rest.startswith("//"):
        raise bad("it must start with spiffe:// and a trust domain")
    if "#" in rest:
        raise bad("a fragment ('#') is not allowed")
    if "?" in rest:
        raise bad("a query ('?') is not allowed")
    authority, slash, path = rest[2:].partition("/")
    if not authority:
        raise bad("the trust domain is empty")
    if "@" in authority:
        raise bad("userinfo ('user@') is not allowed in the trust domain")
    if ":" in authority:
        raise bad("a port (':') is not allowed in the trust domain")
    if len(authority) > MAX_TRUST_DOMAIN_LENGTH:
        raise bad(f"the trust domain has {len(authority)} characters, more than {MAX_TRUST_DOMAIN_LENGTH}")
    if not _TRUST_DOMAIN.fullmatch(authority):
        wrong = sorted({c for c in authority if not _TRUST_DOMAIN.fullmatch(c)})
        raise bad(f"trust domain {authority!r} has {''.join(wrong)!r}: use lower-case letters, digits, '.', '-' "
                  "and '_'")
    if not slash:
        return  # a trust domain's own ID (spiffe://prod.example)
    segments = path.split("/")
    for index, segment in enumerate(segments):
        if segment == "":
            raise bad("the path ends with '/'" if index == len(segments) - 1 else "the path has an empty segment ('//')")
        if segment in (".", ".."):
            raise bad(f"the path has a {segment!r} segment (relative path segments are not allowed)")
        if not _SPIFFE_SEGMENT.fullmatch(segment):
            wrong = sorted({c for c in segment if not _SPIFFE_SEGMENT.fullmatch(c)})
            raise bad(f"path segment {segment!r} has {''.join(wrong)!r}: use letters, digits, '.', '-' and '_'")


def uri_host(uri: str) -> str | None:
    """The host of ``uri``'s authority (lower-cased, without userinfo or port), or None when it has none
    (a URI name constraint applies to the host, RFC 5280 4.2.1.10)."""
    _, colon, rest = uri.partition(":")
    if not colon or not rest.startswith("//"):
        return None
    authority = rest[2:]
    for stop in "/?#":
        authority = authority.split(stop, 1)[0]
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    else:
        host = host.split(":", 1)[0]
    return host.lower() or None


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
