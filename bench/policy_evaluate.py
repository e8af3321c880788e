"""Benchmark: evaluating the certificate policy (certpilot.policy) over 10,000 certificates.

    python bench/policy_evaluate.py            # 10,000 certificates
    python bench/policy_evaluate.py --quick    # 1,000

The facts of 200 real leaf certificates (certpilot.sample_estate.mint_leaves: EC P-256, SHA-256, expiries
spread from 30 days ago to 400 days ahead) are varied into N certificates: 40 owners (one in ten none), two
tags, public or private (one in four private), managed or not (one in three), a wildcard one in twenty,
and two DNS names under one of 8 domains. The policy is the module docstring's full example (every rule on,
two scopes, private issuer patterns, ownership rules) with 20 waivers. Each pass evaluates every
certificate's rules and its ownership; the median of five passes is reported.

Prints ``figure policy_evaluate_seconds_10k: S s`` (``_1k`` with --quick) and the violations found.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from certpilot import policy as pol  # noqa: E402
from certpilot.sample_estate import mint_leaves  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 certificates instead of 10,000")
    args = parser.parse_args()
    count = 1_000 if args.quick else 10_000
    now = dt.datetime.now(dt.timezone.utc)
    base = [pol.facts_of_certificate(cert) for cert in mint_leaves(200, now=now)]
    domains = ["example.com", "pay.example.com", "corp.example", "example.org", "shop.example.net",
               "internal.example.com", "api.example.com", "example.io"]
    facts = []
    for index in range(count):
        domain = domains[index % len(domains)]
        first = f"{'*' if index % 20 == 0 else f'svc{index}'}.{domain}"
        facts.append(dataclasses.replace(
            base[index % len(base)], fingerprint_sha256=f"{index:064x}", dns_names=(first, f"alt{index}.{domain}"),
            owner=None if index % 10 == 0 else f"team{index % 40}", tags={"env": "prod" if index % 2 else "dev",
                                                                           "cost-centre": str(index % 7)},
            public=index % 4 != 0, managed=index % 3 == 0, issuer_names=(base[0].issuer, "acme-issuer/letsencrypt"),
            locators=(f"tls://svc{index}.{domain}:443",), sources=("tls-scan:lab",)))
    text = (pol.__doc__ or "").split("```yaml\n")[1].split("```")[0]
    policy = pol.parse_policy(text, "example.yaml")
    waivers = [pol.Waiver(i + 1, pol.RULES[i % 12], f"owner=team{i}", "bench", "bench", now + dt.timedelta(days=i - 5))
               for i in range(20)]
    timings = []
    found: Counter[str] = Counter()
    for _ in range(5):
        found.clear()
        started = time.perf_counter()
        for item in facts:
            for violation in policy.evaluate(item, now, waivers):
                found[violation.rule] += 1
            policy.owner_for(item)
        timings.append(time.perf_counter() - started)
    print(f"{count} certificates, {sum(found.values())} violations: "
          + ", ".join(f"{rule} {n}" for rule, n in sorted(found.items())))
    print(f"figure policy_evaluate_seconds_{count // 1000}k: {statistics.median(timings):.3f} s")


if __name__ == "__main__":
    main()
