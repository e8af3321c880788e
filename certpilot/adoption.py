"""Adopting a discovered certificate: the first step of a lifecycle that began outside certpilot.

``propose`` says what the managed certificate would be for a discovered certificate that nothing
manages: its DNS names and IP addresses (from its subjectAltName), its key type as the algorithm each
renewal generates (certpilot.keys), owner and tags (from the certificate's row; with no owner there, the
owner the policy's ownership rules give it: a managed certificate must have one), and deployment targets
proposed from every place discovery has seen it (non-ghost Locations):

- a file on an SSH host that nginx serves (discovery read nginx's configuration: Location.details
  ``served_by``, certpilot.server_configs) becomes an ``ssh-nginx`` target: the certificate file, the
  key file the configuration names, and the endpoint to verify (its ``listen`` address and a server
  name the certificate covers); one haproxy serves becomes an ``ssh-haproxy`` target (the PEM, its
  admin stats socket for the runtime API, the bind address). A file no configuration names is proposed
  with what the operator must add (its kind and how to reload);
- an imported ACM certificate becomes an ``aws-acm`` target re-imported in place, a Key Vault
  certificate an ``azure-kv`` target;
- a TLS endpoint, or a load balancer listener, is listed where it was seen: it names no file or store
  certpilot could write.

A target is proposed through the block that discovered it (the source's SourceRun.block), or the one the
operator names. Where something is not known (an nginx that is not the system's, whose test and reload
commands cannot be guessed; a haproxy without an admin socket) the proposed target says what the
operator must add (``needs``), and is not adopted until it is given.

``adopt`` makes it so (with the owner the operator gives, else the proposal's; refused when there is
none): certpilot.managed.add, the existing certificate linked to it (so it is the
current certificate: the first renewal replaces it), each accepted target added with the certificate
as what it should serve, and one ``managed.adopted`` audit event. The private key is not moved: when the
keystore holds it already (discovery with import_keys) the adoption says so; otherwise the first
renewal makes a new one. No Prefect and no network here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session, col, select

from certpilot import audit, inventory, keystore, managed, targets, violations
from certpilot.clock import utcnow
from certpilot.errors import NotFoundError, PermanentError
from certpilot.keys import KEY_ALGORITHMS
from certpilot.models import Certificate, Location, ManagedCertificate, SourceRun, SubjectAltName
from certpilot.policy import Policy
from certpilot.server_configs import Served
from certpilot.target_kinds import TargetKind, TargetSettingsError, validate_settings

__all__ = ["AdoptionProposal", "Adopted", "ProposedTarget", "adopt", "check_name", "key_algorithm_of", "propose"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SYSTEM_NGINX = "/etc/nginx/"


@dataclass(frozen=True)
class ProposedTarget:
    """A deployment target adoption would add. ``needs`` says what the operator must add first (setting
    names first: ``test_command``...); a target with needs, no kind or no block is not adopted."""

    name: str
    kind: str | None
    block: str | None
    settings: dict[str, Any]
    location: str  # the locator it comes from
    why: str  # how it was derived
    needs: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.kind is not None and self.block is not None and not self.needs

    def with_settings(self, values: Mapping[str, Any], block: str | None = None) -> ProposedTarget:
        """This target with ``values`` added to its settings (and ``block`` if given): what they settle is
        no longer needed."""
        settings = {**self.settings, **values}
        given = set(settings)
        needs = tuple(n for n in self.needs if not _settled(n, given))
        return dataclasses.replace(self, settings=settings, block=block or self.block, needs=needs)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "block": self.block, "settings": dict(self.settings),
                "location": self.location, "why": self.why, "needs": list(self.needs), "ready": self.ready}


def _settled(need: str, given: set[str]) -> bool:
    """A need names its settings before the first ':' ("test_command, reload_command: ..."); with '|' for
    alternatives ("runtime_socket | reload_command: ...")."""
    keys, sep, _ = need.partition(":")
    if not sep:
        return False
    return all(any(k.strip() in given for k in group.split("|")) for group in keys.split(","))


@dataclass(frozen=True)
class AdoptionProposal:
    """What adopting a discovered certificate would define (see the module docstring)."""

    fingerprint: str
    subject: str
    serial_hex: str
    issuer_dn: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    key_algorithm: str
    key: str | None  # key:<id> when the keystore holds its private key
    owner: str | None
    tags: dict[str, str]
    targets: tuple[ProposedTarget, ...] = ()
    seen_at: tuple[str, ...] = ()  # places it was seen that make no target (endpoints, listeners)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "subject": self.subject, "serial": self.serial_hex,
                "issuer": self.issuer_dn, "not_before": inventory.iso(self.not_before),
                "not_after": inventory.iso(self.not_after), "dns_names": list(self.dns_names),
                "ip_addresses": list(self.ip_addresses), "key_algorithm": self.key_algorithm, "key": self.key,
                "owner": self.owner, "tags": dict(self.tags), "targets": [t.as_dict() for t in self.targets],
                "seen_at": list(self.seen_at), "notes": list(self.notes)}

    def lines(self) -> list[str]:
        key = f"in the keystore ({self.key})" if self.key else "not in the keystore: the first renewal makes a new one"
        out = [f"certificate {self.fingerprint[:16]} {self.subject} (serial {self.serial_hex}), issued by "
               f"{self.issuer_dn}, valid {self.not_before:%Y-%m-%d} to {self.not_after:%Y-%m-%d}",
               f"names: {', '.join(self.dns_names + self.ip_addresses)}; each renewal: a new {self.key_algorithm} key",
               f"owner: {self.owner or '-'}; tags: " + (", ".join(f"{k}={v}" for k, v in self.tags.items()) or "-"),
               f"private key: {key}"]
        for t in self.targets:
            state = "ready" if t.ready else "NOT READY: needs " + "; ".join(t.needs or ("a kind and a block",))
            out.append(f"target {t.name} ({t.kind or '?'} via {t.block or '?'}): {state}")
            out.append(f"    from {t.location}: {t.why}")
            out += [f"    {k} = {v}" for k, v in t.settings.items()]
        out += [f"seen at {where} (no target: nothing certpilot could write there)" for where in self.seen_at]
        out += [f"note: {n}" for n in self.notes]
        return out


@dataclass(frozen=True)
class Adopted:
    """What ``adopt`` did."""

    name: str
    fingerprint: str
    targets: tuple[str, ...]
    skipped: tuple[str, ...]  # proposed targets not added (not ready), with why
    key: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "targets": list(self.targets),
                "skipped": list(self.skipped), "key": self.key}


# ------------------------------------------------------------------------------------------ propose

def key_algorithm_of(certificate: Certificate) -> str | None:
    """The certpilot.keys algorithm name of the certificate's key (None: not one certpilot generates)."""
    kind = certificate.key_type
    if kind == "RSA" and certificate.key_size in (2048, 3072, 4096):
        name = f"rsa-{certificate.key_size}"
    elif kind == "EC":
        name = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(certificate.key_curve or "", "")
    elif kind == "Ed25519":
        name = "ed25519"
    else:
        name = ""
    return name if name in KEY_ALGORITHMS else None


