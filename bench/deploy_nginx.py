"""Benchmark: deploying 100 certificates to 10 nginx targets over SSH, each proven on the wire.

    python bench/deploy_nginx.py            # 100 certificates to 10 targets
    python bench/deploy_nginx.py --quick    # 20 certificates to 4 targets
    python bench/deploy_nginx.py --certificates N --targets M

What it does, all on this machine (root: the lab user certpilot-lab runs nginx and logs in over SSH):

1. Not timed: a fresh inventory (SQLite in a temporary CERTPILOT_HOME) with certpilot's private CA; one
   real sshd (lab.sshd) and M real nginx instances (lab.nginx), one per target, each with its share of
   the N sites (server blocks on their own ports), serving at first a certificate the same CA issued
   (so a deploy replaces a real certificate). N managed certificates, one per site, each with one
   ssh-nginx Target naming its site, and a current certificate issued through PrivateCAIssuer with its
   key sealed in the keystore (certpilot.renewing.renew_one).
2. Timed, concurrent: for every managed certificate, what the deploy-target task does without Prefect:
   read the target and the plan, build the deployer from an SshHostBlock (one block object per nginx,
   so one SSH login per target), and certpilot.rollout.bring_to: record the desired fingerprint,
   reconcile (read the file on the host), deploy (backups, upload key and chain, rename, nginx -t,
   reload) and verify on the wire (TLS handshakes until the new certificate is served 5 times in a row,
   complete chain, name), recording deployed/verified. One worker thread per nginx target (--workers
   for fewer): sites of one nginx go one after another, so its reloads never race.
3. Checked after timing: every outcome is "deployed", every site serves its managed certificate's
   current certificate (one more handshake, connectors.tls_verify.fetch_chain; its chain leads to the
   CA's root and the name matches) and every Target row has verified_fingerprint ==
   desired_fingerprint == that certificate. Any failure stops the benchmark (exit status 1).
4. Every managed certificate is renewed again (not timed), then the same deploys are timed one after
   another (sequential), with fresh SSH logins, and checked the same way.

Per-deploy times (deploy + verify, with the reads and records around them) are printed as median and
p95, with where the time goes (reconcile, deploy, verify) and the CPU this process and the lab's sshd
and nginx (with their children) used: the machine may be shared, so only those are counted. Where the
time goes, measured on 2 cores: nginx's master sleeps 100 ms after starting new workers before it tells
the old ones to quit, and until then both answer, so a reload is served for sure only after about
110 ms; verify then needs 5 matching handshakes 20 ms apart. The output ends with
`figure deploy_total_seconds: S s` (concurrent), `figure deploy_sequential_seconds: S s` and
`figure deploys_per_second: R deploys/s` (concurrent).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-deploy-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect")  # blocks import prefect: keep ~/.prefect untouched
os.environ["CERTPILOT_HOME"] = str(WORK / "certpilot")
for _name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "PREFECT_API_URL"):
    os.environ.pop(_name, None)

import sqlalchemy as sa  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from blocks.ssh import SshHostBlock  # noqa: E402
from blocks.targets import build_deployer  # noqa: E402
from certpilot import audit, ca, keystore, managed, renewing, rollout, targets  # noqa: E402
from certpilot.database import get_engine, read_session, write_session  # noqa: E402
from certpilot.deployment import DeployBundle, Deployer, Receipt, Removal, Verification, key_to_pem  # noqa: E402
from certpilot.errors import NotFoundError  # noqa: E402
from certpilot.issuance import build_csr  # noqa: E402
from certpilot.keys import generate_private_key  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from connectors.private_ca import PrivateCAIssuer  # noqa: E402
from connectors.tls_verify import TlsProbeError, check_chain, check_hostname, fetch_chain  # noqa: E402
from lab.nginx import NginxInstance  # noqa: E402
from lab.sshd import SshServer  # noqa: E402

CA_NAME = "bench"
ISSUER = f"private-ca/{CA_NAME}"
ACTOR = audit.Actor("bench")
COMMAND_TIMEOUT = 30.0


def log(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Site:
    """One managed certificate, served by one site (server block) of one nginx target."""

    managed: str  # the managed certificate's name
    target: str  # its one Target's name: the nginx instance
    nginx: int  # index of the nginx instance
    server_name: str  # the site's server_name, SNI and DNS name


def layout(certificates: int, nginx_count: int) -> list[Site]:
    """Certificate i goes to nginx i % M: every nginx gets N/M sites (rounded)."""
    return [Site(f"deploy-{i:04d}", f"nginx{i % nginx_count:02d}", i % nginx_count,
                 f"site{i:04d}.nginx{i % nginx_count:02d}.bench.test") for i in range(certificates)]


class Lab:
    """The sshd, the nginx instances and the inventory's CA, key ring and engine."""

    def __init__(self, sites: list[Site], nginx_count: int) -> None:
        self.sites = sites
        self.nginx_count = nginx_count
        self.engine: sa.Engine = get_engine()
        self.ring = keystore.load_key_ring(load_settings())
        self.server = SshServer(WORK / "sshd")
        self.nginx: list[NginxInstance] = []
        self.root: x509.Certificate | None = None

    def key_ring(self) -> keystore.KeyRing:
        return self.ring

    def start(self) -> None:
        with write_session(self.engine) as session:
            ca.init_ca(session, self.ring, ACTOR, CA_NAME, "http://127.0.0.1:8888")
        with read_session(self.engine) as session:
            signer = ca.open_signer(session, self.ring, CA_NAME)
        self.root = signer.root
        chain_pem = signer.certificate.public_bytes(Encoding.PEM)
        self.server.start()
        if self.server.fallback_reason:
            log(f"note: {self.server.fallback_reason}")
        # What each site serves before the benchmark: a certificate from the same CA, recorded in the inventory.
        pairs: dict[str, tuple[bytes, bytes]] = {}
        issued = []
        for site in self.sites:
            key = generate_private_key("ec-p256")
            cert = signer.sign(build_csr(key, [site.server_name]), "tls-server", validity_days=30)
            issued.append(cert)
            pairs[site.server_name] = (cert.public_bytes(Encoding.PEM) + chain_pem, key_to_pem(key))
        with write_session(self.engine) as session:
            ca.store_issued(session, ACTOR, signer, issued, "tls-server")
        del signer
        for index in range(self.nginx_count):
            names = [s.server_name for s in self.sites if s.nginx == index]
            # Built and started one at a time: the ports of running instances are taken, so free_port skips them.
            instance = NginxInstance(self.server.home / f"nginx{index:02d}", names, user=self.server.user,
                                     pairs={n: pairs[n] for n in names})
            self.nginx.append(instance.start())
        pairs.clear()

    def define(self) -> None:
        """The managed certificates and their targets (one site each)."""
        with write_session(self.engine) as session:
            for site in self.sites:
                managed.add(session, managed.ManagedSpec(name=site.managed, dns_names=(site.server_name,),
                                                         issuer=ISSUER, validity_days=30, owner="bench"), ACTOR)
                # No verify_trust here: target settings go into the audit trail, which refuses PEM text, so
                # verify() checks the chain is complete; check_round checks it leads to this CA's root.
                settings = {**self.nginx[site.nginx].deploy_settings(site.server_name),
                            "command_timeout": COMMAND_TIMEOUT}
                targets.configure(session, site.managed, site.target, "ssh-nginx", f"ssh-host/bench-{site.target}",
                                  settings, ACTOR)

    def renew_all(self) -> None:
        """A new current certificate for every managed certificate: key sealed in the keystore, CA-signed."""
        issuer = PrivateCAIssuer(self.engine, CA_NAME, self.key_ring, actor=ACTOR)
        for site in self.sites:
            renewing.renew_one(self.engine, site.managed, issuer, self.key_ring, ACTOR)

    def server_pids(self) -> list[int]:
        """The sshd and nginx master processes (for CPU accounting)."""
        pids = [int((self.server.workdir / "sshd.pid").read_text().split()[0])]
        return pids + [pid for pid in (instance.master_pid for instance in self.nginx) if pid is not None]

    def host_block(self) -> SshHostBlock:
        """An SSH host block for the lab's sshd (not saved: no Prefect API needed). A new object each
        time, so a new SSH connection."""
        return SshHostBlock(address=self.server.host, port=self.server.port, user=self.server.user,
                            private_key=self.server.client_private_key, known_hosts=self.server.known_hosts_line,
                            command_timeout=COMMAND_TIMEOUT)

    def stop(self) -> None:
        for instance in self.nginx:
            instance.stop()
        self.server.stop()


