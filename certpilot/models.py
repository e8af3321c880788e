"""The system of record: the inventory's tables.

A Certificate is identified by the SHA-256 of its DER; every place it was seen is a Location. A
ManagedCertificate is what should exist, its Targets are where it should be served. A PrivateKey is
stored only encrypted. AuditEvents form a hash chain. Times are aware UTC everywhere.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no time zone, so UTC is implied)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the inventory: use aware UTC datetimes")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


def _time(*, index: bool = False, nullable: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), index=index, nullable=nullable))


def _json(default: Any) -> Any:
    return Field(default_factory=lambda: type(default)(), sa_column=sa.Column(sa.JSON, nullable=False))


class Certificate(SQLModel, table=True):
    __tablename__ = "certificate"
    # "What expires soon" (status = 'active' AND not_after BETWEEN ..., soonest first) reads a range of
    # the first index in order: a count or a first page stays fast however large the inventory grows.
    # The second, partial, holds only CA certificates: an import looks up issuers by subject in it
    # (without it, each batch read the whole table).
    __table_args__ = (
        sa.Index("ix_certificate_status_not_after", "status", "not_after"),
        sa.Index("ix_certificate_ca_subject", "subject", sqlite_where=sa.text("is_ca IS 1"),
                 postgresql_where=sa.text("is_ca IS true")),
    )

    fingerprint_sha256: str = Field(primary_key=True, max_length=64)
    subject: str
    issuer: str = Field(index=True)
    serial_hex: str = Field(index=True, max_length=130)
    not_before: dt.datetime = _time()
    not_after: dt.datetime = _time(index=True)
    key_type: str = Field(max_length=32)
    key_size: int | None = None
    key_curve: str | None = Field(default=None, max_length=32)
    spki_sha256: str | None = Field(default=None, index=True, max_length=64)
    signature_algorithm: str = Field(max_length=64)
    is_ca: bool = False
    path_length: int | None = None
    key_usage: list[str] = _json([])
    extended_key_usage: list[str] = _json([])
    subject_key_id: str | None = Field(default=None, max_length=128)
    authority_key_id: str | None = Field(default=None, index=True, max_length=128)
    crl_urls: list[str] = _json([])
    ocsp_urls: list[str] = _json([])
    ca_issuer_urls: list[str] = _json([])
    self_signed: bool = False
    issuer_fingerprint: str | None = Field(default=None, foreign_key="certificate.fingerprint_sha256", index=True)
    status: str = Field(default="active", index=True, max_length=16)  # active, superseded, revoked
    revocation_reason: str | None = Field(default=None, max_length=32)
    revoked_at: dt.datetime | None = _time(nullable=True)
    owner: str | None = Field(default=None, index=True)
    tags: dict[str, str] = _json({})
    managed_certificate_id: int | None = Field(default=None, foreign_key="managed_certificate.id", index=True)
    replaces_fingerprint: str | None = Field(default=None, foreign_key="certificate.fingerprint_sha256")
    notes: list[str] = _json([])
    der: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))
    created_at: dt.datetime = _time()


class SubjectAltName(SQLModel, table=True):
    __tablename__ = "subject_alt_name"

    certificate_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256", primary_key=True)
    kind: str = Field(primary_key=True, max_length=16)  # DNS, IP, URI, email, dirName, ...
    value: str = Field(primary_key=True, index=True)


class Location(SQLModel, table=True):
    __tablename__ = "location"
    # Ghost flagging updates one source's locations: (source, ghost) finds them.
    __table_args__ = (sa.UniqueConstraint("certificate_fingerprint", "locator", name="uq_location_certificate_locator"),
                      sa.Index("ix_location_source_ghost", "source", "ghost"))

    id: int | None = Field(default=None, primary_key=True)
    certificate_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256", index=True)
    locator: str = Field(index=True)  # tls://host:port?sni=name, ssh://host/path, file:///path, ...
    source: str = Field(max_length=64)  # import, tls-scan, ssh, aws-acm, ...
    first_seen: dt.datetime = _time()
    last_seen: dt.datetime = _time()
    seen_by_run: str | None = Field(default=None, max_length=64)  # Prefect flow run id
    ghost: bool = False  # not seen by the latest successful run of its source
    # What the source reported there, public facts only: TLS version, whether the chain verified, a
    # file's format and the key file it pairs with, an ARN, a Key Vault version...
    details: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))


class ManagedCertificate(SQLModel, table=True):
    __tablename__ = "managed_certificate"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    dns_names: list[str] = _json([])
    ip_addresses: list[str] = _json([])
    uris: list[str] = _json([])  # URI names, e.g. SPIFFE IDs (spiffe://prod.example/ns/api/sa/web)
    profile: str = Field(default="tls-server", max_length=64)
    key_algorithm: str = Field(default="ec-p256", max_length=16)
    validity_days: int | None = None
    issuer: str = Field(max_length=128)  # the name of an issuer block
    owner: str | None = Field(default=None, index=True)
    tags: dict[str, str] = _json({})
    renew_before_days: int | None = None  # None: two thirds of the lifetime
    use_ari: bool = True
    status: str = Field(default="active", max_length=16)  # active, retired
    created_at: dt.datetime = _time()
    # The CA's suggested renewal window (ARI) for the current certificate, as last fetched.
    ari_start: dt.datetime | None = _time(nullable=True)
    ari_end: dt.datetime | None = _time(nullable=True)
    ari_checked_at: dt.datetime | None = _time(nullable=True)
    last_attempt_at: dt.datetime | None = _time(nullable=True)
    last_error: str | None = None  # the reason the last renewal attempt failed; None after a success
    # The renewal journal (certpilot.renewing): a renewal in progress, from its key step until its certificate
    # is stored or it fails permanently. A transient failure leaves it, so that the next attempt takes up the
    # same key and resumes the same CA order (no second certificate issued). Ids and URLs only, never a key.
    pending_key_id: str | None = Field(default=None, foreign_key="private_key.id")
    pending_order_url: str | None = None  # the CA's order for the pending key's CSR (an OrderJournal)
    pending_issuer: str | None = Field(default=None, max_length=128)  # the issuer block the order was placed with
    pending_since: dt.datetime | None = _time(nullable=True)  # when the pending key was made


class RenewalClaim(SQLModel, table=True):
    """A renewal in progress: the run (``holder``) renewing a managed certificate, until it ends or
    ``until`` passes (a run that died holding it). Two runs never renew the same certificate at once."""

    __tablename__ = "renewal_claim"

    managed_certificate_id: int = Field(primary_key=True, foreign_key="managed_certificate.id")
    holder: str = Field(max_length=128)
    until: dt.datetime = _time()


class CertificateAuthority(SQLModel, table=True):
    """certpilot's own private CA: a root (whose key may be taken offline) and an issuing intermediate."""

    __tablename__ = "certificate_authority"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    root_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256")
    issuing_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256")
    root_key_id: str | None = Field(default=None, foreign_key="private_key.id")  # None once taken offline
    issuing_key_id: str | None = Field(default=None, foreign_key="private_key.id")  # None: the key is on a token
    issuing_token_key_id: str | None = Field(default=None, foreign_key="token_key.id")  # a PKCS#11 token holds it
    base_url: str  # where `certpilot ca serve` answers: AIA, CRL distribution point and OCSP URLs derive from it
    crl_number: int = 0
    crl_next_update: dt.datetime | None = _time(nullable=True)
    crl_der: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))  # the current full CRL
    created_at: dt.datetime = _time()


