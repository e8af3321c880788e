"""Benchmark: folding a monitor run's findings into the alerts (certpilot.alerts.observe).

    python bench/alerts.py            # 2,000 findings, 10 runs
    python bench/alerts.py --quick    # 200 findings, 3 runs
    python bench/alerts.py --database-url postgresql://postgres@127.0.0.1:5432/DB   # an empty database

Each run observes the same findings (certificates expiring in 3 days, CRITICAL, each seen by three
sources, so three findings per certificate) in one write transaction, as raise_alerts does: the first
run opens every alert, the next ones only move last_seen. Counted: the transitions (what would be
told) per certificate over all runs, and the SQL statements per run.

The output ends with:
    figure alerts_open_seconds_2000: S s        (the first run: every alert opened)
    figure alerts_observe_seconds_2000: S s     (a later run: nothing new, the median)
    figure alerts_statements_per_run: N
    figure alerts_transitions_per_certificate: N   (goal: exactly 1)
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import sqlalchemy as sa  # noqa: E402

from certpilot import alerts, database  # noqa: E402
from certpilot.alerts import Condition, Finding, Scope, Severity  # noqa: E402


def findings(count: int, now: dt.datetime) -> list[Finding]:
    not_after = (now + dt.timedelta(days=3)).isoformat()
    return [Finding(f"certificate:{n:064x}", Condition.EXPIRING, Severity.CRITICAL,
                    f"www{n}.example.test expires in 3 days",
                    owner=f"team-{n % 20}", tags={"env": "prod", "source": source},
                    details={"certificate": f"www{n}.example.test", "not_after": not_after,
                             "served_at": [f"tls://10.{n // 250 % 250}.{n % 250}.1:443"]})
            for n in range(count) for source in ("tls-scan", "ssh", "aws-acm")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 certificates, 3 runs")
    parser.add_argument("--certificates", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--database-url", help="an empty inventory database (default: a new SQLite file)")
    args = parser.parse_args()
    count, runs = (200, 3) if args.quick else (args.certificates, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'inventory.db'}"
        engine = database.create_engine(url)
        database.upgrade(engine)
        statements: list[int] = []
        sa.event.listen(engine, "before_cursor_execute", lambda *_: statements.append(1))
        start = dt.datetime.now(dt.timezone.utc)
        scope = Scope(frozenset({Condition.EXPIRING, Condition.EXPIRED}))
        seconds, told, per_run = [], 0, []
        for run in range(runs):
            batch = findings(count, start + dt.timedelta(minutes=15 * run))
            statements.clear()
            began = time.perf_counter()
            with database.write_session(engine) as session:
                told += len(alerts.observe(session, batch, scope, start + dt.timedelta(minutes=15 * run)))
            seconds.append(time.perf_counter() - began)
            per_run.append(len(statements))
            print(f"run {run + 1}: {len(batch)} findings in {seconds[-1]:.3f} s, {per_run[-1]} statements")
        engine.dispose()
    print(f"figure alerts_open_seconds_{count}: {seconds[0]:.3f} s")
    if runs > 1:
        print(f"figure alerts_observe_seconds_{count}: {statistics.median(seconds[1:]):.3f} s")
    print(f"figure alerts_statements_per_run: {max(per_run)}")
    print(f"figure alerts_transitions_per_certificate: {told / count:g}")


if __name__ == "__main__":
    main()