def _adoptable(session: Session, fingerprint: str, now: dt.datetime) -> Certificate:
    row = inventory.resolve(session, fingerprint)
    if row.managed_certificate_id is not None:
        owner = session.get(ManagedCertificate, row.managed_certificate_id)
        raise PermanentError(f"certificate {row.fingerprint_sha256[:16]} is already managed, as "
                             f"{owner.name if owner else row.managed_certificate_id}: nothing to adopt")
    if row.is_ca:
        raise PermanentError(f"certificate {row.fingerprint_sha256[:16]} ({row.subject}) is a CA certificate: "
                             "certpilot adopts end-entity certificates")
    if row.not_after <= now:
        raise PermanentError(f"certificate {row.fingerprint_sha256[:16]} ({row.subject}) expired on "
                             f"{row.not_after:%Y-%m-%d %H:%M} UTC: there is nothing to adopt; define a managed "
                             "certificate for its names instead (`certpilot managed add`)")
    if row.status == "revoked":
        raise PermanentError(f"certificate {row.fingerprint_sha256[:16]} ({row.subject}) is revoked: there is "
                             "nothing to adopt; define a managed certificate for its names instead")
    return row


def _owner(session: Session, row: Certificate, policy: Policy | None, now: dt.datetime,
           notes: list[str]) -> str | None:
    """The certificate's owner; without one, the first of the policy's ownership rules that matches it
    (noted, with the rule's line), else None (noted: a managed certificate needs one)."""
    if row.owner:
        return row.owner
    if policy is not None:
        facts = violations.facts_for(session, policy, [row.fingerprint_sha256], now)
        rule = next((r for r in policy.ownership for f in facts if r.matches(f)), None)
        if rule is not None:
            where = f"{policy.source}:{rule.line}" if rule.line is not None else policy.source
            notes.append(f"owner {rule.owner} from the policy's ownership rule at {where} (the certificate has none)")
            return rule.owner
    rules = " and no ownership rule of the policy matches it" if policy is not None else ""
    notes.append(f"it has no owner{rules}: give one (--owner), a managed certificate must have an owner")
    return None


