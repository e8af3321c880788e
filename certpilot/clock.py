"""The one clock: aware UTC time, and the type of a clock passed in where time decides anything.

Code that decides by time (is it due, has it expired, which CRL is current) takes ``now`` or a
``Clock`` as a parameter and defaults to ``utcnow``; tests pass a fixed time instead of patching.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """Now, as an aware UTC datetime (never a naive one)."""
    return dt.datetime.now(dt.timezone.utc)
