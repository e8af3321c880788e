"""Runs renew-due the CLI's direct way (cli.renewals, no flow run; blocks read from PREFECT_API_URL) in this
process and kills it (SIGKILL) the first time SUBJECT (a managed certificate's or a target's name) reaches
POINT (certpilot.checkpoints.Point, the seam called after each committed step of renew-and-deploy). For the
kill tests in tests/flows/test_crash_renew_and_deploy.py.

    python -m tests.renewal_killer POINT SUBJECT WITHIN_DAYS

Before dying it prints the point reached on stdout (flushed), so the test knows the kill was where it
asked. Exits 3 when the run ended without reaching that point (it was not killed).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys


def main(argv: list[str]) -> int:
    wanted, whom, within_days = argv[0], argv[1], float(argv[2])
    from certpilot import checkpoints

    def kill_at(point: checkpoints.Point, subject: str) -> None:
        if point == wanted and subject == whom:
            print(f"killed at {point} of {subject}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.reached = kill_at  # the seam: a no-op in production
    from cli.renewals import _Direct

    _Direct().renew_due(dt.timedelta(days=within_days))
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
