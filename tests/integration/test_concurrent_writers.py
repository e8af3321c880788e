"""Concurrent importers, as real OS processes, on SQLite and PostgreSQL.

Four importers start together on the same inventory and import overlapping sets of certificates: the
same certificates at different paths, the same files at the same paths, bundles that share their
issuer, some with --owner/--tag, some with --import-keys. First as spawned processes importing in
small batches (many interleaved transactions), then as four concurrent ``certpilot inventory import``
command lines. On SQLite the inventory and the master key do not exist until the importers start.

Afterwards: one Certificate row per distinct fingerprint, one Location per (certificate, locator),
SubjectAltName rows exactly those of each certificate, one PrivateKey per key, and an audit chain that
verifies with seq 1..N contiguous and exactly one ``certificate.added`` per certificate, whose
labelling events replay to the owners and tags stored.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certpilot import audit, database, keystore
from certpilot.keys import public_key_sha256
from certpilot.models import AuditEvent, Certificate, Location, PrivateKey, SubjectAltName
from certpilot.sample_estate import Authority, issue_leaf, key_pem, make_ca, pem
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate

LEAVES = 36
WORKERS = 4


# ------------------------------------------------------------------------------------------ the estate

class Plan:
    """The files on disk, who imports what, and what the inventory must hold afterwards."""

    def __init__(self, root: Path, issuing: Authority) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        self.root = root
        self.leaves: list[tuple[x509.Certificate, Any]] = []
        for i in range(LEAVES):
            names = [f"h{i}.conc.test", f"alt{i}.conc.test"] + ([f"shared{i % 3}.conc.test"] if i % 4 == 0 else [])
            self.leaves.append(issue_leaf(issuing, names, now + dt.timedelta(days=i - 5)))
        # Renewals: new certificates for the same names as earlier ones (the same SAN on several certificates).
        renewals = [issue_leaf(issuing, [f"h{i}.conc.test", f"alt{i}.conc.test"], now + dt.timedelta(days=200 + i))
                    for i in range(4)]
        self.file_certs: dict[Path, list[x509.Certificate]] = {}

        shared = root / "shared"
        for j in range(6):  # bundles that overlap one another, each with the issuer
            certs = [self.leaves[(j * 6 + k) % LEAVES][0] for k in range(8)] + [issuing.certificate]
            self._write(shared / f"bundle{j}.pem", pem(*certs), certs)
        for i in range(0, LEAVES, 3):
            self._write(shared / f"single{i}.pem", pem(self.leaves[i][0]), [self.leaves[i][0]])
        self.own: list[Path] = []
        for w in range(WORKERS):
            own = root / f"own{w}"
            for i in range(w * 9, w * 9 + 18):
                cert = self.leaves[i % LEAVES][0]
                if i % 2:
                    self._write(own / f"c{i % LEAVES}.der", cert.public_bytes(serialization.Encoding.DER), [cert])
                else:
                    self._write(own / f"c{i % LEAVES}.crt", pem(cert), [cert])
            if w % 2 == 0:
                certs = [c for c, _ in renewals]
                self._write(own / "renewals.pem", pem(*certs), certs)
            else:  # key-only files for the same six certificates in two importers' directories
                for i in range(6):
                    (own / f"k{i}.key").write_bytes(key_pem(self.leaves[i][1]))
                # and one combined certificate-and-key file each
                cert, key = self.leaves[20 + w]
                self._write(own / "combined.pem", pem(cert, issuing.certificate) + key_pem(key), [cert, issuing.certificate])
            self.own.append(own)
        self.keys = {public_key_sha256(self.leaves[i][1]) for i in list(range(6)) + [21, 23]}
        self.all_certs = {c.fingerprint(hashes.SHA256()).hex(): c for certs in self.file_certs.values() for c in certs}
        assert len(self.all_certs) == LEAVES + 4 + 1  # leaves, renewals, the issuer

    def _write(self, path: Path, data: bytes, certs: list[x509.Certificate]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.file_certs[path] = certs

    def importer(self, w: int) -> tuple[list[str], dict[str, Any]]:
        """(paths, import options) of importer ``w``: half label, half store keys, orders differ."""
        shared = str(self.root / "shared")
        own = str(self.own[w])
        return [
            ([shared, own], {"owner": "team-a", "tags": {"env": "prod"}}),
            ([shared, own], {"import_keys": True}),
            ([own, shared], {"owner": "team-b", "tags": {"env": "stage", "tier": "1"}}),
            ([own, shared], {"import_keys": True, "tags": {"tier": "2"}}),
        ][w]

    def expected_locations(self) -> set[tuple[str, str]]:
        return {(c.fingerprint(hashes.SHA256()).hex(), path.resolve().as_uri())
                for path, certs in self.file_certs.items() for c in certs}

    def labelled_by(self, w: int) -> set[str]:
        paths, _ = self.importer(w)
        return {c.fingerprint(hashes.SHA256()).hex() for path, certs in self.file_certs.items()
                if any(str(path).startswith(p + os.sep) for p in paths) for c in certs}


def worker(env: dict[str, str], name: str, paths: list[str], options: dict[str, Any], rounds: int,
           barrier: Any, results: Any) -> None:
    """One importer process: wait for the others, then import ``paths`` ``rounds`` times in small batches."""
    os.environ.update(env)
    try:
        from certpilot.importer import ImportOptions, import_paths

        barrier.wait(timeout=120)
        engine = database.get_engine()  # on SQLite, the first use of a new file, by four processes at once
        out = []
        for _ in range(rounds):
            report = import_paths(engine, paths, ImportOptions(batch_size=5, **options), audit.Actor(f"worker:{name}"),
                                  key_ring=lambda: keystore.load_key_ring(load_settings()))
            out.append({"summary": report.summary().as_dict(), "errors": [f"{f.source}: {f.error}" for f in report.files if f.error]})
        results.put((name, out))
    except BaseException as exc:  # reported to the test, not lost in the child
        results.put((name, f"{type(exc).__name__}: {exc}"))
        raise


# ------------------------------------------------------------------------------------------ checks

def check_inventory(engine: sa.Engine, plan: Plan) -> dict[str, int]:
    with engine.connect() as conn:
        fps = [r[0] for r in conn.execute(sa.select(Certificate.fingerprint_sha256))]
        assert len(fps) == len(set(fps)) and set(fps) == set(plan.all_certs)

        locations = conn.execute(sa.select(Location.certificate_fingerprint, Location.locator)).all()
        duplicates = [k for k, n in Counter(map(tuple, locations)).items() if n > 1]
        assert duplicates == []
        assert set(map(tuple, locations)) == plan.expected_locations()

        sans = conn.execute(sa.select(SubjectAltName.certificate_fingerprint, SubjectAltName.kind,
                                      SubjectAltName.value)).all()
        assert len(sans) == len(set(map(tuple, sans)))
        by_cert: dict[str, set[tuple[str, str]]] = {}
        for fp, kind, value in sans:
            by_cert.setdefault(fp, set()).add((kind, value))
        for fp, der in conn.execute(sa.select(Certificate.fingerprint_sha256, Certificate.der)):
            record = describe_certificate(x509.load_der_x509_certificate(der))
            assert record.fingerprint_sha256 == fp
            assert by_cert.pop(fp, set()) == set(record.sans), fp
        assert by_cert == {}  # no SAN rows for a certificate that is not there

        keys = conn.execute(sa.select(PrivateKey.spki_sha256, PrivateKey.id)).all()
        assert sorted(k for k, _ in keys) == sorted(plan.keys)  # one row per key, though two importers stored each

        events = conn.execute(sa.select(AuditEvent).order_by(AuditEvent.seq)).all()
        owners = {fp: (owner, tags) for fp, owner, tags in
                  conn.execute(sa.select(Certificate.fingerprint_sha256, Certificate.owner, Certificate.tags))}

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    with database.read_session(engine) as session:
        assert audit.verify(session).events == len(events)
    added = Counter(e.object for e in events if e.action == "certificate.added")
    assert set(added) == {f"certificate:{fp}" for fp in plan.all_certs}
    assert set(added.values()) == {1}
    stored = Counter(json.loads(e.details)["spki_sha256"] for e in events if e.action == "key.stored")
    assert stored == Counter(plan.keys)
    location_events = Counter((e.object, json.loads(e.details)["locator"]) for e in events if e.action == "location.added")
    assert set(location_events.values()) <= {1}  # no location announced twice
    assert {(f"certificate:{fp}", loc) for fp, loc in locations} >= set(location_events)

    # The audit trail replays to the labels stored: certificate.added, then each certificate.labelled.
    replayed: dict[str, tuple[Any, Any]] = {}
    for e in events:
        details = json.loads(e.details)
        fp = e.object.removeprefix("certificate:")
        if e.action == "certificate.added":
            replayed[fp] = (details["owner"], details["tags"])
        elif e.action == "certificate.labelled":
            assert replayed[fp] == (details["owner"][0], details["tags"][0]), "labelled from a state it was not in"
            replayed[fp] = (details["owner"][1], details["tags"][1])
    assert replayed == owners
    for fp in plan.labelled_by(0) | plan.labelled_by(2):
        assert owners[fp][0] in {"team-a", "team-b"}
        assert owners[fp][1]["env"] in {"prod", "stage"}
    for fp in plan.labelled_by(3):
        assert owners[fp][1]["tier"] in {"1", "2"}
    return {"events": len(events), "locations": len(locations), "sans": len(sans)}


def check_master_key(engine: sa.Engine, home: Path) -> None:
    """Two importers stored keys at once: one master key file, 0600, opens every key."""
    masters = sorted(p.name for p in home.iterdir() if "master" in p.name)
    assert masters == ["master.key"]
    assert stat.S_IMODE((home / "master.key").stat().st_mode) == 0o600
    ring = keystore.load_key_ring(load_settings())
    with database.read_session(engine) as session:
        for (key_id,) in session.execute(sa.select(PrivateKey.id)):
            keystore.load_private_key(session, keystore.KeyRef(key_id), ring)


# ------------------------------------------------------------------------------------------ the test

@pytest.fixture(scope="module")
def issuing() -> Authority:
    return make_ca("Concurrency Issuing CA")


def test_concurrent_importers(database_url: str, certpilot_home: Path, tmp_path: Path, issuing: Authority,
                              request: pytest.FixtureRequest) -> None:
    if database_url.startswith("postgresql"):
        request.getfixturevalue("engine")  # the session's PostgreSQL database, migrated and emptied
    else:
        assert not (certpilot_home / "inventory.db").exists()  # the importers create it, all at once
    assert not (certpilot_home / "master.key").exists()
    plan = Plan(tmp_path / "estate", issuing)
    env = {"CERTPILOT_HOME": str(certpilot_home), "CERTPILOT_DATABASE_URL": database_url}

    # Phase 1: spawned processes, small batches, two rounds each.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    processes = []
    for w in range(WORKERS):
        paths, options = plan.importer(w)
        processes.append(ctx.Process(target=worker, args=(env, f"w{w}", paths, options, 2, barrier, results)))
    for p in processes:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0, outcomes
    for name, runs in outcomes.items():
        assert isinstance(runs, list), f"{name} failed: {runs}"
        for run in runs:
            assert run["errors"] == [] and run["summary"]["failed"] == 0, (name, run)
    # Between them, the first rounds added every certificate exactly once.
    assert sum(runs[0]["summary"]["new_certificates"] + runs[1]["summary"]["new_certificates"]
               for runs in outcomes.values()) == len(plan.all_certs)
    assert all(runs[1]["summary"]["new_certificates"] == 0 for runs in outcomes.values())

    engine = database.get_engine()
    first = check_inventory(engine, plan)
    check_master_key(engine, certpilot_home)

    # Phase 2: four `certpilot inventory import` command lines at once, over the same files.
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("CERTPILOT_")}, **env}
    commands = []
    for w in range(WORKERS):
        paths, options = plan.importer((w + 1) % WORKERS)  # each importer's set, run by another process
        args = [sys.executable, "-m", "cli", "inventory", "import", "--quiet", *paths]
        if options.get("owner"):
            args += ["--owner", options["owner"]]
        for key, value in options.get("tags", {}).items():
            args += ["--tag", f"{key}={value}"]
        if options.get("import_keys"):
            args.append("--import-keys")
        commands.append(subprocess.Popen(args, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in commands:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (stdout.decode(), stderr.decode())
        assert b"0 new" in stdout and b"0 file(s) failed" in stdout

    second = check_inventory(engine, plan)
    assert second["locations"] == first["locations"] and second["sans"] == first["sans"]
    assert second["events"] >= first["events"]  # re-imports only relabel; nothing is added twice
    check_master_key(engine, certpilot_home)
