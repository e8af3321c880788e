"""Benchmark: renewing 50 certificates on the same pebble, certpilot against certbot.

    python bench/acme_vs_certbot.py            # 50 certificates
    python bench/acme_vs_certbot.py --quick    # 5

One pebble 2.4 and one pebble-challtestsrv on loopback (as the integration tests start them:
tests/integration/acme_servers.py), no validation sleeps, no rejected nonces, no authorisation
reuse (every renewal validates every name). http-01 on 127.0.0.1:5002.

certpilot: 50 managed certificates (one DNS name each, EC P-256), first issued, then renewed with
certpilot.renewing.renew_one, the code path of the renew flows: a new key sealed into the keystore, a
CSR, the ACME order through connectors.acme_issuer.AcmeIssuer (the account registered once, reused),
the chain checked and recorded in the inventory (SQLite), the old certificate superseded. The
headline figure renews the 50 one after another, as certbot does; a second pass with a few worker
threads (what the renew-due flow does) is printed too.

certbot: from PyPI, in its own virtual environment (created under the system temp directory, reused
if present: --certbot-venv to choose another), standalone http-01 on 127.0.0.1:5002, its own
--config-dir/--work-dir/--logs-dir, REQUESTS_CA_BUNDLE for pebble's TLS, the same 50 names obtained
one `certbot certonly` each (not timed), then one `certbot renew --no-random-sleep-on-renew
--force-renewal` renewing all 50 lineages (timed; certbot renews a certificate on its own only in the
last third of its lifetime, and pebble's are valid for years).

The output ends with:
    figure certpilot_50_renewals: S s
    figure certbot_50_renewals: S s
    figure acme_speedup_vs_certbot: X x
(with --quick the names say 5). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cryptography import x509  # noqa: E402
from sqlmodel import select  # noqa: E402

from certpilot import audit, database, keystore, managed, renewing  # noqa: E402
from certpilot.database import read_session, write_session  # noqa: E402
from certpilot.models import Certificate  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from connectors.acme_issuer import AcmeIssuer  # noqa: E402
from connectors.challenges import Http01Responder  # noqa: E402
from tests.integration.acme_servers import ChallTestSrv, Pebble, verified_chain  # noqa: E402

ISSUER = "acme-issuer/pebble"
DEFAULT_CERTBOT_VENV = Path(tempfile.gettempdir()) / "certpilot-bench-certbot-venv"


def say(text: str) -> None:
    print(text, flush=True)


def names(count: int) -> list[str]:
    return [f"host{i:03d}.bench.certpilot.test" for i in range(count)]


# -- certpilot --------------------------------------------------------------------------------------

def certpilot_run(pebble: Pebble, home: Path, count: int, http_port: int, workers: int) -> tuple[float, float, float]:
    """(first issuance, renewal one by one, renewal with ``workers`` threads), in seconds."""
    os.environ["CERTPILOT_HOME"] = str(home)
    os.environ["CERTPILOT_DATABASE_URL"] = f"sqlite:///{home / 'inventory.db'}"
    engine = database.get_engine()
    ring = keystore.load_key_ring(load_settings())  # once: the key file is not read again per renewal

    def key_ring() -> keystore.KeyRing:
        return ring

    actor = audit.Actor("bench:certpilot")
    dns_names = names(count)
    with write_session(engine) as session:
        for i, name in enumerate(dns_names):
            managed.add(session, managed.ManagedSpec(f"bench-{i:03d}", (name,), ISSUER, owner="bench"), actor)
    with Http01Responder("127.0.0.1", http_port) as responder:
        issuer = AcmeIssuer(engine, ISSUER, pebble.directory_url, key_ring=key_ring, solver=responder,
                            ca_bundle=pebble.ca_bundle)
        issuer.account()  # register before timing, as certbot registers before its certonly runs

        def renew(index: int) -> renewing.Renewal:
            return renewing.renew_one(engine, f"bench-{index:03d}", issuer, key_ring, actor)

        started = time.perf_counter()
        first = [renew(i) for i in range(count)]
        issued = time.perf_counter() - started
        started = time.perf_counter()
        second = [renew(i) for i in range(count)]
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            third = list(pool.map(renew, range(count)))
        concurrent = time.perf_counter() - started
    check_certpilot(engine, pebble, dns_names, first, second, third)
    database.dispose_engines()
    return issued, sequential, concurrent


def check_certpilot(engine: object, pebble: Pebble, dns_names: list[str], *passes: list[renewing.Renewal]) -> None:
    fingerprints = [r.fingerprint_sha256 for renewals in passes for r in renewals]
    if len(set(fingerprints)) != len(fingerprints):
        raise SystemExit("certpilot: a renewal returned a certificate seen before")
    for earlier, later in zip(passes, passes[1:]):
        if any(b.replaces != a.fingerprint_sha256 for a, b in zip(earlier, later, strict=True)):
            raise SystemExit("certpilot: a renewal does not replace the certificate before it")
    root = pebble.roots()[0]
    with read_session(engine) as session:  # type: ignore[arg-type]
        for renewal, name in zip(passes[-1], dns_names, strict=True):
            row = session.get(Certificate, renewal.fingerprint_sha256)
            assert row is not None and row.status == "active"
            chain = [x509.load_der_x509_certificate(row.der)]
            if row.issuer_fingerprint:
                parent = session.get(Certificate, row.issuer_fingerprint)
                assert parent is not None
                chain.append(x509.load_der_x509_certificate(parent.der))
            verified_chain(chain, root, name)
        superseded = session.exec(select(Certificate).where(Certificate.status == "superseded")).all()
    if len(superseded) != len(dns_names) * (len(passes) - 1):
        expected = len(dns_names) * (len(passes) - 1)
        raise SystemExit(f"certpilot: {len(superseded)} certificates superseded, expected {expected}")


# -- certbot ----------------------------------------------------------------------------------------

def ensure_certbot(venv: Path) -> Path:
    certbot = venv / "bin" / "certbot"
    if certbot.exists():
        return certbot
    say(f"installing certbot from PyPI into its own virtual environment {venv} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "certbot"], check=True, timeout=900)
    return certbot


def certbot_run(certbot: Path, pebble: Pebble, workdir: Path, count: int, http_port: int) -> tuple[float, float, str]:
    """(first issuance, `certbot renew` of every lineage) in seconds, and certbot's version."""
    common = ["--config-dir", str(workdir / "config"), "--work-dir", str(workdir / "work"),
              "--logs-dir", str(workdir / "logs"), "--server", pebble.directory_url, "--non-interactive"]
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}

    def run(*args: str, timeout: float = 600) -> str:
        done = subprocess.run([str(certbot), *args, *common], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"certbot {args[0]} failed ({done.returncode}):\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    version = subprocess.run([str(certbot), "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    run("register", "--agree-tos", "--register-unsafely-without-email")
    started = time.perf_counter()
    for name in names(count):
        run("certonly", "--standalone", "--preferred-challenges", "http", "--http-01-address", "127.0.0.1",
            "--http-01-port", str(http_port), "--key-type", "ecdsa", "--cert-name", name, "-d", name)
    issued = time.perf_counter() - started
    started = time.perf_counter()
    output = run("renew", "--no-random-sleep-on-renew", "--force-renewal", timeout=3600)
    renewed = time.perf_counter() - started
    for name in names(count):
        if not (workdir / "config" / "archive" / name / "cert2.pem").exists():
            raise SystemExit(f"certbot did not renew {name}:\n{output[-3000:]}")
    return issued, renewed, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 certificates instead of 50")
    parser.add_argument("--count", type=int, help="how many certificates (default 50, or 5 with --quick)")
    parser.add_argument("--workers", type=int, default=8, help="threads of the extra concurrent certpilot pass")
    parser.add_argument("--http-port", type=int, default=5002, help="the http-01 port pebble validates on")
    parser.add_argument("--certbot-venv", type=Path, default=DEFAULT_CERTBOT_VENV,
                        help="certbot's own virtual environment (created if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    count = args.count or (5 if args.quick else 50)

    workdir = Path(tempfile.mkdtemp(prefix="certpilot-bench-acme-"))
    say(f"working directory {workdir}")
    certbot = ensure_certbot(args.certbot_venv)
    try:
        with ChallTestSrv.start(workdir / "challtestsrv") as dns, \
                Pebble.start(workdir / "pebble", dns=dns, http_port=args.http_port) as pebble:
            say(f"pebble at {pebble.directory_url}, http-01 on 127.0.0.1:{args.http_port}, {count} certificates")
            cp_issue, cp_renew, cp_concurrent = certpilot_run(pebble, workdir / "certpilot-home", count,
                                                              args.http_port, args.workers)
            say(f"certpilot: first issuance {cp_issue:.2f} s; renewal one by one {cp_renew:.2f} s "
                f"({cp_renew / count * 1000:.0f} ms per certificate); renewal with {args.workers} threads "
                f"{cp_concurrent:.2f} s")
            cb_issue, cb_renew, version = certbot_run(certbot, pebble, workdir / "certbot", count, args.http_port)
            say(f"{version}: first issuance ({count} `certbot certonly` runs) {cb_issue:.2f} s; "
                f"`certbot renew` of {count} lineages {cb_renew:.2f} s "
                f"({cb_renew / count * 1000:.0f} ms per certificate)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = cb_renew / cp_renew
    say(f"certpilot renews {count} certificates {ratio:.1f}x faster than certbot one by one "
        f"({cb_renew / cp_concurrent:.1f}x with {args.workers} threads)")
    say(f"figure certpilot_{count}_renewals: {cp_renew:.2f} s")
    say(f"figure certbot_{count}_renewals: {cb_renew:.2f} s")
    say(f"figure acme_speedup_vs_certbot: {ratio:.1f} x")


if __name__ == "__main__":
    main()