class TokenKey(SQLModel, table=True):
    """A CA key made on a PKCS#11 token (certpilot.token_keys): which token and key, how the token
    described it when it was made, and where the token's PIN is read (an environment variable's name or a
    file's path: never the PIN)."""

    __tablename__ = "token_key"

    id: str = Field(primary_key=True, max_length=32)
    module: str  # the PKCS#11 shared library
    token_label: str = Field(max_length=32)
    key_label: str = Field(max_length=128)
    key_id: str = Field(max_length=64)  # CKA_ID, hex
    algorithm: str = Field(max_length=32)
    spki_sha256: str = Field(max_length=64)
    made_on_token: bool  # CKA_LOCAL as the token reported it
    extractable: bool  # CKA_EXTRACTABLE as the token reported it
    pin_env: str | None = None
    pin_file: str | None = None
    created_at: dt.datetime = _time()


class AcmeAccount(SQLModel, table=True):
    """An ACME account: its key is in the keystore, referred to by id."""

    __tablename__ = "acme_account"
    __table_args__ = (sa.UniqueConstraint("directory_url", "name", name="uq_acme_account_directory_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)  # the issuer's name (its block), so one CA can hold several accounts
    directory_url: str
    account_url: str
    key_id: str = Field(foreign_key="private_key.id")
    contact: list[str] = _json([])
    eab_key_id: str | None = None
    created_at: dt.datetime = _time()


class Target(SQLModel, table=True):
    __tablename__ = "target"
    __table_args__ = (sa.UniqueConstraint("managed_certificate_id", "name", name="uq_target_managed_name"),)

    id: int | None = Field(default=None, primary_key=True)
    managed_certificate_id: int = Field(foreign_key="managed_certificate.id", index=True)
    name: str
    kind: str = Field(max_length=32)  # a certpilot.target_kinds.TargetKind value
    block: str | None = None  # the Prefect block document that configures the connector
    settings: dict[str, Any] = _json({})  # paths, reload command, listener ARN, vault name...
    desired_fingerprint: str | None = Field(default=None, max_length=64)
    verified_fingerprint: str | None = Field(default=None, max_length=64)
    verified_at: dt.datetime | None = _time(nullable=True)
    deployed_at: dt.datetime | None = _time(nullable=True)
    last_error: str | None = None  # why the last deploy or verification here failed; None after a success
    updated_at: dt.datetime = _time()


class PrivateKey(SQLModel, table=True):
    """An encrypted private key. ``ciphertext`` is the PKCS#8 DER under a per-key data key; the data
    key is wrapped by the master key. Destroying a key erases both (crypto-shredding)."""

    __tablename__ = "private_key"

    id: str = Field(primary_key=True, max_length=32)
    algorithm: str = Field(max_length=32)
    spki_sha256: str = Field(index=True, max_length=64)
    origin: str = Field(max_length=16)  # generated, imported
    master_key_id: str | None = Field(default=None, max_length=32)
    wrapped_data_key: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))
    ciphertext: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary, nullable=True))
    created_at: dt.datetime = _time()
    destroyed_at: dt.datetime | None = _time(nullable=True)


