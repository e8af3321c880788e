"""Durations as operators write them: 30d, 12h, 90m, 2w, 45s, or combinations such as 1d12h."""

from __future__ import annotations

import datetime as dt
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_timespan(text: str) -> dt.timedelta:
    compact = text.strip().lower().replace(" ", "")
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit, e.g. 30d, 12h, 90m, 2w, 1d12h")
    return dt.timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
