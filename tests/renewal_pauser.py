"""Runs the certpilot command (``python -m cli ARGS...``) in this process, holding every renewal that
reaches POINT (certpilot.checkpoints.Point) from the COUNT-th one on until the file DIR/go exists, so a
test can change the world in the middle of the run (restart the Prefect server) while the run's threads
stand at a known place. For tests/flows/test_prefect_server_restart.py.

    python -m tests.renewal_pauser POINT COUNT DIR ARGS...

The COUNT-th renewal to reach POINT writes DIR/paused (its subject's name) first. No wait is unbounded:
after HOLD_SECONDS the held renewals go on by themselves (the test then fails on its own deadline).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

HOLD_SECONDS = 120.0


def main(argv: list[str]) -> None:
    wanted, count, place, args = argv[0], int(argv[1]), Path(argv[2]), argv[3:]
    from certpilot import checkpoints

    lock = threading.Lock()
    seen = [0]

    def hold_at(point: checkpoints.Point, subject: str) -> None:
        if point != wanted:
            return
        with lock:
            seen[0] += 1
            reached = seen[0]
        if reached < count:
            return
        if reached == count:
            (place / "paused").write_text(subject)
        deadline = time.monotonic() + HOLD_SECONDS
        while not (place / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    checkpoints.reached = hold_at  # the seam: a no-op in production
    sys.argv = ["certpilot", *args]
    from cli.main import main as certpilot

    certpilot()


if __name__ == "__main__":
    main(sys.argv[1:])
