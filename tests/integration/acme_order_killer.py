"""Runs renew-due the CLI's direct way (tests.integration.acme_faults.renew_due_directly) against an ACME CA
in this process, answering http-01 on 127.0.0.1:HTTP_PORT, and kills it (SIGKILL) the first time SUBJECT
(a managed certificate's name) reaches POINT (certpilot.checkpoints.Point). For the kill tests in
tests/integration/test_crash_acme_order.py. The inventory and key ring are the environment's
(CERTPILOT_DATABASE_URL, CERTPILOT_HOME).

    python -m tests.integration.acme_order_killer POINT SUBJECT DIRECTORY_URL CA_BUNDLE HTTP_PORT

Before dying it prints the point reached on stdout (flushed). Exits 3 when the run ended without reaching
that point (it was not killed).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    wanted, whom, directory, bundle, port = argv[0], argv[1], argv[2], Path(argv[3]), int(argv[4])
    from certpilot import checkpoints, database, keystore
    from certpilot.settings import load_settings
    from connectors.acme_issuer import AcmeIssuer
    from connectors.challenges import Http01Responder
    from tests.integration.acme_faults import renew_due_directly

    def kill_at(point: checkpoints.Point, subject: str) -> None:
        if point == wanted and subject == whom:
            print(f"killed at {point} of {subject}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.reached = kill_at  # the seam: a no-op in production
    engine = database.get_engine()

    def ring() -> keystore.KeyRing:
        return keystore.load_key_ring(load_settings())

    with Http01Responder("127.0.0.1", port) as solver:
        issuer = AcmeIssuer(engine, "faulty", directory, key_ring=ring, solver=solver, ca_bundle=bundle,
                            timeout=5.0)
        renew_due_directly(engine, issuer, ring)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
