"""Benchmark: the whole inventory evaluated against the policy and stored (certpilot.violations), on SQLite.

    python bench/policy_check.py            # 10,000 certificates
    python bench/policy_check.py --quick    # 1,000

An inventory in a fresh SQLite file under a temporary CERTPILOT_HOME: N real leaf certificates
(certpilot.sample_estate.mint_leaves: each its own P-256 key, expiries spread from 30 days ago to 400 days
ahead), each seen at a TLS place, nine in ten with an owner, upserted in batches of 1,000. The policy is
the built-in one plus three ownership rules. Timed, each in its own write transaction, as
`certpilot policy check` and discovery run them:

1. facts_for: what the rules look at, for every active certificate (read only);
2. evaluate_certificates over the whole inventory, the first time (every violation new) and again (every
   row replaced, first_seen kept): the figure is the second, what a scheduled check costs;
3. apply_ownership over the whole inventory (the unowned tenth assigned).

Prints ``figure policy_check_seconds_10k: S s`` (``_1k`` with --quick) and the other timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 certificates instead of 10,000")
    args = parser.parse_args()
    count = 1_000 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="certpilot-bench-policy-") as home:
        os.environ["CERTPILOT_HOME"] = home
        os.environ.pop("CERTPILOT_DATABASE_URL", None)
        run(count)


def run(count: int) -> None:
    from certpilot import audit, inventory, violations
    from certpilot.database import get_engine, read_session, write_session
    from certpilot.policy import parse_policy
    from certpilot.sample_estate import mint_leaves
    from certpilot.x509info import describe_certificate

    now = dt.datetime.now(dt.timezone.utc)
    actor = audit.Actor("bench")
    engine = get_engine()
    started = time.perf_counter()
    records = [describe_certificate(cert) for cert in mint_leaves(count, now=now)]
    print(f"{count} certificates made in {time.perf_counter() - started:.1f} s")
    for start in range(0, count, 1000):
        batch = records[start:start + 1000]
        with write_session(engine) as session:
            for owner in (None, "web"):
                chosen = [(i, r) for i, r in enumerate(batch, start) if (i % 10 == 0) == (owner is None)]
                observations = [inventory.Observation(r, f"tls://host{i}.bench.test:443", "tls-scan:bench")
                                for i, r in chosen]
                inventory.upsert(session, observations, actor, owner=owner, now=now)
    policy = parse_policy("ownership:\n  - match: {domain: nowhere.test}\n    owner: nobody\n"
                          "  - match: {locator: 'ssh://*'}\n    owner: ssh\n"
                          "  - match: {source: 'tls-scan:*'}\n    owner: edge\n", "bench.yaml")
    timings: dict[str, float] = {}

    def timed(name: str, write: bool, call):  # noqa: ANN001, ANN202
        begun = time.perf_counter()
        with (write_session(engine) if write else read_session(engine)) as session:
            result = call(session)
        timings[name] = time.perf_counter() - begun
        return result

    facts = timed("facts_for", False, lambda s: violations.facts_for(s, policy, now=now))
    first = timed("evaluate_first", True, lambda s: violations.evaluate_certificates(s, policy, actor, now=now))
    again = timed("evaluate_again", True, lambda s: violations.evaluate_certificates(
        s, policy, actor, now=now + dt.timedelta(hours=1)))
    owners = timed("apply_ownership", True, lambda s: violations.apply_ownership(s, policy, actor, now=now))
    print(f"{len(facts)} facts; {first.evaluated} evaluated, {first.violations} violations "
          f"({', '.join(f'{r} {n}' for r, n in first.by_rule.items())}); again {again.violations}; "
          f"{owners} owners assigned")
    for name, seconds in timings.items():
        print(f"  {name}: {seconds:.2f} s")
    suffix = f"{count // 1000}k"
    print(f"figure policy_check_seconds_{suffix}: {timings['evaluate_again']:.2f} s")
    print(f"figure policy_facts_seconds_{suffix}: {timings['facts_for']:.2f} s")
    print(f"figure policy_ownership_seconds_{suffix}: {timings['apply_ownership']:.2f} s")


if __name__ == "__main__":
    main()
