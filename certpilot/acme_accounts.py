"""ACME accounts in the inventory: one per (directory URL, issuer name), registered once and reused.

The account's private key lives in the keystore, sealed like every other key; the AcmeAccount row
holds the account URL the CA gave us and refers to the key by id. Registration itself is network
work and happens in connectors/acme_issuer.py; these functions only read and record.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import Session, select

from certpilot import audit
from certpilot.clock import utcnow
from certpilot.errors import NotFoundError
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRef, KeyRing, store_private_key
from certpilot.models import AcmeAccount

# What ACME CAs accept for account keys (JWS ES256, ES384, RS256); ed25519 is not widely supported.
ACCOUNT_KEY_ALGORITHMS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
KEY_ORIGIN = "acme-account"


@dataclass(frozen=True)
class AccountRecord:
    """An account as stored: where it lives at the CA and which stored key signs for it."""

    id: int
    name: str
    directory_url: str
    account_url: str
    key: KeyRef
    contact: tuple[str, ...]
    eab_key_id: str | None


def _record(row: AcmeAccount) -> AccountRecord:
    assert row.id is not None
    return AccountRecord(row.id, row.name, row.directory_url, row.account_url, KeyRef(row.key_id),
                         tuple(row.contact), row.eab_key_id)


def generate_account_key(algorithm: str = "ec-p256") -> PrivateKeyTypes:
    if algorithm not in ACCOUNT_KEY_ALGORITHMS:
        raise ValueError(f"ACME account keys are one of {', '.join(ACCOUNT_KEY_ALGORITHMS)}, not {algorithm!r}")
    key = generate_private_key(algorithm)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    return key


def find_account(session: Session, directory_url: str, name: str) -> AccountRecord | None:
    row = session.exec(select(AcmeAccount).where(AcmeAccount.directory_url == directory_url,
                                                 AcmeAccount.name == name)).first()
    return _record(row) if row else None


def record_account(session: Session, *, name: str, directory_url: str, account_url: str, key: PrivateKeyTypes,
                   ring: KeyRing, actor: audit.Actor, contact: Sequence[str] = (), eab_key_id: str | None = None,
                   now: dt.datetime | None = None) -> AccountRecord:
    """Seal the account key into the keystore and record the account, in the caller's transaction.
    Call it inside a write session after checking find_account in that same session."""
    now = now or utcnow()
    ref = store_private_key(session, key, ring, actor, KEY_ORIGIN, now)
    row = AcmeAccount(name=name, directory_url=directory_url, account_url=account_url, key_id=ref.id,
                      contact=list(contact), eab_key_id=eab_key_id, created_at=now)
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("acme_account.registered", f"acme_account:{row.id}",
                                               {"name": name, "directory_url": directory_url,
                                                "account_url": account_url, "key": str(ref),
                                                "contact": list(contact), "eab_key_id": eab_key_id})], now)
    return _record(row)


def update_account_url(session: Session, record: AccountRecord, account_url: str, actor: audit.Actor,
                       now: dt.datetime | None = None) -> AccountRecord:
    """The CA forgot the account (a reset test CA, a deactivation) and the same key registered anew."""
    row = session.get(AcmeAccount, record.id)
    if row is None:
        raise NotFoundError(f"acme_account:{record.id} no longer exists")
    previous, row.account_url = row.account_url, account_url
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("acme_account.reregistered", f"acme_account:{row.id}",
                                               {"from": previous, "to": account_url})], now)
    return _record(row)