class TimedDeployer:
    """A Deployer that hands every call to the real one and adds up the time each method takes."""

    def __init__(self, inner: Deployer, phases: dict[str, float]) -> None:
        self.inner, self.phases = inner, phases
        self.name, self.kind = inner.name, inner.kind

    def _timed(self, phase: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def current(self) -> str | None:
        return self._timed("reconcile", self.inner.current)

    def deploy(self, bundle: DeployBundle) -> Receipt:
        return self._timed("deploy", lambda: self.inner.deploy(bundle))

    def verify(self, fingerprint: str) -> Verification:
        return self._timed("verify", lambda: self.inner.verify(fingerprint))

    def rollback(self, receipt: Receipt) -> None:
        self._timed("rollback", lambda: self.inner.rollback(receipt))

    def remove(self) -> Removal:
        return self.inner.remove()

    def restore(self, removal: Removal) -> str:
        return self.inner.restore(removal)

    def purge(self, removal: Removal) -> None:
        self.inner.purge(removal)


@dataclass
class Round:
    """One timed round: elapsed wall time, per-deploy times and outcomes."""

    label: str
    elapsed: float = 0.0
    durations: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, rollout.Outcome] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    own_cpu: float = 0.0  # CPU seconds this process used (paramiko, TLS handshakes, SQLite)
    lab_cpu: float = 0.0  # CPU seconds the lab's sshd and nginx used, with their children (shells, nginx -t, ...)