class AuditEvent(SQLModel, table=True):
    """Append-only and hash-chained: ``hash`` covers every other field and ``prev_hash``."""

    __tablename__ = "audit_event"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: dt.datetime = _time(index=True)
    actor: str
    action: str = Field(index=True, max_length=64)
    object: str = Field(index=True)
    flow_run_id: str | None = Field(default=None, max_length=64)
    details: str = Field(sa_column=sa.Column(sa.Text, nullable=False))  # canonical JSON, hashed as stored
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


class SourceRun(SQLModel, table=True):
    """The last run of each discovery source (its block document): when it last completed, so that a
    source that stopped running (or keeps failing) is seen as stale."""

    __tablename__ = "source_run"

    source: str = Field(primary_key=True)  # Location.source, e.g. tls-scan:lab
    block: str | None = None  # the block document that configures it, e.g. tls-scan-source/lab
    last_started_at: dt.datetime | None = _time(nullable=True)
    last_completed_at: dt.datetime | None = _time(nullable=True)
    last_failed_at: dt.datetime | None = _time(nullable=True)
    last_error: str | None = None  # redacted; None after a complete run
    flow_run_id: str | None = Field(default=None, max_length=64)


class EndpointCheck(SQLModel, table=True):
    """What the latest monitor run found at one place: an endpoint location (``tls://...``) or a target
    (``target:<managed name>/<target name>``). One row per place, replaced by every check."""

    __tablename__ = "endpoint_check"

    place: str = Field(primary_key=True)
    checked_at: dt.datetime = _time(index=True)
    served_fingerprint: str | None = Field(default=None, max_length=64)
    expected_fingerprint: str | None = Field(default=None, max_length=64)
    ok: bool = False
    problems: list[str] = _json([])  # the alert conditions found here (certpilot.alerts.Condition values)
    tls_version: str | None = Field(default=None, max_length=16)
    revocation: str | None = Field(default=None, max_length=16)  # good, revoked, unknown
    error: str | None = None  # why nothing could be checked (unreachable, timed out...), redacted
    flow_run_id: str | None = Field(default=None, max_length=64)


