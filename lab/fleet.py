"""A fleet on loopback for drills, tests and benchmarks: one sshd (lab.sshd) fronting N nginx and M haproxy
instances (lab.nginx, lab.haproxy), each serving several TLS names, and K managed certificates from a private
CA in the inventory, each with a target on R instances (``replicas``: its name's site there), issued and
proven served.

    with Fleet(workdir, engine, key_ring, certificates=50, nginx=4, haproxy=1) as fleet:
        fleet.save_block()          # the targets' SSH host block, for flows run against a Prefect API
        fleet.served()              # {site: fingerprint served on the wire}
        fleet.current()             # {managed name: fingerprint of its current certificate}

What ``start()`` builds, in this order (``timings`` says how long each part took):

1. ``sshd``: one real OpenSSH server for the lab user; every instance runs as that user under its home.
2. The private CA ``ca_name``: created in the inventory when it does not exist, its certificates carrying
   ``ca_url`` as their CRL distribution point and OCSP responder. Without ``ca_url`` the fleet serves the
   CA itself (connectors.http_service, the listener `certpilot serve` and `ca serve` run) on a free port;
   with it, whoever listens there does (``certpilot serve --listen``, say).
3. ``issue``: K managed certificates (``layout``: name i goes to instances i .. i+R-1 mod (N+M), nginx first)
   and their first certificates, signed through the core (certpilot.ca.open_signer, once) with each key
   sealed in the keystore and the certificate recorded as the managed certificate's current one
   (renewing.record_issued). With ``issuer=(block reference, Issuer)`` (ACME, say) there is no private CA:
   the managed certificates name that issuer block and their first certificates come from it
   (renewing.renew_one), and ``trust`` is the root their chains lead to.
4. ``servers``: the instances started with those certificates already in place (the estate as found; with
   an ``issuer``, placeholders, which step 6 replaces).
5. ``targets``: each managed certificate's target, ``ssh-nginx`` or ``ssh-haproxy`` through the SSH host
   block ``ssh-host/<block>`` (or one per instance, ``block_per_instance``; not saved until ``save_block``:
   building the fleet needs no Prefect API).
6. ``verify``: certpilot.rollout.bring_to for every target, one worker per instance over one SSH login each,
   as the deploy flow does it: it finds each certificate in place, proves it served on the wire, and
   records the target's desired and verified fingerprint (it deploys one that is not in place).

Everything listens on 127.0.0.1 on free ports; ``stop()`` stops what ``start()`` started.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certpilot import audit, ca, keystore, managed, renewing, rollout, targets
from certpilot.database import read_session, write_session
from certpilot.deployment import DeployBundle, key_to_pem
from certpilot.errors import CertpilotError, NotFoundError
from certpilot.issuance import IssuedCertificate, Issuer, build_csr
from certpilot.keys import generate_private_key
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from lab.ports import free_port
from lab.sshd import LabError, SshServer

ACTOR = audit.Actor("lab")
NGINX = "ssh-nginx"
HAPROXY = "ssh-haproxy"
COMMAND_TIMEOUT = 30.0
VERIFY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Site:
    """One place a managed certificate is served: its DNS name on one instance (its target there)."""

    managed: str  # the managed certificate's name
    server_name: str  # its DNS name, the SNI to ask for
    instance: str  # the instance serving it, and the target's name: nginx00, haproxy01...
    kind: str  # ssh-nginx or ssh-haproxy


def layout(certificates: int, nginx: int, haproxy: int, *, replicas: int = 1, prefix: str = "cert",
           domain: str = "fleet.test") -> list[Site]:
    """Certificate i goes to instances i, i+1, ... i+replicas-1 (mod nginx + haproxy), the nginx instances
    first; its DNS name is the same on each."""
    instances = ([(f"nginx{i:02d}", NGINX) for i in range(nginx)]
                 + [(f"haproxy{i:02d}", HAPROXY) for i in range(haproxy)])
    if certificates < 1 or nginx < 0 or haproxy < 0 or not instances:
        raise ValueError("a fleet needs at least one certificate and one instance")
    if not 1 <= replicas <= len(instances):
        raise ValueError(f"replicas must be between 1 and the {len(instances)} instances, not {replicas}")
    sites = []
    for i in range(certificates):
        for r in range(replicas):
            instance, kind = instances[(i + r) % len(instances)]
            sites.append(Site(f"{prefix}-{i:04d}", f"{prefix}-{i:04d}.{domain}", instance, kind))
    return sites


class Fleet:
    """The lab's sshd, its nginx and haproxy instances, and the managed certificates they serve."""

    def __init__(self, workdir: Path, engine: sa.Engine, key_ring: Callable[[], keystore.KeyRing], *,
                 certificates: int = 10, nginx: int = 2, haproxy: int = 1, replicas: int = 1,
                 ca_name: str = "fleet", ca_url: str | None = None, issuer: tuple[str, Issuer] | None = None,
                 trust: x509.Certificate | None = None, block: str = "fleet", block_per_instance: bool = False,
                 prefix: str = "cert",
                 domain: str = "fleet.test", validity_days: int = 30, owner: str = "platform",
                 actor: audit.Actor = ACTOR) -> None:
        if issuer is not None and trust is None:
            raise ValueError("a fleet with its own issuer needs the root its chains lead to (trust)")
        self.workdir = Path(workdir)
        self.engine = engine
        self.key_ring = key_ring
        self.sites = layout(certificates, nginx, haproxy, replicas=replicas, prefix=prefix, domain=domain)
        self.ca_name = ca_name
        self.ca_url = ca_url
        self.issuer = issuer
        self.block = block
        self.block_per_instance = block_per_instance
        self.validity_days = validity_days
        self.owner = owner
        self.actor = actor
        self.sshd = SshServer(self.workdir / "sshd")
        self.nginx: dict[str, NginxInstance] = {}
        self.haproxy: dict[str, HaproxyInstance] = {}
        self.root: x509.Certificate | None = trust
        self.issuing: x509.Certificate | None = None  # the private CA's issuing certificate
        self.timings: dict[str, float] = {}
        self._ca_service: Any = None  # connectors.http_service.HTTPService, when the fleet serves its CA

    # ------------------------------------------------------------------------------------ what it is
    def block_name(self, instance: str) -> str:
        """The SSH host block of ``instance``'s targets: ``block``, or ``block-<instance>`` with
        ``block_per_instance`` (as if each instance were a host of its own: one SSH login each)."""
        return f"{self.block}-{instance}" if self.block_per_instance else self.block

    @property
    def instances(self) -> list[str]:
        return sorted({s.instance for s in self.sites})

    @property
    def names(self) -> list[str]:
        """The managed certificates' names, in order."""
        return list(dict.fromkeys(s.managed for s in self.sites))

    def sites_of(self, name: str) -> list[Site]:
        """Where managed certificate ``name`` is served."""
        found = [site for site in self.sites if site.managed == name]
        if not found:
            raise KeyError(f"no managed certificate {name!r} in the fleet")
        return found

    @property
    def issuer_reference(self) -> str:
        return self.issuer[0] if self.issuer is not None else f"private-ca/{self.ca_name}"

    def endpoint(self, site: Site) -> tuple[str, int, str]:
        """(host, port, SNI) where ``site`` is served."""
        if site.kind == NGINX:
            return "127.0.0.1", self.nginx[site.instance].site(site.server_name).port, site.server_name
        return "127.0.0.1", self.haproxy[site.instance].port, site.server_name

    def settings(self, site: Site) -> dict[str, object]:
        """The target settings of ``site``: where its files are, how to reload, where to verify."""
        if site.kind == NGINX:
            own = self.nginx[site.instance].deploy_settings(site.server_name)
        else:
            own = self.haproxy[site.instance].deploy_settings(site.server_name)
        assert self.root is not None
        return {**own, "verify_trust": self.root.public_bytes(Encoding.PEM).decode(),
                "verify_timeout": VERIFY_TIMEOUT, "command_timeout": COMMAND_TIMEOUT}

    def host_block(self) -> Any:
        """A new SshHostBlock object for the lab's sshd (so a new SSH login); not saved."""
        from blocks.ssh import SshHostBlock

        return SshHostBlock(address=self.sshd.host, port=self.sshd.port, user=self.sshd.user,
                            private_key=self.sshd.client_private_key, known_hosts=self.sshd.known_hosts_line,
                            command_timeout=COMMAND_TIMEOUT)

    def save_block(self) -> None:
        """Save the targets' SSH host block(s) (needs a Prefect API)."""
        from blocks.ssh import SshHostBlock

        SshHostBlock.register_type_and_schema()
        for name in sorted({self.block_name(instance) for instance in self.instances}):
            self.host_block().save(name, overwrite=True)

    # ------------------------------------------------------------------------------------ building it
    def start(self) -> Fleet:
        try:
            self._timed("sshd", self._start_sshd)
            if self.issuer is None:
                self._timed("ca", self._ensure_ca)
            pairs = self._timed("issue", self._issue if self.issuer is None else self._issue_with_issuer)
            self._timed("servers", lambda: self._start_servers(pairs))
            pairs.clear()
            self._timed("targets", self._add_targets)
            self._timed("verify", self.prove_served)
        except BaseException:
            self.stop()
            raise
        return self

    def _timed(self, what: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.timings[what] = time.perf_counter() - started

    def _start_sshd(self) -> None:
        self.sshd.start()

    def _ensure_ca(self) -> None:
        if self.ca_url is None:
            from connectors.http_service import HTTPService, build_app

            app = build_app(self.engine, metrics=False, key_ring=self.key_ring)
            self._ca_service = HTTPService(app, ("127.0.0.1", free_port())).start()
            self.ca_url = self._ca_service.url
        with write_session(self.engine) as session:
            try:
                authority = ca.get_ca(session, self.ca_name)
            except NotFoundError:
                authority = ca.init_ca(session, self.key_ring(), self.actor, self.ca_name, str(self.ca_url))
            self.root, self.issuing = ca.ca_certificates(session, authority)
            self.ca_url = authority.base_url

    def _spec(self, name: str) -> managed.ManagedSpec:
        server_name = self.sites_of(name)[0].server_name
        return managed.ManagedSpec(name=name, dns_names=(server_name,), issuer=self.issuer_reference,
                                   validity_days=self.validity_days, owner=self.owner)

    def _issue(self) -> dict[str, tuple[bytes, bytes]]:
        """Every managed certificate and its first certificate from the private CA: {DNS name: (chain PEM, key PEM)}."""
        ring = self.key_ring()
        pairs: dict[str, tuple[bytes, bytes]] = {}
        names = self.names
        for start in range(0, len(names), 100):  # one transaction per hundred
            with write_session(self.engine) as session:
                signer = ca.open_signer(session, ring, self.ca_name)
                chain_der = signer.certificate.public_bytes(Encoding.DER)
                chain_pem = signer.certificate.public_bytes(Encoding.PEM)
                for name in names[start:start + 100]:
                    row = managed.add(session, self._spec(name), self.actor)
                    key = generate_private_key(row.key_algorithm)
                    ref = keystore.store_private_key(session, key, ring, self.actor, "generated")
                    cert = signer.sign(build_csr(key, list(row.dns_names)), "tls-server",
                                       validity_days=self.validity_days)
                    issued = IssuedCertificate((cert.public_bytes(Encoding.DER), chain_der))
                    renewing.record_issued(session, row, issued, ref, self.actor)
                    pairs[row.dns_names[0]] = (cert.public_bytes(Encoding.PEM) + chain_pem, key_to_pem(key))
                del signer
        return pairs

    def _issue_with_issuer(self) -> dict[str, tuple[bytes, bytes]]:
        """Every managed certificate and its first certificate from ``issuer`` (no pairs: deployed in step 6)."""
        assert self.issuer is not None
        with write_session(self.engine) as session:
            for name in self.names:
                managed.add(session, self._spec(name), self.actor)
        for name in self.names:
            renewing.renew_one(self.engine, name, self.issuer[1], self.key_ring, self.actor)
        return {}

    def _start_servers(self, pairs: dict[str, tuple[bytes, bytes]]) -> None:
        user = self.sshd.user
        # One at a time: the ports of running instances are taken, so free_port skips them.
        for instance in self.instances:
            names = [s.server_name for s in self.sites if s.instance == instance]
            mine = {name: pairs[name] for name in names if name in pairs}
            prefix = self.sshd.home / instance
            if instance.startswith("nginx"):
                self.nginx[instance] = NginxInstance(prefix, names, user=user, pairs=mine).start()
            else:
                self.haproxy[instance] = HaproxyInstance(prefix, names[0], also_serves=names[1:], user=user,
                                                         pairs=mine).start()

    def _add_targets(self) -> None:
        with write_session(self.engine) as session:
            for site in self.sites:
                targets.configure(session, site.managed, site.instance, site.kind,
                                  f"ssh-host/{self.block_name(site.instance)}",
                                  self.settings(site), self.actor)

    def prove_served(self, sites: Sequence[Site] | None = None) -> dict[Site, rollout.Outcome]:
        """certpilot.rollout.bring_to for each site's current certificate, one worker per instance over one
        SSH login each: {site: outcome}. LabError naming every site that failed."""
        from blocks.targets import build_deployer

        chosen = list(self.sites if sites is None else sites)
        outcomes: dict[Site, rollout.Outcome] = {}
        failures: dict[str, str] = {}

        def one_instance(instance: str) -> None:
            block = self.host_block()
            try:
                for site in (s for s in chosen if s.instance == instance):
                    try:
                        outcomes[site] = self._bring(block, site, build_deployer)
                    except (CertpilotError, rollout.TargetFailed) as exc:
                        failures[f"{site.managed} on {site.instance}"] = str(exc)
            finally:
                block.connection().close()

        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.instances)), thread_name_prefix="fleet") as pool:
            for future in [pool.submit(one_instance, instance) for instance in self.instances]:
                future.result()
        if failures:
            shown = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items())[:10])
            raise LabError(f"{len(failures)} of {len(chosen)} fleet target(s) not proven served: {shown}")
        return outcomes

    def _bring(self, block: Any, site: Site, build_deployer: Callable[..., Any]) -> rollout.Outcome:
        with read_session(self.engine) as session:
            target = targets.get_target(session, site.managed, site.instance)
            fingerprint = targets.plan(session, site.managed).fingerprint
        deployer = build_deployer(block, target.name, target.kind, dict(target.settings),
                                  lookup=targets.lookup(self.engine, site.managed, self.key_ring))

        def bundle() -> DeployBundle:
            found = targets.bundle(self.engine, site.managed, fingerprint, self.key_ring)
            if found is None:
                raise NotFoundError(f"the key of certificate {fingerprint[:16]} is not in the keystore")
            return found

        return rollout.bring_to(self.engine, target, deployer, bundle, fingerprint, self.actor)

    # ------------------------------------------------------------------------------------ reading it
    def current(self) -> dict[str, str]:
        """{managed name: fingerprint of its current certificate in the inventory}."""
        with read_session(self.engine) as session:
            out = {}
            for name in self.names:
                row = managed.current_certificate(session, managed.get(session, name))
                if row is not None:
                    out[name] = row.fingerprint_sha256
            return out

    def served(self, sites: Iterable[Site] | None = None, *, timeout: float = 5.0,
               workers: int = 16) -> dict[Site, str | None]:
        """{site: fingerprint of the leaf it serves on the wire, one handshake each; None when the handshake
        failed}."""
        from connectors.tls_verify import TlsProbeError, fetch_chain

        chosen = list(self.sites if sites is None else sites)

        def one(site: Site) -> str | None:
            host, port, sni = self.endpoint(site)
            try:
                return fetch_chain(host, port, sni=sni, timeout=timeout).fingerprint
            except (TlsProbeError, OSError):
                return None

        with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(chosen)))) as pool:
            return dict(zip(chosen, pool.map(one, chosen), strict=True))

    def not_serving_current(self) -> list[Site]:
        """The sites whose endpoint does not serve their managed certificate's current certificate."""
        current = self.current()
        return [site for site, found in self.served().items() if found is None or found != current.get(site.managed)]

    # ------------------------------------------------------------------------------------ stopping it
    def stop(self) -> None:
        for instance in [*self.nginx.values(), *self.haproxy.values()]:
            instance.stop()
        self.sshd.stop()
        if self._ca_service is not None:
            self._ca_service.close()
            self._ca_service = None

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