def deploy_one(lab: Lab, block: SshHostBlock, site: Site, result: Round) -> None:
    """What the deploy-target task does for one target, without Prefect."""
    phases: dict[str, float] = {}
    start = time.perf_counter()
    with read_session(lab.engine) as session:
        target = targets.get_target(session, site.managed, site.target)
        fingerprint = targets.plan(session, site.managed).fingerprint
    deployer = TimedDeployer(build_deployer(block, target.name, target.kind, dict(target.settings),
                                            lookup=targets.lookup(lab.engine, site.managed, lab.key_ring)), phases)

    def bundle() -> DeployBundle:
        found = targets.bundle(lab.engine, site.managed, fingerprint, lab.key_ring)
        if found is None:
            raise NotFoundError(f"the key of certificate {fingerprint[:16]} is not in the keystore")
        return found

    try:
        outcome = rollout.bring_to(lab.engine, target, deployer, bundle, fingerprint, ACTOR)
    except rollout.TargetFailed as exc:
        with result.lock:
            result.failures[site.managed] = str(exc)
        return
    elapsed = time.perf_counter() - start
    with result.lock:
        result.outcomes[site.managed] = outcome
        result.durations.append(elapsed)
        for phase, seconds in phases.items():
            result.phases[phase] = result.phases.get(phase, 0.0) + seconds