def propose(session: Session, fingerprint: str, *, target_block: str | None = None,
            now: dt.datetime | None = None, policy: Policy | None = None, owner: str | None = None) -> AdoptionProposal:
    """What adopting the certificate ``fingerprint`` (or a unique prefix) would define. NotFoundError for
    an unknown one; PermanentError for one that is managed, a CA, expired or revoked. ``target_block``:
    the SSH host block for SSH targets instead of the one that discovered them. Its owner: ``owner``
    (the operator's), else the certificate's, else the first of ``policy``'s ownership rules that matches
    it (None: no rules), else none (noted: adopting it needs one)."""
    now = now or utcnow()
    row = _adoptable(session, fingerprint, now)
    fp = row.fingerprint_sha256
    sans = session.exec(select(SubjectAltName).where(SubjectAltName.certificate_fingerprint == fp)).all()
    dns = tuple(sorted({s.value.lower() for s in sans if s.kind == "DNS"}))
    ips = tuple(sorted({s.value for s in sans if s.kind == "IP"}))
    notes: list[str] = []
    if not dns and not ips:
        notes.append("it has no DNS name or IP address in a subjectAltName: a managed certificate needs one")
    algorithm = key_algorithm_of(row)
    if algorithm is None:
        notes.append(f"its key ({row.key_type} {row.key_size or row.key_curve or ''}) is not one certpilot "
                     "generates: renewals will make ec-p256 keys")
    ref = keystore.find_key(session, row.spki_sha256) if row.spki_sha256 else None
    blocks = {r.source: r.block for r in session.exec(select(SourceRun)).all()}
    locations = session.exec(select(Location).where(Location.certificate_fingerprint == fp,
                                                    col(Location.ghost).is_(False))
                             .order_by(col(Location.locator))).all()
    proposed: list[ProposedTarget] = []
    seen: list[str] = []
    for location in locations:
        made = _targets_at(location, blocks.get(location.source), target_block, dns, ips)
        if made:
            proposed += made
        else:
            seen.append(location.locator)
    ghosts = session.exec(select(Location.locator).where(Location.certificate_fingerprint == fp,
                                                         col(Location.ghost).is_(True))).all()
    if ghosts:
        notes.append(f"{len(ghosts)} place(s) where discovery no longer sees it are not proposed: "
                     + ", ".join(sorted(ghosts)[:5]))
    if not proposed:
        notes.append("no target proposed: add targets with `certpilot target add` after adopting it")
    owner = owner or _owner(session, row, policy, now, notes)
    return AdoptionProposal(fp, row.subject, row.serial_hex, row.issuer, row.not_before, row.not_after, dns, ips,
                            algorithm or "ec-p256", str(ref) if ref else None, owner, dict(row.tags or {}),
                            tuple(_unique_names(proposed)), tuple(seen), tuple(notes))


def _unique_names(proposed: list[ProposedTarget]) -> list[ProposedTarget]:
    out: list[ProposedTarget] = []
    used: set[str] = set()
    for target in proposed:
        name, n = target.name, 1
        while name in used:
            n += 1
            name = f"{target.name}-{n}"
        used.add(name)
        out.append(dataclasses.replace(target, name=name))
    return out


