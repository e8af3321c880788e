"""Test-only issuer blocks around the real private CA: one that is busy a few times before it signs
(a TransientError each time), one that refuses every request (a PermanentError), and one that holds
each order a while, to see how many orders it is given at once.

The attempts, and the most orders in progress at once, are counted per block name in this process,
which is where the flows under test run.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from prefect.blocks.core import Block
from pydantic import Field

from certpilot.errors import PermanentError, TransientError
from certpilot.issuance import IssuedCertificate, OrderJournal
from certpilot.renewal import RenewalWindow

attempts: Counter[str] = Counter()
most_at_once: Counter[str] = Counter()  # the most orders one issuer was working on at the same time
_in_progress: Counter[str] = Counter()
_lock = threading.Lock()


class _Wrapped:
    def __init__(self, inner: Any, name: str, busy_times: int, refuse: str | None, hold_seconds: float = 0.0) -> None:
        self.inner, self.name, self.busy_times, self.refuse = inner, name, busy_times, refuse
        self.hold_seconds = hold_seconds

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        with _lock:
            attempts[self.name] += 1
            attempt = attempts[self.name]
        if self.refuse:
            raise PermanentError(f"{self.name}: {self.refuse}")
        if attempt <= self.busy_times:
            raise TransientError(f"{self.name}: CA busy, try again later (attempt {attempt})")
        with _lock:
            _in_progress[self.name] += 1
            most_at_once[self.name] = max(most_at_once[self.name], _in_progress[self.name])
        try:
            time.sleep(self.hold_seconds)
            return self.inner.issue(csr, profile, validity_days=validity_days, replaces=replaces, journal=journal)
        finally:
            with _lock:
                _in_progress[self.name] -= 1

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        self.inner.revoke(certificate, reason, key=key)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        return None


class TestIssuerBlock(Block):
    """The private CA ``ca_name``, busy ``busy_times`` times first, or refusing with ``refuse``."""

    __test__ = False  # not a pytest test class
    _block_type_name: ClassVar[str] = "Test issuer"
    _block_type_slug: ClassVar[str] = "test-issuer"

    ca_name: str = Field(description="The private CA that finally signs.")
    busy_times: int = Field(default=0, description="How many orders fail with a TransientError first.")
    refuse: str | None = Field(default=None, description="Refuse every order with this reason.")
    hold_seconds: float = Field(default=0.0, description="How long each order takes before the CA signs.")

    def get_issuer(self, engine: Any, key_ring: Any, *, actor: Any = None) -> _Wrapped:
        from connectors.private_ca import PrivateCAIssuer

        name = f"{self._block_type_slug}/{self._block_document_name}"
        return _Wrapped(PrivateCAIssuer(engine, self.ca_name, key_ring, actor=actor), name, self.busy_times, self.refuse,
                        self.hold_seconds)
