"""Where each private key lives and what uses it (``certpilot keys list``), never its bytes.

A keystore key is described from its row alone: algorithm, size or curve, the SHA-256 of its public
key, origin and dates, and the master key that seals its data key with that master key's source (an
environment variable, a file, or a KMS key), named without opening it: no ciphertext, data key or
master key is read for a listing, and no KMS is called, so it works during a KMS outage.

What uses a key: the certificates that carry its public key, the private CA that holds it as its root
or issuing key, the ACME account it signs for.

Keys held in a PKCS#11 token are not in the keystore: they are listed as ``ListedKey(store="token",
...)`` by whoever reads the token records (see ``TOKEN_STORE``), with ``uses_of`` for their uses.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from certpilot.keystore import MasterKeySource, master_key_sources
from certpilot.models import AcmeAccount, Certificate, CertificateAuthority, PrivateKey
from certpilot.settings import Settings

KEYSTORE_STORE = "keystore"  # sealed in the inventory database under a master key
TOKEN_STORE = "token"  # made and kept on a PKCS#11 token (the private CA's issuing key): listed beside
_BATCH = 500
_EC_CURVES = {"p256": (256, "secp256r1"), "p384": (384, "secp384r1"), "p521": (521, "secp521r1")}


@dataclass(frozen=True)
class KeyUse:
    """One thing that uses a key: ``kind`` certificate (``id`` its SHA-256 fingerprint, ``label`` its
    subject), ca-root or ca-issuing (``id`` the CA's name), acme-account (``id`` the account's name)."""

    kind: str
    id: str
    label: str = ""

    def __str__(self) -> str:
        if self.kind == "certificate":
            return f"certificate {self.id[:16]} ({self.label})" if self.label else f"certificate {self.id[:16]}"
        return f"{self.kind} {self.id}"


@dataclass(frozen=True)
class ListedKey:
    """A private key as ``keys list`` shows it. ``store``: KEYSTORE_STORE or TOKEN_STORE. Keystore keys
    carry ``master_key_id`` and ``master_key`` (None when that master key is not configured here);
    token keys carry ``token`` (which token and key, never a PIN)."""

    ref: str
    store: str
    algorithm: str
    key_size: int | None
    curve: str | None
    spki_sha256: str
    created_at: dt.datetime
    origin: str | None = None
    destroyed_at: dt.datetime | None = None
    used_by: tuple[KeyUse, ...] = ()
    master_key_id: str | None = None
    master_key: MasterKeySource | None = None
    token: str | None = None

    def as_json(self) -> dict[str, Any]:
        source = self.master_key
        return {"ref": self.ref, "store": self.store, "algorithm": self.algorithm, "key_size": self.key_size,
                "curve": self.curve, "spki_sha256": self.spki_sha256, "origin": self.origin,
                "created_at": iso(self.created_at), "destroyed_at": iso(self.destroyed_at),
                "used_by": [{"kind": u.kind, "id": u.id, "label": u.label} for u in self.used_by],
                "master_key_id": self.master_key_id, "master_key_source": source.kind if source else None,
                "master_key_where": source.where if source else None,
                "master_key_file": str(source.file) if source and source.file else None, "token": self.token}


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def size_and_curve(algorithm: str) -> tuple[int | None, str | None]:
    """``rsa-3072`` -> (3072, None); ``ec-p256`` -> (256, "secp256r1"); ``ed25519`` -> (256, None); an
    algorithm with neither (ML-DSA names its parameter set) -> (None, None)."""
    if match := re.fullmatch(r"rsa-(\d+)", algorithm):
        return int(match.group(1)), None
    if algorithm.startswith("ec-"):
        name = algorithm.removeprefix("ec-")
        return _EC_CURVES.get(name, (None, name))
    if algorithm == "ed25519":
        return 256, None
    return None, None


def _batches(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _BATCH):
        yield values[start:start + _BATCH]


def uses_of(session: Session, spki_sha256s: Iterable[str], key_ids: Iterable[str] = ()) -> dict[str, list[KeyUse]]:
    """What uses each key, by public key hash (certificates) and, for keystore keys, by key id (CAs and
    ACME accounts). Keyed by SPKI hash and by key id respectively, each in a stable order."""
    spkis, ids = sorted(set(spki_sha256s)), sorted(set(key_ids))
    uses: dict[str, list[KeyUse]] = {}
    for batch in _batches(spkis):
        rows = session.exec(select(Certificate.spki_sha256, Certificate.fingerprint_sha256, Certificate.subject)
                            .where(col(Certificate.spki_sha256).in_(batch))
                            .order_by(col(Certificate.not_before), col(Certificate.fingerprint_sha256))).all()
        for spki, fingerprint, subject in rows:
            uses.setdefault(spki or "", []).append(KeyUse("certificate", fingerprint, subject))
    for batch in _batches(ids):
        for name, root, issuing in session.exec(
                select(CertificateAuthority.name, CertificateAuthority.root_key_id, CertificateAuthority.issuing_key_id)
                .where(col(CertificateAuthority.root_key_id).in_(batch) | col(CertificateAuthority.issuing_key_id)
                       .in_(batch)).order_by(col(CertificateAuthority.name))).all():
            for key_id, kind in ((root, "ca-root"), (issuing, "ca-issuing")):
                if key_id is not None and key_id in batch:
                    uses.setdefault(key_id, []).append(KeyUse(kind, name))
        for name, key_id in session.exec(select(AcmeAccount.name, AcmeAccount.key_id)
                                         .where(col(AcmeAccount.key_id).in_(batch))
                                         .order_by(col(AcmeAccount.name))).all():
            uses.setdefault(key_id, []).append(KeyUse("acme-account", name))
    return uses


def keystore_keys(session: Session, settings: Settings) -> list[ListedKey]:
    """Every key the keystore holds or held (destroyed ones too), oldest first; no key material is read."""
    k = PrivateKey
    rows = session.execute(sa.select(col(k.id), col(k.algorithm), col(k.spki_sha256), col(k.origin),
                                     col(k.master_key_id), col(k.created_at), col(k.destroyed_at))
                           .order_by(col(k.created_at), col(k.id))).all()
    sources = {s.id: s for s in reversed(master_key_sources(settings))}  # the first source of an id wins
    uses = uses_of(session, [r[2] for r in rows], [r[0] for r in rows])
    listed = []
    for key_id, algorithm, spki, origin, master_key_id, created_at, destroyed_at in rows:
        size, curve = size_and_curve(algorithm)
        listed.append(ListedKey(
            ref=f"key:{key_id}", store=KEYSTORE_STORE, algorithm=algorithm, key_size=size, curve=curve,
            spki_sha256=spki, created_at=created_at, origin=origin, destroyed_at=destroyed_at,
            used_by=(*uses.get(key_id, ()), *uses.get(spki, ())), master_key_id=master_key_id,
            master_key=sources.get(master_key_id or "")))
    return listed
