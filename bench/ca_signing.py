"""Benchmark: how fast certpilot's private CA signs, and what recording each certificate costs.

    python bench/ca_signing.py            # 5,000 CSRs
    python bench/ca_signing.py --quick    # 500
    python bench/ca_signing.py --pkcs11   # the issuing key on a SoftHSM2 token instead (apt-get install softhsm2)

What it does, in a fresh inventory (SQLite in a temporary CERTPILOT_HOME unless --database-url):

1. Creates a CA (certpilot.ca.init_ca: root EC P-384, issuing CA EC P-256) and pre-generates N CSRs,
   each for its own P-256 key and two DNS names (not timed).
2. Signing: one CASigner (the issuing key decrypted once) signs every CSR with the tls-server
   profile: CSR signature check, SAN checks, building and signing the certificate. Only this is
   timed for the headline figure, `ca_signing_rate` (goal: >= 2,000 certificates/s).
3. Recording: the signed certificates stored in the inventory (certpilot.ca.store_issued: the
   certificate row, its SANs, the issuer link and two audit events each), (a) in batches of 500 per
   write transaction and (b) one write transaction per certificate, as an Issuer call makes them;
   each figure is sign + store per certificate.
4. End to end: PrivateCAIssuer.issue for a few hundred CSRs: decrypt the key, sign, store, commit.

With --pkcs11 the CA's issuing key is made on a SoftHSM2 token in a temporary directory (its own
SOFTHSM2_CONF) and only step 2 runs: one CASigner signs every CSR on the token (hash in Python, raw
CKM_ECDSA on the token): `ca_signing_pkcs11_per_second`.

The output ends with one line per figure, `figure NAME: VALUE UNIT`, the signing rate last.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from certpilot import audit, ca, keystore  # noqa: E402
from certpilot.database import get_engine, read_session, write_session  # noqa: E402
from certpilot.issuance import build_csr  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from connectors.private_ca import PrivateCAIssuer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: 500 CSRs")
    parser.add_argument("--csrs", type=int, help="CSRs to sign (default 5,000; 500 with --quick)")
    parser.add_argument("--database-url", help="inventory URL (default: SQLite in a temporary directory)")
    parser.add_argument("--pkcs11", action="store_true", help="the issuing key on a SoftHSM2 token: signing only")
    args = parser.parse_args()
    count = args.csrs or (500 if args.quick else 5000)
    if args.pkcs11:
        return pkcs11_signing(count, args.database_url)
    per_transaction = min(count, 200 if args.quick else 1000)
    end_to_end = min(count, 100 if args.quick else 300)

    with tempfile.TemporaryDirectory(prefix="certpilot-bench-ca-") as home:
        os.environ["CERTPILOT_HOME"] = home
        os.environ.pop("CERTPILOT_MASTER_KEY", None)
        os.environ.pop("CERTPILOT_MASTER_KEY_FILE", None)
        if args.database_url:
            os.environ["CERTPILOT_DATABASE_URL"] = args.database_url
        else:
            os.environ.pop("CERTPILOT_DATABASE_URL", None)
        engine = get_engine()
        ring = keystore.load_key_ring(load_settings())
        actor = audit.Actor("bench")
        name = f"bench{os.getpid()}"
        with write_session(engine) as session:
            ca.init_ca(session, ring, actor, name, "http://pki.example.com")

        started = time.perf_counter()
        csrs = [build_csr(ec.generate_private_key(ec.SECP256R1()), [f"host{i}.example.com", f"alt{i}.example.com"])
                for i in range(count)]
        print(f"generated {count} P-256 CSRs in {time.perf_counter() - started:.1f} s (not timed)")

        with read_session(engine) as session:
            signer = ca.open_signer(session, ring, name)
        for csr in csrs[:50]:  # warm up
            signer.sign(csr, "tls-server")
        started = time.perf_counter()
        certs = [signer.sign(csr, "tls-server") for csr in csrs]
        sign_seconds = time.perf_counter() - started
        sign_rate = count / sign_seconds
        print(f"signed {count} certificates in {sign_seconds:.2f} s with one signer: {sign_rate:,.0f}/s "
              f"({sign_seconds / count * 1e6:.0f} us each)")

        started = time.perf_counter()
        for start in range(0, count, 500):
            with write_session(engine) as session:
                ca.store_issued(session, actor, signer, certs[start:start + 500], "tls-server")
        batched_seconds = time.perf_counter() - started
        batched_rate = count / (sign_seconds + batched_seconds)
        print(f"stored them in batches of 500 in {batched_seconds:.2f} s: sign + store {batched_rate:,.0f}/s")

        more = [signer.sign(csr, "tls-server") for csr in csrs[:per_transaction]]
        started = time.perf_counter()
        for cert in more:
            with write_session(engine) as session:
                ca.store_issued(session, actor, signer, [cert], "tls-server")
        single_seconds = time.perf_counter() - started
        single_rate = per_transaction / (per_transaction / sign_rate + single_seconds)
        print(f"stored {per_transaction} more one transaction each in {single_seconds:.2f} s: "
              f"sign + store {single_rate:,.0f}/s")

        issuer = PrivateCAIssuer(engine, name, lambda: ring, actor=actor)
        started = time.perf_counter()
        for csr in csrs[:end_to_end]:
            issuer.issue(csr, "tls-server")
        issuer_seconds = time.perf_counter() - started
        issuer_rate = end_to_end / issuer_seconds
        print(f"PrivateCAIssuer.issue x {end_to_end} (decrypt, sign, store, commit each): {issuer_rate:,.0f}/s")
        del signer
        print(f"backend: {engine.dialect.name}")
        engine.dispose()

    print(f"figure ca_issuer_issue_rate: {issuer_rate:.0f} certificates/s")
    print(f"figure ca_sign_and_store_rate_per_transaction: {single_rate:.0f} certificates/s")
    print(f"figure ca_sign_and_store_rate_batched: {batched_rate:.0f} certificates/s")
    print(f"figure ca_signing_rate: {sign_rate:.0f} certificates/s")
    return 0


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def pkcs11_signing(count: int, database_url: str | None) -> int:
    """Sign ``count`` CSRs with a CA whose issuing key is on a fresh SoftHSM2 token."""
    from certpilot import token_keys
    from connectors.pkcs11_token import open_token

    with tempfile.TemporaryDirectory(prefix="certpilot-bench-hsm-") as home:
        os.environ["CERTPILOT_HOME"] = home
        os.environ.pop("CERTPILOT_MASTER_KEY", None)
        os.environ.pop("CERTPILOT_MASTER_KEY_FILE", None)
        if database_url:
            os.environ["CERTPILOT_DATABASE_URL"] = database_url
        else:
            os.environ.pop("CERTPILOT_DATABASE_URL", None)
        tokens = Path(home, "tokens")
        tokens.mkdir()
        conf = Path(home, "softhsm2.conf")
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is loaded: SoftHSM2 reads it once
        pin = secrets.token_hex(8)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", pin + "so",
                        "--pin", pin], check=True, capture_output=True, timeout=30)
        pin_file = Path(home, "pin")
        pin_file.write_text(pin)
        pin_file.chmod(0o600)
        spec = token_keys.TokenSpec(SOFTHSM_MODULE, "bench", token_keys.PinSource(file=pin_file))
        engine = get_engine()
        ring = keystore.load_key_ring(load_settings())
        actor = audit.Actor("bench")
        with write_session(engine) as session:
            ca.init_ca(session, ring, actor, "hsm", "http://pki.example.com", token=spec, tokens=open_token)
        started = time.perf_counter()
        csrs = [build_csr(ec.generate_private_key(ec.SECP256R1()), [f"host{i}.example.com", f"alt{i}.example.com"])
                for i in range(count)]
        print(f"generated {count} P-256 CSRs in {time.perf_counter() - started:.1f} s (not timed)")
        with read_session(engine) as session:
            signer = ca.open_signer(session, ring, "hsm", tokens=open_token)
        for csr in csrs[:50]:  # warm up
            signer.sign(csr, "tls-server")
        started = time.perf_counter()
        certs = [signer.sign(csr, "tls-server") for csr in csrs]
        seconds = time.perf_counter() - started
        issuing = signer.certificate
        for cert in certs[:20]:  # the token's signatures verify
            cert.verify_directly_issued_by(issuing)
        del signer
        engine.dispose()
    rate = count / seconds
    print(f"signed {count} certificates on the token in {seconds:.2f} s: {rate:,.0f}/s "
          f"({seconds / count * 1e3:.3f} ms each)")
    print(f"figure ca_signing_pkcs11_per_second: {rate:.0f} certificates/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
