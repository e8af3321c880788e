"""Loopback ports for the lab's servers: below the ephemeral range (32768 and up), where clients'
ports come from, so a server never collides with a client."""

from __future__ import annotations

import random
import socket

_handed_out: set[int] = set()


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that this process has not handed out
    before (a caller may not have bound it yet)."""
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port between {low} and {high} after 200 tries")