def _target_name(*parts: str) -> str:
    return _UNSAFE.sub("-", "-".join(p for p in parts if p)).strip("-.")[:100] or "target"


def _targets_at(location: Location, block: str | None, ssh_block: str | None, dns: tuple[str, ...],
                ips: tuple[str, ...]) -> list[ProposedTarget]:
    scheme = location.locator.split("://", 1)[0]
    details = dict(location.details or {})
    source_name = location.source.split(":", 1)[-1]
    if scheme == "ssh":
        return _ssh_targets(location, details, ssh_block or block, source_name, dns, ips)
    if scheme == "aws-acm" and details.get("arn"):
        kind = details.get("type")
        needs = () if kind in (None, "IMPORTED") else (f"an {kind} certificate cannot be re-imported (ACM renews "
                                                       "its own): leave it to ACM, or import a new one",)
        return [ProposedTarget(_target_name(source_name, "acm"), TargetKind.AWS_ACM.value, block,
                               {"certificate_arn": details["arn"]}, location.locator,
                               "an ACM certificate: re-imported in place", needs)]
    if scheme == "azure-kv" and details.get("name") and details.get("current", True):
        return [ProposedTarget(_target_name(source_name, str(details["name"])), TargetKind.AZURE_KV.value, block,
                               {"certificate_name": details["name"]}, location.locator,
                               "the current version of a Key Vault certificate: each deploy imports a new version")]
    return []