class Alert(SQLModel, table=True):
    """One alert per (object, condition) while it is not resolved: many sensors and many monitor runs
    update the same row. A condition that returns after it resolved opens a new row, so each row is one
    incident (first seen to resolved)."""

    __tablename__ = "alert"
    __table_args__ = (
        sa.Index("uq_alert_unresolved", "object", "condition", unique=True,
                 sqlite_where=sa.text("state != 'resolved'"), postgresql_where=sa.text("state != 'resolved'")),
        sa.Index("ix_alert_state_severity", "state", "severity"),
    )

    id: int | None = Field(default=None, primary_key=True)
    object: str = Field(index=True)  # certificate:<sha256>, managed:<name>, source:<name>, place:<place>, flow-run:<id>...
    condition: str = Field(max_length=48)  # a certpilot.alerts.Condition value
    severity: str = Field(max_length=16)  # a certpilot.alerts.Severity value: the highest it reached
    state: str = Field(default="open", max_length=16)  # open, escalated, resolved, suppressed
    summary: str
    owner: str | None = Field(default=None, index=True)
    tags: dict[str, str] = _json({})
    details: dict[str, Any] = _json({})  # public facts only
    first_seen: dt.datetime = _time()
    last_seen: dt.datetime = _time()
    resolved_at: dt.datetime | None = _time(nullable=True)
    notified_severity: str | None = Field(default=None, max_length=16)  # the highest severity notified
    notifications_sent: int = 0
    last_notified_at: dt.datetime | None = _time(nullable=True)
    acknowledged_by: str | None = None
    acknowledged_at: dt.datetime | None = _time(nullable=True)
    suppression_id: int | None = Field(default=None, foreign_key="suppression.id")


class AlertDelivery(SQLModel, table=True):
    """One attempt to tell someone: an alert's opening, escalation or resolution, or a daily digest,
    to one notification block; failed deliveries are kept with their reason."""

    __tablename__ = "alert_delivery"

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int | None = Field(default=None, foreign_key="alert.id", index=True)  # None for a digest
    kind: str = Field(max_length=16)  # opened, escalated, resolved, digest
    channel: str  # the notification block document, e.g. custom-webhook/payments
    owner: str | None = None
    at: dt.datetime = _time(index=True)
    ok: bool = False
    attempts: int = 0
    error: str | None = None  # redacted


class Suppression(SQLModel, table=True):
    """A window in which matching alerts are recorded but notify no one; it expires at ``ends_at``."""

    __tablename__ = "suppression"

    id: int | None = Field(default=None, primary_key=True)
    scope: str  # e.g. owner=payments, certificate=www.example.com, tag:env=staging, condition=expiring
    starts_at: dt.datetime = _time()
    ends_at: dt.datetime = _time(index=True)
    reason: str
    created_by: str
    created_at: dt.datetime = _time()
    ended_at: dt.datetime | None = _time(nullable=True)  # ended early by someone


class AlertPolicy(SQLModel, table=True):
    """The alert policy as loaded (routes, bands, digest), YAML text kept as given; the newest row rules."""

    __tablename__ = "alert_policy"

    id: int | None = Field(default=None, primary_key=True)
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    sha256: str = Field(max_length=64)
    loaded_by: str
    loaded_at: dt.datetime = _time()


