"""Benchmark: resolving a revocation scope (certpilot.scope.resolve) on an inventory of 100,000 certificates.

    python bench/scope_resolve.py                  # 100,000 certificates, embedded SQLite
    python bench/scope_resolve.py --quick          # 10,000
    python bench/scope_resolve.py --database-url postgresql://postgres@127.0.0.1:5432/DB   # an empty database

The inventory is built by bulk inserts of rows (as bench/metrics.py does), not by importing certificates:
N leaves with two DNS SANs each (``svc<i>.<team>.example<j>.com``), one of 20 issuing CAs (linked by
issuer_fingerprint), 200 owners, a public key shared by every 1,000th pair, one TLS location each; one in
ten managed (its own ManagedCertificate with an issuer block of 5, a target, and a superseded predecessor).
Then each scope is resolved five times and the median reported, with the number of certificates it matched:
a name, a serial, a public key, a DNS name, a domain suffix (1 in 10 certificates), an owner, a tag, an
issuer (a CA compromise: 1 in 20), and the largest: an issuer block (every managed certificate of it).

Prints ``figure scope_resolve_seconds_<scope>: S s (N certificates)`` per scope.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import sqlalchemy as sa  # noqa: E402
from sqlmodel import SQLModel  # noqa: E402

from certpilot import database  # noqa: E402
from certpilot.models import Certificate, Location, ManagedCertificate, SubjectAltName, Target  # noqa: E402
from certpilot.scope import Scope, resolve  # noqa: E402

CAS = 20
TEAMS = 200
BLOCKS = 5


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def build(engine: sa.Engine, count: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    rng = random.Random(7)
    tables = SQLModel.metadata.tables
    common = {"key_type": "EC", "key_size": 256, "key_curve": "secp256r1", "signature_algorithm": "ecdsa-with-SHA256",
              "key_usage": [], "extended_key_usage": [], "crl_urls": [], "ocsp_urls": [], "ca_issuer_urls": [],
              "notes": [], "self_signed": False, "der": b"", "created_at": now, "revocation_reason": None,
              "revoked_at": None, "subject_key_id": None, "authority_key_id": None, "path_length": None,
              "replaces_fingerprint": None}
    cas = [{**common, "fingerprint_sha256": _hex("ca", i), "subject": f"CN=Issuing CA {i},O=Bench",
            "issuer": "CN=Root,O=Bench", "serial_hex": f"{i + 1:04x}", "not_before": now - dt.timedelta(days=100),
            "not_after": now + dt.timedelta(days=3000), "spki_sha256": _hex("ca-key", i), "is_ca": True,
            "issuer_fingerprint": None, "status": "active", "owner": None, "tags": {},
            "managed_certificate_id": None} for i in range(CAS)]
    managed, certs, sans, locations, targets = [], [], [], [], []
    for i in range(count):
        team = f"team{i % TEAMS}"
        names = [f"svc{i}.{team}.example{i % 10}.com", f"www.svc{i}.{team}.example{i % 10}.com"]
        managed_id = i // 10 + 1 if i % 10 == 0 else None
        if managed_id is not None:
            managed.append({"id": managed_id, "name": f"svc{i}", "dns_names": names, "ip_addresses": [],
                            "profile": "tls-server", "key_algorithm": "ec-p256", "issuer": f"acme-issuer/b{i // 10 % BLOCKS}",
                            "owner": team, "tags": {"env": "prod"}, "use_ari": True, "status": "active",
                            "created_at": now})
            targets.append({"managed_certificate_id": managed_id, "name": "nginx-1", "kind": "ssh-nginx",
                            "block": "ssh-host/web", "settings": {}, "updated_at": now})
        ca = i % CAS
        for generation in ((0, 1) if managed_id is not None else (1,)):
            fp = _hex("leaf", i, generation)
            certs.append({**common, "fingerprint_sha256": fp, "subject": f"CN={names[0]}",
                          "issuer": cas[ca]["subject"], "serial_hex": f"{rng.getrandbits(128):032x}",
                          "not_before": now - dt.timedelta(days=30 - generation),
                          "not_after": now + dt.timedelta(days=60 + generation),
                          "spki_sha256": _hex("key", i // 2 if i % 1000 < 2 else i, generation), "is_ca": False,
                          "issuer_fingerprint": cas[ca]["fingerprint_sha256"],
                          "status": "active" if generation else "superseded",
                          "owner": None if managed_id else team, "tags": {} if managed_id else {"env": "staging"},
                          "managed_certificate_id": managed_id})
            sans += [{"certificate_fingerprint": fp, "kind": "DNS", "value": n} for n in names]
            locations.append({"certificate_fingerprint": fp, "locator": f"tls://10.{i >> 16 & 255}.{i >> 8 & 255}."
                              f"{i & 255}:443?sni={names[0]}", "source": "tls-scan:bench", "first_seen": now,
                              "last_seen": now, "ghost": False, "details": None})
    with engine.begin() as conn:
        for name, rows in (("managed_certificate", managed), ("certificate", cas + certs), ("subject_alt_name", sans),
                           ("location", locations), ("target", targets)):
            for start in range(0, len(rows), 5000):
                conn.execute(tables[name].insert(), rows[start:start + 5000])
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
        else:
            conn.exec_driver_sql("ANALYZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    count = 10_000 if args.quick else 100_000
    with tempfile.TemporaryDirectory() as home:
        url = args.database_url or f"sqlite:///{home}/inventory.db"
        import os
        os.environ["CERTPILOT_HOME"] = home
        os.environ["CERTPILOT_DATABASE_URL"] = url
        engine = database.get_engine()
        started = time.perf_counter()
        build(engine, count)
        print(f"inventory: {count} leaves built in {time.perf_counter() - started:.1f} s ({engine.dialect.name})")
        with engine.connect() as conn:
            serial = conn.execute(sa.select(Certificate.serial_hex).where(  # type: ignore[call-overload]
                Certificate.fingerprint_sha256 == _hex("leaf", 4321, 1))).scalar_one()
        scopes = {
            "name": Scope(names=("svc4320",)),
            "serial": Scope(serials=(serial,)),
            "public_key": Scope(public_key=_hex("key", 0, 1)),
            "dns_name": Scope(dns_name="svc4321.team121.example1.com"),
            "owner": Scope(owner="team7"),
            "tag": Scope(tag="env=prod", owner="team10"),
            "domain_suffix": Scope(domain_suffix="example3.com"),
            "issuer_ca": Scope(issuer=_hex("ca", 3)),
            "issuer_block": Scope(issuer="acme-issuer/b1"),
        }
        for label, scope in scopes.items():
            times, matched = [], 0
            for _ in range(5):
                with database.read_session(engine) as session:
                    t0 = time.perf_counter()
                    matched = len(resolve(session, scope))
                    times.append(time.perf_counter() - t0)
            print(f"figure scope_resolve_seconds_{label}: {statistics.median(times):.3f} s ({matched} certificates)")
        database.dispose_engines()


if __name__ == "__main__":
    main()
