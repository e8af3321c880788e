"""The published rate limits of public CAs, and the registered domain a name counts against.

Only what a campaign needs to say before it starts whether it fits a CA's budget: Let's Encrypt's
production and staging defaults (https://letsencrypt.org/docs/rate-limits/), looked up by the ACME
directory's host. A CA certpilot does not know (a private CA, pebble, another ACME CA) has no known
limits: ``limits_for`` gives None. The registered domain is an approximation of the Public Suffix List
(the last two labels, three under a common two-level public suffix such as co.uk), enough to group a
fleet's names; no list is downloaded.

No Prefect, no network here.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from certpilot.names import is_ip_address, normalise_ip_address

__all__ = ["LETS_ENCRYPT", "LETS_ENCRYPT_STAGING", "RateLimits", "limits_for", "registered_domain"]


@dataclass(frozen=True)
class RateLimits:
    """A CA's limits; None: no such limit (or not published)."""

    name: str
    new_orders_per_account_per_3h: int | None
    certificates_per_registered_domain_per_week: int | None
    duplicate_certificates_per_week: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


LETS_ENCRYPT = RateLimits("Let's Encrypt", 300, 50, 5)
LETS_ENCRYPT_STAGING = RateLimits("Let's Encrypt (staging)", 1500, 30000, 30000)
_BY_HOST = {"acme-v02.api.letsencrypt.org": LETS_ENCRYPT,
            "acme-staging-v02.api.letsencrypt.org": LETS_ENCRYPT_STAGING}

# Second-level labels under which registrations are made a level down (a subset of the Public Suffix List).
TWO_LEVEL_SUFFIXES = frozenset({
    "ac.uk", "co.uk", "gov.uk", "ltd.uk", "me.uk", "net.uk", "nhs.uk", "org.uk", "plc.uk", "sch.uk",
    "asn.au", "com.au", "edu.au", "gov.au", "id.au", "net.au", "org.au",
    "ac.nz", "co.nz", "geek.nz", "govt.nz", "net.nz", "org.nz",
    "ac.jp", "co.jp", "go.jp", "ne.jp", "or.jp",
    "ac.za", "co.za", "gov.za", "org.za", "web.za",
    "com.br", "net.br", "org.br", "gov.br",
    "co.in", "firm.in", "gen.in", "ind.in", "net.in", "org.in",
    "com.cn", "net.cn", "org.cn", "gov.cn",
    "com.mx", "org.mx", "com.ar", "com.tr", "com.sg", "com.hk", "com.tw", "com.my", "com.ph", "com.vn",
    "co.kr", "or.kr", "co.il", "org.il", "co.id", "or.id", "co.th", "in.th", "com.ua", "com.pl", "com.es",
})


def limits_for(directory_url: str | None) -> RateLimits | None:
    """The published limits of the CA at this ACME directory URL; None for a CA whose limits are not known."""
    if not directory_url:
        return None
    host = (urllib.parse.urlsplit(directory_url).hostname or "").lower()
    return _BY_HOST.get(host)


def registered_domain(name: str) -> str:
    """The domain ``name`` is registered under: the last two labels, three when the last two are a common
    two-level public suffix (``www.shop.example.co.uk`` -> ``example.co.uk``). A wildcard counts as the name
    it stands over; an IP address is itself."""
    text = name.strip().lower().rstrip(".")
    if is_ip_address(text):
        return normalise_ip_address(text)
    text = text.removeprefix("*.")
    labels = [label for label in text.split(".") if label]
    if len(labels) >= 3 and ".".join(labels[-2:]) in TWO_LEVEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])
