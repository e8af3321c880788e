"""The points of renew-and-deploy where a step has just been committed, and the seam called there.

``reached(point, subject)`` is called by the renewal sequence (certpilot.renewing.renew and its renewal
journal, ``subject`` the managed certificate's name) and by the SSH deployers (connectors.ssh_deploy,
``subject`` the target's name) each time one of the ``Point``s is passed. It does nothing: it is where tests stop the
process (SIGKILL) to prove that a re-run converges from any of them (tests/renewal_killer.py). Call
it as ``checkpoints.reached(...)`` (an attribute of this module, looked up at each call), never
imported by name, so that the seam can be replaced.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Point", "reached"]


class Point(StrEnum):
    """Where renew-and-deploy has got to, in order."""

    KEY = "key"  # the new key is sealed in the keystore
    REQUESTED = "requested"  # the CSR is made with it, not yet sent
    ORDERED = "ordered"  # an ACME CA created the order and the renewal journal holds its URL (a private CA has none)
    ISSUED = "issued"  # the issuer returned the certificate; not yet stored
    STORED = "stored"  # it is the managed certificate's current one; not yet deployed
    UPLOADED = "uploaded"  # a target's new files are in place; not yet tested, reloaded or swapped in
    RELOADING = "reloading"  # a target is about to be reloaded (nginx: its configuration test passed)
    RELOADED = "reloaded"  # a target was reloaded (or swapped in memory); not yet verified on the wire


def reached(point: Point, subject: str) -> None:
    """Called each time ``subject`` passes ``point``. Does nothing (the seam where tests stop the process)."""
