"""Benchmark: 1,000 renewals against pebble with 30% of requests failing transiently on the way.

    .venv/bin/python bench/renew_under_faults.py            # 1,000 renewals
    .venv/bin/python bench/renew_under_faults.py --quick    # 50

Loopback only: pebble 2.4 and pebble-challtestsrv as the integration tests start them
(tests/integration/acme_servers.py), our http-01 responder, and the fault proxy (lab/fault_proxy.py, HTTP
mode) between certpilot and pebble: TLS ends at the proxy, which speaks TLS to pebble. Seeded: of every
request, 8% are reset before they are forwarded, 8% forwarded and their answer cut in half (the CA acted,
certpilot never heard), 10% answered 502/503/504 by the proxy and 4% answered 429 with Retry-After: 1.

The estate: N managed certificates whose current certificate expires in five days (all due), split into
--shards inventories (SQLite files; default 4) as renew-due's batches are split among workers. Then, for
each shard at once (a thread each, one issuer and one ACME account each), renew-due as `certpilot renew
--due` runs it without a Prefect API (cli.renewals, through tests/integration/acme_faults.renew_due_directly:
the due list, the renewal steps with certpilot's defaults, the renew task's retries after 1, 2 and 4 s),
again while anything is still due and failed, at most --runs runs. One renew-due over 1,000 certificates in
one process would take about 20 minutes here: it renews one certificate after another, and a third of the
requests wait out a backoff or a Retry-After.

Figures (the end of the output):
    figure renewal_success_percent: P %       renewed / N after the runs (goal: at least 99.9)
    figure duplicate_issuances: N             certificates pebble issued (its log) beyond one per renewal,
                                              or not recorded in the inventory (goal: 0)
    figure renew_under_faults_seconds: S s    the renew-due runs, wall time
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-faults-"))
os.environ["CERTPILOT_HOME"] = str(WORK / "home")
os.environ["PREFECT_HOME"] = str(WORK / "prefect-client")  # nothing of the user's Prefect is touched
os.environ.pop("PREFECT_API_URL", None)

import sqlalchemy as sa  # noqa: E402
from certpilot import database, keystore  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from connectors.acme_issuer import AcmeIssuer  # noqa: E402
from connectors.challenges import Http01Responder  # noqa: E402
from lab.fault_proxy import FaultProxy, Faults  # noqa: E402
from lab.ports import free_port  # noqa: E402
from tests.integration.acme_faults import (  # noqa: E402
    BLOCK,
    Issuances,
    expiring_estate,
    issuance_counts,
    renew_due_directly,
)
from tests.integration.acme_servers import ChallTestSrv, Pebble, make_tls_identity  # noqa: E402

FAULTS = Faults(reset=0.08, truncate=0.08, status_5xx=0.10, status_429=0.04, retry_after=1)  # 30% in all
RENEW_TASK_DELAYS = (1.0, 2.0, 4.0)  # renew-due's retries of a renewal that failed transiently (seconds)


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 renewals instead of 1,000")
    parser.add_argument("--renewals", type=int, default=None, help="how many (default 1,000; 50 with --quick)")
    parser.add_argument("--shards", type=int, default=4, help="inventories renewed at once (renew-due's batches)")
    parser.add_argument("--runs", type=int, default=5, help="renew-due runs at most (the next runs retry)")
    parser.add_argument("--seed", type=int, default=12, help="the fault proxy's seed")
    args = parser.parse_args()
    count = args.renewals or (50 if args.quick else 1000)
    try:
        return run(count, max(1, args.shards), args.runs, args.seed)
    finally:
        database.dispose_engines()
        shutil.rmtree(WORK, ignore_errors=True)


@dataclass
class Shard:
    number: int
    engine: sa.Engine
    names: list[str]
    issuer: AcmeIssuer | None = None
    renewed: int = 0
    log: list[str] = field(default_factory=list)


def renew_shard(shard: Shard, ring: keystore.KeyRing, max_runs: int) -> None:
    """renew-due on one shard, again while some renewals failed, at most ``max_runs`` runs."""
    assert shard.issuer is not None
    for number in range(1, max_runs + 1):
        started = time.perf_counter()
        summary = renew_due_directly(shard.engine, shard.issuer, lambda: ring, RENEW_TASK_DELAYS)
        shard.renewed += summary.renewed
        shard.log.append(f"shard {shard.number} run {number}: {summary.due} due, {summary.renewed} renewed, "
                         f"{summary.failed} failed ({time.perf_counter() - started:.1f} s)")
        shard.log += [f"  {f.name} at {f.step}: {f.reason}" for f in summary.failures[:5]]
        if summary.failed == 0:
            return


def run(count: int, shards: int, max_runs: int, seed: int) -> int:
    (WORK / "home").mkdir(parents=True)
    ring = keystore.load_key_ring(load_settings())  # once: the key file is not read again per renewal
    tls = make_tls_identity(WORK / "tls")
    names = [f"bench-{i:04d}" for i in range(count)]
    parts = []
    for n in range(shards):
        engine = database.create_engine(f"sqlite:///{WORK / 'home' / f'inventory-{n}.db'}")
        database.upgrade(engine)
        parts.append(Shard(n, engine, names[n::shards]))
    with ChallTestSrv.start(WORK / "challtestsrv") as dns, Http01Responder("127.0.0.1", free_port()) as responder, \
            Pebble.start(WORK / "pebble", dns=dns, http_port=responder.port, tls=tls) as pebble, \
            FaultProxy(upstream=("127.0.0.1", pebble.port), seed=seed, mode="http", tls=(tls[1], tls[2]),
                       upstream_ca=pebble.ca_bundle) as proxy:
        for shard in parts:
            expiring_estate(shard.engine, lambda: ring, shard.names, "faults.bench.certpilot.test")
            shard.issuer = AcmeIssuer(shard.engine, BLOCK, f"{proxy.url}/dir", key_ring=lambda: ring,
                                      solver=responder, ca_bundle=tls[0], timeout=10.0)
            shard.issuer.account()  # registered on a sound link, as an account is long before a bad day
        before = set(pebble.issued())
        proxy.set_faults(FAULTS)
        say(f"{count} managed certificates due in {shards} inventories; renew-due on each at once through the "
            f"fault proxy (30% of requests failing), at most {max_runs} runs each")
        started = time.perf_counter()
        with ThreadPoolExecutor(shards) as pool:
            for done in [pool.submit(renew_shard, shard, ring, max_runs) for shard in parts]:
                done.result()
        elapsed = time.perf_counter() - started
        stats = proxy.stats
        counts = [issuance_counts(shard.engine, pebble, before) for shard in parts]
        ca_serials = counts[0].ca_serials
    for shard in parts:
        for line in shard.log:
            say(line)
    every = Issuances(ca_serials, frozenset().union(*(c.recorded_serials for c in counts)),
                      {name: n for c in counts for name, n in c.per_managed.items()})  # the shards together
    renewed = sum(1 for n in every.per_managed.values() if n >= 1)
    say(f"proxy: {stats.connections} connections, {stats.requests} requests, "
        f"{stats.total_injected} faults injected {stats.injected}")
    say(f"pebble issued {len(ca_serials)} certificates; {len(every.not_recorded)} not in the inventories; "
        f"{renewed} of {count} managed certificates renewed")
    say(f"figure renewal_success_percent: {100.0 * renewed / count:.2f} %")
    say(f"figure duplicate_issuances: {every.duplicates}")
    say(f"figure renew_under_faults_seconds: {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
