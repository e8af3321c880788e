"""The crypto inventory: which key algorithms, sizes, curves and signature algorithms the certificates in
service use, which of them are weak, and what a move to post-quantum signatures would have to reissue.

``crypto_inventory(session, now)`` reads the active certificates (leaves; CA certificates too with
``include_ca``) and counts them:

- by key, labelled ``RSA-<bits>``, ``EC-<curve>`` (cryptography's curve name, e.g. ``EC-secp256r1``),
  ``Ed25519``, ``Ed448``, ``DSA-<bits>``, ``ML-DSA-<level>``; a key x509info could not read is
  ``unknown``;
- by signature algorithm family, ``<scheme>-<hash>``: ``RSA-SHA256``, ``ECDSA-SHA384``, ``DSA-SHA1``,
  ``RSA-PSS`` (its hash is in its parameters), ``Ed25519``, ``Ed448``, ``ML-DSA-65``; any other is its
  OID's name or dotted string.

Weak (``WEAK_*``, one line each in ``key_weakness`` and ``signature_weakness``; certpilot.risk scores
the same facts): an RSA key under 2048 bits, any DSA key, an EC key on a curve under 256 bits; a
signature over MD2, MD4, MD5 or SHA-1. A weak certificate carries the reasons.

Post-quantum readiness: every certificate whose key is classical (RSA, EC, Ed25519, Ed448, DSA: every
one in use today) would need reissuing once relying parties accept ML-DSA; they are counted per issuer
and per owner. An issuer is the managed certificate's issuer block (``private-ca/<name>``,
``acme-issuer/<name>``), else, for a certificate a certpilot private CA signed, that CA's issuer block
(``private-ca/<block name>``, as certpilot.violations.ca_block_name names it, so that managed and
unmanaged certificates of one CA are counted together), else ``self-signed``, else the issuer's DN
(``external``). Whether each can issue something else:

- a certpilot private CA signs with the installed ``cryptography``: whether that can build an ML-DSA
  certificate is tried once per process (``ml_dsa_support``); when it can, an ML-DSA CA is one
  `certpilot ca init NAME --algorithm ml-dsa-65` away, and its managed certificates take
  ``--key-algorithm ml-dsa-65``;
- an ACME CA: depends on the CA, and no public CA issues post-quantum certificates today;
- anything else is not issued by certpilot: ask its CA (or whoever made the self-signed one).

``CryptoInventory.select(weak=, key=, signature=)`` answers "which certificates still use RSA-1024 or
SHA-1" (``certpilot report crypto --weak``, ``--key RSA-1024``, ``--signature sha1``). ``crypto_markdown``
renders the ``crypto-inventory`` artifact. No Prefect, no network.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot.inventory import iso
from certpilot.models import Certificate, CertificateAuthority, Location, ManagedCertificate, SubjectAltName
from certpilot.views import escape, markdown_table
from certpilot.violations import PRIVATE_CA_BLOCK, ca_block_name

__all__ = ["CLASSICAL_KEY_TYPES", "CryptoCertificate", "CryptoInventory", "IssuerReadiness", "MlDsaSupport",
           "OwnerReadiness", "PqReadiness", "crypto_inventory", "crypto_markdown", "key_label", "key_weakness",
           "ml_dsa_support", "signature_family", "signature_hash", "signature_weakness"]

_CHUNK = 500
NO_OWNER = "(no owner)"
LISTED = 50  # rows per table in the markdown artifact

# What is weak (the reasons read as "<what>: <why>").
WEAK_RSA_BITS = 2048  # RSA under this: factorable by a determined attacker; CA/B requires 2048 since 2014
WEAK_EC_BITS = 256  # curves under P-256 (secp192r1, secp224r1...)
WEAK_HASHES = {"md2": "MD2 is broken", "md4": "MD4 is broken", "md5": "MD5 collisions are practical",
               "sha1": "SHA-1 collisions are practical (SHAttered, 2017)"}

CLASSICAL_KEY_TYPES = frozenset({"RSA", "EC", "Ed25519", "Ed448", "DSA"})  # broken by a quantum computer
_PQ_KEY = re.compile(r"^(ML|SLH)-?DSA-?(\w+?)(PublicKey)?$", re.IGNORECASE)  # x509info: MLDSA65PublicKey
_HASH = re.compile(r"(md2|md4|md5|sha1|sha224|sha256|sha384|sha512|sha3-?\d+)", re.IGNORECASE)

Quantum = Literal["classical", "post-quantum", "unknown"]
IssuerKind = Literal["private-ca", "acme", "self-signed", "external", "other"]

ACME_ALTERNATIVE = "depends on the CA; no public CA issues PQ certificates today"
EXTERNAL_ALTERNATIVE = "not issued by certpilot: depends on its CA; no public CA issues PQ certificates today"
SELF_SIGNED_ALTERNATIVE = "self-signed: whoever made it must make a new one (certpilot does not issue it)"


# ------------------------------------------------------------------------------------ naming and weakness

def key_label(key_type: str, key_size: int | None, key_curve: str | None) -> str:
    """``RSA-2048``, ``EC-secp256r1``, ``Ed25519``, ``DSA-1024``, ``ML-DSA-65``; else the key type."""
    if key_type in ("RSA", "DSA"):
        return f"{key_type}-{key_size}" if key_size else key_type
    if key_type == "EC":
        return f"EC-{key_curve}" if key_curve else (f"EC-{key_size}" if key_size else "EC")
    pq = _PQ_KEY.match(key_type)
    if pq:
        return f"{pq.group(1).upper()}-DSA-{pq.group(2)}"
    return key_type


def quantum_class(key_type: str) -> Quantum:
    """Classical (what a quantum computer breaks), post-quantum (ML-DSA, SLH-DSA), or unknown."""
    if key_type in CLASSICAL_KEY_TYPES:
        return "classical"
    return "post-quantum" if _PQ_KEY.match(key_type) else "unknown"


def key_weakness(key_type: str, key_size: int | None, key_curve: str | None) -> str | None:
    """Why the key is weak (``RSA key of 1024 bits, under 2048``), or None."""
    if key_type == "RSA" and key_size is not None and key_size < WEAK_RSA_BITS:
        return f"RSA key of {key_size} bits, under {WEAK_RSA_BITS}"
    if key_type == "DSA":
        return f"DSA key{f' of {key_size} bits' if key_size else ''}: DSA is withdrawn (FIPS 186-5)"
    if key_type == "EC" and key_size is not None and key_size < WEAK_EC_BITS:
        return f"EC key on {key_curve or 'a curve'} ({key_size} bits), under {WEAK_EC_BITS}"
    return None


def signature_hash(signature_algorithm: str | None) -> str | None:
    """The hash a signature algorithm names, lower case without dashes (``sha1``, ``sha256``, ``md5``),
    or None (Ed25519, ML-DSA, RSA-PSS whose hash is in its parameters, an unknown OID)."""
    found = _HASH.search(signature_algorithm or "")
    return found.group(1).lower().replace("-", "") if found else None


def signature_family(signature_algorithm: str | None) -> str:
    """``RSA-SHA256``, ``ECDSA-SHA384``, ``DSA-SHA1``, ``RSA-PSS``, ``Ed25519``, ``ML-DSA-65``..."""
    name = signature_algorithm or "unknown"
    lower = name.lower()
    digest = (signature_hash(name) or "").upper()
    if lower.endswith("withrsaencryption") and digest:
        return f"RSA-{digest}"
    if lower == "rsassapss":
        return "RSA-PSS"
    if lower.startswith("ecdsa-with-") and digest:
        return f"ECDSA-{digest}"
    if lower.startswith("dsa-with-") and digest:
        return f"DSA-{digest}"
    return {"ed25519": "Ed25519", "ed448": "Ed448"}.get(lower, name)


def signature_weakness(signature_algorithm: str | None) -> str | None:
    """Why the signature is weak (``signed with sha1WithRSAEncryption: SHA-1 collisions are practical``),
    or None."""
    digest = signature_hash(signature_algorithm)
    if digest in WEAK_HASHES:
        return f"signed with {signature_algorithm}: {WEAK_HASHES[digest]}"
    return None


def _folded(text: str) -> str:
    return text.lower().replace("-", "").replace("_", "")


# ------------------------------------------------------------------------------------ ML-DSA in cryptography

@dataclass(frozen=True)
class MlDsaSupport:
    """Whether the installed cryptography signs ML-DSA certificates, tried (``detail`` says how it went)."""

    cryptography_version: str
    available: bool
    algorithms: tuple[str, ...]
    detail: str

    @property
    def private_ca_alternative(self) -> str:
        """What a certpilot private CA could issue instead of a classical key."""
        if self.available:
            return (f"can sign {'/'.join(self.algorithms)} with cryptography {self.cryptography_version}: "
                    "`certpilot ca init NAME --algorithm ml-dsa-65`, leaves with --key-algorithm ml-dsa-65")
        return f"cannot sign ML-DSA with cryptography {self.cryptography_version} ({self.detail})"

    def as_dict(self) -> dict[str, Any]:
        return {"cryptography_version": self.cryptography_version, "available": self.available,
                "algorithms": list(self.algorithms), "detail": self.detail}


@functools.cache
def ml_dsa_support() -> MlDsaSupport:
    """Try, once per process, to build and verify an ML-DSA self-signed certificate with each ML-DSA
    level the installed cryptography offers (``cryptography.hazmat.primitives.asymmetric.mldsa``)."""
    version = importlib.metadata.version("cryptography")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import mldsa
        from cryptography.x509.oid import NameOID
    except ImportError as exc:
        return MlDsaSupport(version, False, (), f"no ML-DSA module: {exc}")
    levels = [(f"ML-DSA-{level}", getattr(mldsa, f"MLDSA{level}PrivateKey", None)) for level in (44, 65, 87)]
    works: list[str] = []
    problems: list[str] = []
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certpilot ML-DSA probe")])
    for label, key_class in levels:
        if key_class is None:
            problems.append(f"{label}: not offered")
            continue
        try:
            key = key_class.generate()
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
                    .sign(key, None))
            cert.verify_directly_issued_by(cert)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot", said with its reason
            problems.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        works.append(label)
    detail = ("built and verified an ML-DSA self-signed certificate with " + ", ".join(works) if works
              else "; ".join(problems))
    return MlDsaSupport(version, bool(works), tuple(works), detail)


# ------------------------------------------------------------------------------------ the inventory

@dataclass(frozen=True)
class CryptoCertificate:
    """One certificate in service, as the crypto inventory sees it."""

    fingerprint_sha256: str
    name: str  # the managed name, else the first DNS name, else the CN, else the subject
    subject: str
    key: str  # key_label
    key_type: str
    signature_algorithm: str
    signature: str  # signature_family
    owner: str | None
    managed: str | None  # the managed certificate's name
    issuer: str  # see the module docstring
    issuer_kind: IssuerKind
    not_after: dt.datetime
    places: tuple[str, ...]  # locators where it was seen (not ghosts)
    weaknesses: tuple[str, ...]  # why it is weak; empty when it is not
    quantum: Quantum

    @property
    def weak(self) -> bool:
        return bool(self.weaknesses)

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint_sha256": self.fingerprint_sha256, "name": self.name, "subject": self.subject,
                "key": self.key, "signature": self.signature, "signature_algorithm": self.signature_algorithm,
                "owner": self.owner, "managed": self.managed, "issuer": self.issuer, "issuer_kind": self.issuer_kind,
                "not_after": iso(self.not_after), "places": list(self.places), "weak": self.weak,
                "weaknesses": list(self.weaknesses), "quantum": self.quantum}


@dataclass(frozen=True)
class IssuerReadiness:
    """The classical-key certificates of one issuer, and whether it can issue something else."""

    issuer: str
    kind: IssuerKind
    certificates: int
    keys: dict[str, int]
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "kind": self.kind, "certificates": self.certificates, "keys": self.keys,
                "alternative": self.alternative}


@dataclass(frozen=True)
class OwnerReadiness:
    owner: str  # "(no owner)" for none
    certificates: int
    keys: dict[str, int]
    issuers: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "certificates": self.certificates, "keys": self.keys, "issuers": self.issuers}


@dataclass(frozen=True)
class PqReadiness:
    """What would need reissuing to move to post-quantum signatures (every classical key)."""

    classical: int
    post_quantum: int
    unknown: int
    issuers: tuple[IssuerReadiness, ...]  # most certificates first
    owners: tuple[OwnerReadiness, ...]
    ml_dsa: MlDsaSupport

    def as_dict(self) -> dict[str, Any]:
        return {"to_reissue": self.classical, "post_quantum": self.post_quantum, "unknown": self.unknown,
                "issuers": [i.as_dict() for i in self.issuers], "owners": [o.as_dict() for o in self.owners],
                "ml_dsa": self.ml_dsa.as_dict()}


@dataclass(frozen=True)
class CryptoInventory:
    generated_at: dt.datetime
    include_ca: bool
    certificates: tuple[CryptoCertificate, ...]  # soonest expiry first
    keys: dict[str, int]  # by key label, most first
    signatures: dict[str, int]  # by signature family, most first
    pq: PqReadiness
    weak_keys: frozenset[str] = field(default_factory=frozenset)  # labels of weak keys present
    weak_signatures: frozenset[str] = field(default_factory=frozenset)  # families of weak signatures present

    @property
    def weak(self) -> list[CryptoCertificate]:
        return [c for c in self.certificates if c.weak]

    def select(self, *, weak: bool = False, key: str | None = None, signature: str | None = None) -> list[CryptoCertificate]:
        """The certificates that are weak (with ``weak``), whose key is ``key`` (a label such as RSA-1024, or a
        key type such as RSA; case ignored) and whose signature is ``signature`` (a hash such as sha1 or
        SHA-1, a family such as RSA-SHA1, or the algorithm's name); every criterion given must match."""
        chosen: Iterable[CryptoCertificate] = self.certificates
        if weak:
            chosen = [c for c in chosen if c.weak]
        if key:
            wanted = _folded(key)
            chosen = [c for c in chosen if wanted in (_folded(c.key), _folded(c.key_type))]
        if signature:
            wanted = _folded(signature)
            chosen = [c for c in chosen if wanted in (_folded(signature_hash(c.signature_algorithm) or ""),
                                                     _folded(c.signature), _folded(c.signature_algorithm))]
        return list(chosen)

    def as_dict(self, listed: Sequence[CryptoCertificate] | None = None) -> dict[str, Any]:
        """The counts, the weak certificates (or ``listed`` ones instead), and the PQ readiness."""
        return {
            "generated_at": iso(self.generated_at), "include_ca": self.include_ca,
            "certificates": len(self.certificates),
            "keys": [{"key": k, "count": n, "weak": k in self.weak_keys} for k, n in self.keys.items()],
            "signatures": [{"signature": s, "count": n, "weak": s in self.weak_signatures}
                           for s, n in self.signatures.items()],
            "weak": [c.as_dict() for c in (self.weak if listed is None else listed)],
            "post_quantum": self.pq.as_dict(),
        }


def _most_first(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def certificate_names(session: Session, fingerprints: Sequence[str]) -> dict[str, str]:
    """The first DNS name (else IP, else URI) of each certificate that has one."""
    names: dict[str, tuple[int, str]] = {}
    rank = {"DNS": 0, "IP": 1, "URI": 2}
    s = SubjectAltName
    for chunk in _chunks(fingerprints):
        for fp, kind, value in session.execute(sa.select(col(s.certificate_fingerprint), col(s.kind), col(s.value))
                                               .where(col(s.certificate_fingerprint).in_(chunk),
                                                      col(s.kind).in_(list(rank)))):
            candidate = (rank[kind], value)
            if fp not in names or candidate < names[fp]:
                names[fp] = candidate
    return {fp: value for fp, (_, value) in names.items()}


def display_name(managed: str | None, san: str | None, subject: str) -> str:
    """The name people know a certificate by: its managed name, its first name, its CN, its subject."""
    if managed:
        return managed
    if san:
        return san
    cn = next((part[3:] for part in subject.split(",") if part.startswith("CN=")), None)
    return cn or subject


def places_of(session: Session, fingerprints: Sequence[str]) -> dict[str, list[str]]:
    """The locators where each certificate was seen, ghosts left out, in the order they were found."""
    out: dict[str, list[str]] = {}
    loc = Location
    for chunk in _chunks(fingerprints):
        for fp, locator in session.execute(sa.select(col(loc.certificate_fingerprint), col(loc.locator))
                                           .where(col(loc.certificate_fingerprint).in_(chunk),
                                                  col(loc.ghost).is_(False)).order_by(col(loc.id))):
            out.setdefault(fp, []).append(locator)
    return out


def issuer_of(managed_issuer: str | None, issuer_fingerprint: str | None, self_signed: bool, issuer_dn: str,
              private_cas: Mapping[str, str]) -> tuple[str, IssuerKind]:
    """Who issues it (see the module docstring) and what kind of issuer that is."""
    if managed_issuer:
        kind = managed_issuer.split("/", 1)[0]
        return managed_issuer, ("private-ca" if kind == PRIVATE_CA_BLOCK else "acme" if kind == "acme-issuer" else "other")
    if issuer_fingerprint is not None and issuer_fingerprint in private_cas:
        return f"{PRIVATE_CA_BLOCK}/{ca_block_name(private_cas[issuer_fingerprint])}", "private-ca"
    if self_signed:
        return "self-signed", "self-signed"
    return issuer_dn, "external"


def _alternative(kind: IssuerKind, support: MlDsaSupport) -> str:
    if kind == "private-ca":
        return support.private_ca_alternative
    if kind == "acme":
        return ACME_ALTERNATIVE
    if kind == "self-signed":
        return SELF_SIGNED_ALTERNATIVE
    return EXTERNAL_ALTERNATIVE


def crypto_inventory(session: Session, now: dt.datetime, *, include_ca: bool = False) -> CryptoInventory:
    """Count the active certificates (leaves, and CA certificates with ``include_ca``) by key and by
    signature, flag the weak ones, and say what a post-quantum move would reissue (module docstring)."""
    c, m = Certificate, ManagedCertificate
    where = [col(c.status) == "active", col(c.not_after) >= now]
    if not include_ca:
        where.append(col(c.is_ca).is_(False))
    rows = session.execute(
        sa.select(col(c.fingerprint_sha256), col(c.subject), col(c.issuer), col(c.issuer_fingerprint),
                  col(c.self_signed), col(c.key_type), col(c.key_size), col(c.key_curve), col(c.signature_algorithm),
                  col(c.owner), col(c.not_after), col(m.name).label("managed"), col(m.issuer).label("managed_issuer"),
                  col(m.owner).label("managed_owner"))
        .outerjoin(m, col(m.id) == col(c.managed_certificate_id)).where(*where)
        .order_by(col(c.not_after), col(c.fingerprint_sha256))).all()
    fps = [r.fingerprint_sha256 for r in rows]
    names, places = certificate_names(session, fps), places_of(session, fps)
    private_cas = {fp: name for fp, name in session.execute(
        sa.select(col(CertificateAuthority.issuing_fingerprint), col(CertificateAuthority.name)))}
    certificates: list[CryptoCertificate] = []
    weak_keys: set[str] = set()
    weak_signatures: set[str] = set()
    for r in rows:
        issuer, kind = issuer_of(r.managed_issuer, r.issuer_fingerprint, bool(r.self_signed), r.issuer, private_cas)
        label, family = key_label(r.key_type, r.key_size, r.key_curve), signature_family(r.signature_algorithm)
        weak_key, weak_signature = key_weakness(r.key_type, r.key_size, r.key_curve), signature_weakness(r.signature_algorithm)
        if weak_key:
            weak_keys.add(label)
        if weak_signature:
            weak_signatures.add(family)
        certificates.append(CryptoCertificate(
            r.fingerprint_sha256, display_name(r.managed, names.get(r.fingerprint_sha256), r.subject), r.subject,
            label, r.key_type, r.signature_algorithm, family, r.owner or r.managed_owner, r.managed, issuer, kind,
            r.not_after, tuple(places.get(r.fingerprint_sha256, ())),
            tuple(w for w in (weak_key, weak_signature) if w), quantum_class(r.key_type)))
    keys = Counter(x.key for x in certificates)
    signatures = Counter(x.signature for x in certificates)
    return CryptoInventory(now, include_ca, tuple(certificates), _most_first(keys), _most_first(signatures),
                           _readiness(certificates), frozenset(weak_keys), frozenset(weak_signatures))


def _readiness(certificates: Sequence[CryptoCertificate]) -> PqReadiness:
    support = ml_dsa_support()
    classical = [x for x in certificates if x.quantum == "classical"]
    by_issuer: dict[tuple[str, IssuerKind], Counter[str]] = {}
    by_owner: dict[str, tuple[Counter[str], Counter[str]]] = {}
    for x in classical:
        by_issuer.setdefault((x.issuer, x.issuer_kind), Counter())[x.key] += 1
        owner_keys, owner_issuers = by_owner.setdefault(x.owner or NO_OWNER, (Counter(), Counter()))
        owner_keys[x.key] += 1
        owner_issuers[x.issuer] += 1
    issuers = sorted((IssuerReadiness(issuer, kind, sum(keys.values()), _most_first(keys), _alternative(kind, support))
                      for (issuer, kind), keys in by_issuer.items()), key=lambda i: (-i.certificates, i.issuer))
    owners = sorted((OwnerReadiness(owner, sum(keys.values()), _most_first(keys), _most_first(iss))
                     for owner, (keys, iss) in by_owner.items()), key=lambda o: (-o.certificates, o.owner))
    return PqReadiness(len(classical), sum(1 for x in certificates if x.quantum == "post-quantum"),
                       sum(1 for x in certificates if x.quantum == "unknown"), tuple(issuers), tuple(owners), support)


# ------------------------------------------------------------------------------------ markdown

def crypto_markdown(inventory: CryptoInventory) -> str:
    """The ``crypto-inventory`` artifact: counts by key and signature (weak ones marked), the weak
    certificates, and the post-quantum readiness per issuer and per owner. Every value is escaped."""
    lines = [f"# Crypto inventory, {inventory.generated_at:%Y-%m-%d %H:%M} UTC", "",
             f"{len(inventory.certificates)} certificates in service"
             f"{' (CA certificates included)' if inventory.include_ca else ' (leaves)'}.", "", "## Keys", ""]
    lines += markdown_table(("key", "certificates", "weak"),
                            [(k, n, "weak" if k in inventory.weak_keys else "") for k, n in inventory.keys.items()])
    lines += ["", "## Signature algorithms", ""]
    lines += markdown_table(("signature", "certificates", "weak"),
                            [(s, n, "weak" if s in inventory.weak_signatures else "")
                             for s, n in inventory.signatures.items()])
    weak = inventory.weak
    lines += ["", f"## Weak certificates ({len(weak)})", ""]
    if weak:
        lines += markdown_table(("name", "fingerprint", "key", "signature", "owner", "places", "why"),
                                [(c.name, c.fingerprint_sha256[:16], c.key, c.signature_algorithm, c.owner or "",
                                  len(c.places), "; ".join(c.weaknesses)) for c in weak[:LISTED]])
        if len(weak) > LISTED:
            lines += ["", f"... and {len(weak) - LISTED} more: `certpilot report crypto --weak` lists them all."]
    else:
        lines.append("None: no RSA key under 2048 bits, no DSA, no EC curve under 256 bits, no MD5 or SHA-1 signature.")
    pq = inventory.pq
    lines += ["", "## Post-quantum readiness", "",
              f"{pq.classical} certificates use a classical key (RSA, EC, EdDSA, DSA) and would need reissuing "
              f"with a post-quantum algorithm (ML-DSA); {pq.post_quantum} already use one"
              f"{f', {pq.unknown} an unknown key' if pq.unknown else ''}.", "",
              f"cryptography {escape(pq.ml_dsa.cryptography_version)}: {escape(pq.ml_dsa.detail)}.", "",
              "### Per issuer", ""]
    lines += markdown_table(("issuer", "kind", "certificates", "keys", "can it issue something else?"),
                            [(i.issuer, i.kind, i.certificates, _counts(i.keys), i.alternative)
                             for i in pq.issuers[:LISTED]])
    lines += ["", "### Per owner", ""]
    lines += markdown_table(("owner", "certificates", "keys", "issuers"),
                            [(o.owner, o.certificates, _counts(o.keys), _counts(o.issuers)) for o in pq.owners[:LISTED]])
    return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in counts.items())