class ReplacementRun(SQLModel, table=True):
    """One revoke-and-replace campaign: the certificates a scope matched when it started, replaced and
    revoked item by item. A run of the same scope (and reason and order) while it is not done resumes it,
    from the items recorded here, never from a fresh look at the scope."""

    __tablename__ = "replacement_run"

    id: int | None = Field(default=None, primary_key=True)
    scope_key: str = Field(index=True, max_length=64)  # certpilot.scope.Scope.key()
    scope: dict[str, Any] = _json({})  # Scope.as_dict(): what the operator asked for
    reason: str = Field(max_length=32)  # a certpilot.ca.REASONS name: key-compromise, superseded, ...
    revoke_first: bool = False
    status: str = Field(default="open", max_length=16)  # open (running or killed), failed (resumable), done
    flow_run_id: str | None = Field(default=None, max_length=64)  # the Prefect flow run that last worked on it
    created_at: dt.datetime = _time()
    updated_at: dt.datetime = _time()
    finished_at: dt.datetime | None = _time(nullable=True)


class ReplacementItem(SQLModel, table=True):
    """One old certificate of a campaign and how far its replacement got (certpilot.replacing)."""

    __tablename__ = "replacement_item"
    __table_args__ = (sa.UniqueConstraint("run_id", "old_fingerprint", name="uq_replacement_item_run_old"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="replacement_run.id", index=True)
    old_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256", max_length=64)
    managed: str | None = None  # the managed certificate's name, if any
    action: str = Field(max_length=16)  # certpilot.scope.Action when the campaign started: replace, revoke, ...
    why: str | None = None  # what the scope said about it (why it cannot be done, or is not needed)
    state: str = Field(default="pending", max_length=16)  # pending, key, issued, deployed, revoked, done, failed, skipped
    key_id: str | None = Field(default=None, foreign_key="private_key.id", max_length=32)  # the new key
    order_url: str | None = None  # the CA's order for the new certificate (OrderJournal)
    new_fingerprint: str | None = Field(default=None, max_length=64)
    revoked_at: dt.datetime | None = _time(nullable=True)
    error: str | None = None  # why it failed (redacted)
    updated_at: dt.datetime = _time()


class PolicyViolation(SQLModel, table=True):
    """One rule a certificate breaks (``place`` empty), or that a place serving it breaks (``place`` the
    location's locator, for the endpoint rules), as the latest evaluation found it. Each evaluation of a
    certificate (or a place) replaces its rows; ``first_seen`` survives while the violation persists."""

    __tablename__ = "policy_violation"
    __table_args__ = (sa.UniqueConstraint("certificate_fingerprint", "place", "rule", name="uq_policy_violation"),
                      sa.Index("ix_policy_violation_rule", "rule"))

    id: int | None = Field(default=None, primary_key=True)
    certificate_fingerprint: str = Field(foreign_key="certificate.fingerprint_sha256", index=True, max_length=64)
    place: str = Field(default="")  # "" for a certificate rule; the locator for an endpoint rule
    rule: str = Field(max_length=32)  # a certpilot.policy rule id: key-size, max-validity, ...
    severity: str = Field(max_length=16)  # a certpilot.policy.Severity value
    detail: str
    waiver_id: int | None = Field(default=None, foreign_key="policy_waiver.id")  # set: waived, shown as such
    first_seen: dt.datetime = _time()
    last_seen: dt.datetime = _time()


class PolicyWaiver(SQLModel, table=True):
    """An exception to one rule for a scope, approved by someone, until ``expires_at``. Granting, revoking
    and expiry are audited; an expired waiver stops applying and the evaluation says so."""

    __tablename__ = "policy_waiver"

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(max_length=32)
    scope: str  # certificate=FP-or-name, owner=X, domain=suffix, tag:k=v, place=glob; comma-separated, all must match
    reason: str
    approver: str
    expires_at: dt.datetime = _time(index=True)
    created_by: str
    created_at: dt.datetime = _time()
    revoked_at: dt.datetime | None = _time(nullable=True)
    revoked_by: str | None = None
    expiry_noted_at: dt.datetime | None = _time(nullable=True)  # when an evaluation first saw it expired (audited)