def _endpoint(listen: Sequence[str], names: Sequence[str], dns: tuple[str, ...],
              ips: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """verify_host/port/sni from a listen address and the server names the certificate covers."""
    settings: dict[str, Any] = {}
    needs: list[str] = []
    chosen = listen[0] if listen else None
    if chosen is None:
        needs.append("verify_port: where the site is served is not known (no listen or bind address)")
    else:
        host, _, port = chosen.split()[0].rpartition(":")
        host = host.strip("[]")
        if not port.isdigit():
            needs.append(f"verify_port: the listen address {chosen!r} names no port")
        else:
            settings["verify_port"] = int(port)
            if host and host not in ("*", "0.0.0.0", "::"):
                settings["verify_host"] = host
    covered = [n.lower() for n in names if n.lower() in dns]
    sni = covered[0] if covered else next((n for n in dns if not n.startswith("*.")), None)
    if sni:
        settings["verify_sni"] = sni
    elif ips:
        settings["verify_hostname"] = ips[0]
    return settings, needs


def _ssh_targets(location: Location, details: dict[str, Any], block: str | None, source_name: str,
                 dns: tuple[str, ...], ips: tuple[str, ...]) -> list[ProposedTarget]:
    path = str(details.get("path") or urlsplit(location.locator).path)
    served = [Served.from_dict(s) for s in details.get("served_by") or []]
    block_need = () if block else ("block: the SSH host block to deploy through is not known (give --target-block)",)
    out: list[ProposedTarget] = []
    for s in served:
        settings, needs = _endpoint(s.listen, s.server_names, dns, ips)
        if s.server == "nginx":
            settings = {"certificate_path": path, "key_path": s.key_path, **settings}
            if not s.key_path:
                needs.append(f"key_path: {s.config} names no ssl_certificate_key for it")
            if not s.config.startswith(_SYSTEM_NGINX):
                needs.append(f"test_command, reload_command: the nginx that reads {s.config} is not the system's "
                             "(/etc/nginx): give the commands that test and reload it")
            out.append(ProposedTarget(_target_name(source_name, "nginx"), TargetKind.SSH_NGINX.value, block,
                                      {k: v for k, v in settings.items() if v is not None}, location.locator,
                                      f"nginx serves it: {s.config} names it"
                                      + (f" for {', '.join(s.server_names)}" if s.server_names else ""),
                                      (*block_need, *needs)))
        elif s.server == "haproxy":
            settings = {"pem_path": path, **settings}
            if s.runtime_socket:
                settings["runtime_socket"] = s.runtime_socket
            else:
                needs.append(f"runtime_socket | reload_command: {s.config} has no stats socket at level admin: give "
                             "the command that reloads haproxy")
            out.append(ProposedTarget(_target_name(source_name, "haproxy"), TargetKind.SSH_HAPROXY.value, block,
                                      settings, location.locator, f"haproxy serves it: {s.config} binds it",
                                      (*block_need, *needs)))
    if not served:
        key_path = details.get("key_path")
        same_file = key_path == path
        kind = TargetKind.SSH_HAPROXY if same_file else TargetKind.SSH_NGINX
        settings = {"pem_path": path} if same_file else {"certificate_path": path, "key_path": key_path}
        needs = ["which server serves it: discovery read no nginx or haproxy configuration naming it (add the "
                 "configuration to the SSH host block's discovery_globs, or add the target yourself)"]
        if not key_path:
            needs.append("key_path: no key file beside it was found")
        out.append(ProposedTarget(_target_name(source_name, "file"), None, block,
                                  {k: v for k, v in settings.items() if v is not None}, location.locator,
                                  f"a certificate file{' holding its key (haproxy-like)' if same_file else ''}; "
                                  f"perhaps {kind.value}", (*block_need, *needs)))
    return out


# -------------------------------------------------------------------------------------------- adopt

def check_name(session: Session, name: str) -> None:
    """PermanentError when a managed certificate named ``name`` exists already."""
    if session.exec(select(ManagedCertificate.id).where(ManagedCertificate.name == name)).first() is not None:
        raise PermanentError(f"a managed certificate named {name!r} already exists: choose another --name")


def adopt(session: Session, fingerprint: str, name: str, issuer: str, accepted: Sequence[ProposedTarget],
          actor: audit.Actor, *, owner: str | None = None, policy: Policy | None = None,
          now: dt.datetime | None = None) -> Adopted:
    """Make the discovered certificate ``fingerprint`` managed certificate ``name`` from ``issuer``, with
    the ``accepted`` targets that are ready (the others are listed as skipped), owned by ``owner``, else
    by the proposal's owner (the certificate's, else the first of ``policy``'s ownership rules matching
    it). Refuses (PermanentError, NotFoundError) what ``propose`` refuses, a name that is taken, and a
    certificate left without an owner, before anything is written."""
    now = now or utcnow()
    proposal = propose(session, fingerprint, now=now, policy=policy, owner=owner)
    check_name(session, name)
    owner = proposal.owner
    if not owner:
        rules = f" and no ownership rule of the policy ({policy.source}) matches it" if policy is not None else ""
        raise PermanentError(f"managed certificate {name!r} needs an owner: certificate {proposal.fingerprint[:16]} "
                             f"has none{rules}; give --owner")
    ready = [t for t in accepted if t.ready]
    skipped = [f"{t.name}: needs " + "; ".join(t.needs or ("a kind and a block",)) for t in accepted if not t.ready]
    for target in ready:
        assert target.kind is not None
        try:
            validate_settings(target.kind, target.settings, target.name)
        except TargetSettingsError as exc:
            raise PermanentError(f"proposed target {target.name}: {exc}") from None
    spec = managed.ManagedSpec(name=name, dns_names=proposal.dns_names, ip_addresses=proposal.ip_addresses,
                               issuer=issuer, key_algorithm=proposal.key_algorithm, owner=owner,
                               tags=proposal.tags)
    row = managed.add(session, spec, actor, now)
    certificate = session.get(Certificate, proposal.fingerprint)
    if certificate is None:
        raise NotFoundError(f"certificate {proposal.fingerprint[:16]} left the inventory")
    certificate.managed_certificate_id = row.id
    session.add(certificate)
    session.flush()
    for target in ready:
        assert target.kind is not None and target.block is not None
        added = targets.add(session, name, target.name, target.kind, target.block, target.settings, actor, now)
        targets.set_desired(session, added, proposal.fingerprint, actor, now)
    audit.append(session, actor, [audit.Change("managed.adopted", f"managed:{name}", {
        "fingerprint": proposal.fingerprint, "targets": [t.name for t in ready], "skipped": skipped,
        "from": sorted({t.location for t in ready}), "key": proposal.key})], now)
    return Adopted(name, proposal.fingerprint, tuple(t.name for t in ready), tuple(skipped), proposal.key)