def run_round(lab: Lab, label: str, workers: int) -> Round:
    """Deploy every managed certificate's current certificate to its site; ``workers`` nginx targets at
    once (1: sequential). Sites of one nginx always go one after another."""
    result = Round(label)
    blocks = [lab.host_block() for _ in range(lab.nginx_count)]  # fresh logins: each round pays for its own
    by_nginx = [[s for s in lab.sites if s.nginx == index] for index in range(lab.nginx_count)]

    def work(index: int) -> None:
        for site in by_nginx[index]:
            deploy_one(lab, blocks[index], site, result)

    roots = lab.server_pids()
    lab_cpu, own = tree_cpu_seconds(roots), process_cpu_seconds()
    start = time.perf_counter()
    try:
        if workers <= 1:
            for index in range(lab.nginx_count):
                work(index)
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="deploy") as pool:
                for future in [pool.submit(work, index) for index in range(lab.nginx_count)]:
                    future.result()
        result.elapsed = time.perf_counter() - start
        result.lab_cpu, result.own_cpu = tree_cpu_seconds(roots) - lab_cpu, process_cpu_seconds() - own
    finally:
        for block in blocks:
            block.connection().close()
    return result


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks of the process and of its exited, waited-for children), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), sum(int(v) for v in fields[11:15])  # ppid; utime, stime, cutime, cstime


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by the processes ``roots`` and all their descendants, live or exited (the
    machine is shared with other work: only the lab's own processes are counted)."""
    stats = {int(d): _proc_stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    ticks, pending = 0, list(roots)
    while pending:
        pid = pending.pop()
        stat = stats.get(pid)
        if stat is not None:
            ticks += stat[1]
            pending.extend(children.get(pid, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def check_round(lab: Lab, result: Round) -> None:
    """Fail loudly unless every target was deployed, serves its current certificate on the wire and has
    verified == desired == current in the inventory."""
    problems = [f"{name}: {reason}" for name, reason in sorted(result.failures.items())]
    with read_session(lab.engine) as session:
        for site in lab.sites:
            current = managed.current_certificate(session, managed.get(session, site.managed))
            assert current is not None, site.managed
            expected = current.fingerprint_sha256
            outcome = result.outcomes.get(site.managed)
            if outcome is not None and outcome.action != "deployed":
                problems.append(f"{site.managed}: outcome {outcome.action} ({outcome.detail}), not deployed")
            [row] = targets.list_targets(session, site.managed)
            if not (row.desired_fingerprint == row.verified_fingerprint == expected):
                problems.append(f"{site.managed}: inventory desired {str(row.desired_fingerprint)[:16]}, verified "
                                f"{str(row.verified_fingerprint)[:16]}, current {expected[:16]}")
            port = lab.nginx[site.nginx].site(site.server_name).port
            try:
                presented = fetch_chain("127.0.0.1", port, sni=site.server_name, timeout=5.0)
            except TlsProbeError as exc:
                problems.append(f"{site.managed}: {exc}")
                continue
            if presented.fingerprint != expected:
                problems.append(f"{site.managed}: 127.0.0.1:{port} ({site.server_name}) serves "
                                f"{presented.fingerprint[:16]}, not {expected[:16]}")
                continue
            chain = [x509.load_der_x509_certificate(der) for der in presented.chain]
            problem = check_chain(chain, [lab.root]) or check_hostname(chain[0], site.server_name)
            if problem:
                problems.append(f"{site.managed}: 127.0.0.1:{port}: {problem}")
    if problems:
        raise SystemExit(f"{result.label}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:30]))


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def describe(result: Round, count: int, nginx_count: int) -> None:
    phases = ", ".join(f"{phase} {seconds / count * 1000:.0f} ms" for phase, seconds in sorted(result.phases.items()))
    log(f"{result.label}: {count} certificates to {nginx_count} nginx targets in {result.elapsed:.2f} s "
        f"({count / result.elapsed:.1f} deploys/s); per deploy (deploy + verify, with reads and records): "
        f"median {statistics.median(result.durations) * 1000:.0f} ms, p95 "
        f"{percentile(result.durations, 0.95) * 1000:.0f} ms, max {max(result.durations) * 1000:.0f} ms")
    log(f"{result.label}: mean time per deploy in: {phases}")
    cores = os.cpu_count() or 1
    log(f"{result.label}: CPU {result.own_cpu + result.lab_cpu:.1f} s of {result.elapsed * cores:.1f} s available "
        f"on {cores} cores: this process {result.own_cpu:.1f} s, sshd and nginx with their children "
        f"{result.lab_cpu:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 certificates to 4 targets")
    parser.add_argument("--certificates", type=int, help="managed certificates, one site each (default 100)")
    parser.add_argument("--targets", type=int, help="nginx targets (default 10)")
    parser.add_argument("--workers", type=int, help="nginx targets deployed at once (default: all)")
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({WORK})")
    args = parser.parse_args()
    count = args.certificates or (20 if args.quick else 100)
    nginx_count = args.targets or (4 if args.quick else 10)
    if count < 1 or nginx_count < 1 or nginx_count > count:
        parser.error("need at least one certificate per target")
    workers = args.workers or nginx_count

    sites = layout(count, nginx_count)
    lab = Lab(sites, nginx_count)
    try:
        started = time.perf_counter()
        lab.start()
        log(f"lab: sshd on 127.0.0.1:{lab.server.port} as {lab.server.user}, {nginx_count} nginx with "
            f"{count} sites, started in {time.perf_counter() - started:.1f} s (work dir {WORK})")
        started = time.perf_counter()
        lab.define()
        lab.renew_all()
        log(f"inventory: {count} managed certificates with a target each, issued in "
            f"{time.perf_counter() - started:.1f} s (not timed)")

        concurrent_round = run_round(lab, "concurrent", workers)
        check_round(lab, concurrent_round)
        describe(concurrent_round, count, nginx_count)

        started = time.perf_counter()
        lab.renew_all()
        log(f"renewed all {count} again in {time.perf_counter() - started:.1f} s (not timed)")
        sequential_round = run_round(lab, "sequential", 1)
        check_round(lab, sequential_round)
        describe(sequential_round, count, nginx_count)
        log(f"checked: all {count} sites serve their new certificate on the wire after each round, and every "
            "target's verified fingerprint equals its desired one")
    finally:
        lab.stop()
        lab.engine.dispose()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)

    log(f"{count} certificates to {nginx_count} nginx targets over SSH, {workers} at once")
    log(f"figure deploy_median_seconds: {statistics.median(concurrent_round.durations):.3f} s")
    log(f"figure deploy_p95_seconds: {percentile(concurrent_round.durations, 0.95):.3f} s")
    log(f"figure deploy_sequential_median_seconds: {statistics.median(sequential_round.durations):.3f} s")
    log(f"figure deploy_sequential_p95_seconds: {percentile(sequential_round.durations, 0.95):.3f} s")
    log(f"figure deploy_total_seconds: {concurrent_round.elapsed:.2f} s")
    log(f"figure deploy_sequential_seconds: {sequential_round.elapsed:.2f} s")
    log(f"figure deploys_per_second: {count / concurrent_round.elapsed:.2f} deploys/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
