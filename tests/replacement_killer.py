"""Runs the revoke-and-replace flow in this process and kills it (SIGKILL) at a chosen point: right after
the N-th time any item of the campaign reached STATE (certpilot.replacing.checkpoint, called after each
committed state change). For the kill tests in tests/flows/test_revoke_and_replace.py.

    python -m tests.replacement_killer STATE N '{"issuer": "fleet-ca", "dry_run": false}'

Exits 3 when the run ended without reaching that point (it was not killed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    state, nth, parameters = argv[0], int(argv[1]), json.loads(argv[2])
    from certpilot import replacing

    seen = 0
    lock = threading.Lock()

    def kill_at(item_id: int, reached: str) -> None:
        nonlocal seen
        if reached != state:
            return
        with lock:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    replacing.checkpoint = kill_at  # the seam: a no-op in production
    from flows.revoke_and_replace import revoke_and_replace

    revoke_and_replace(**parameters, return_state=True)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
