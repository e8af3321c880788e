"""Certificate chains built from whatever certificates are given, in any order."""

from __future__ import annotations

from cryptography import x509

from certpilot.x509info import fingerprint_sha256, is_issued_by


def build_chain(leaf: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate]:
    """``leaf`` followed by its issuers found in ``pool``, up to a self-signed root or the last one found.

    An issuer is accepted only if its key verifies the signature, so a look-alike name is not enough.
    Loops (cross-signed pairs) end the chain instead of spinning.
    """
    chain = [leaf]
    seen = {fingerprint_sha256(leaf)}
    current = leaf
    while not is_issued_by(current, current):
        parent = next((c for c in pool if fingerprint_sha256(c) not in seen and is_issued_by(current, c)), None)
        if parent is None:
            break
        chain.append(parent)
        seen.add(fingerprint_sha256(parent))
        current = parent
    return chain


def find_leaves(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Certificates that issued none of the others: the ends of the chains in a bundle."""
    unique = {fingerprint_sha256(c): c for c in certs}
    return [c for fp, c in unique.items()
            if not any(other_fp != fp and is_issued_by(other, c) for other_fp, other in unique.items())]


def order_chains(certs: list[x509.Certificate]) -> list[list[x509.Certificate]]:
    """Every chain in a bundle, each leaf first."""
    pool = list({fingerprint_sha256(c): c for c in certs}.values())
    return [build_chain(leaf, pool) for leaf in find_leaves(pool)]
