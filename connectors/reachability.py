"""Does it answer? The services certpilot depends on, asked the least that proves they are there.

- ``http_answers(url, what, timeout=5, verify=True)``: a GET that must get an HTTP answer below 500 (an ACME
  directory, a CA's CRL) within ``timeout`` for the connection and each read, and within the same
  deadline for the first 64 KiB of the body;
- ``ssh_answers(host, port, what, timeout=5)``: a TCP connection and the SSH server's identification line
  (``SSH-2.0-...``) within ``timeout``; nothing is sent, no key is offered.

Each returns None when the service answered, else why not, naming what it is, host:port and what it was
doing ("the ACME directory https://127.0.0.1:14000/dir (127.0.0.1:14000) did not answer within 5 s while
waiting for the HTTP answer"). Nothing raises for the network. No Prefect here.
"""

from __future__ import annotations

import socket
import time
import urllib.parse

import httpx

from certpilot.errors import endpoint_label

__all__ = ["http_answers", "ssh_answers"]

_BODY_BYTES = 64 * 1024


def _where(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return endpoint_label(parts.hostname or "?", parts.port or (443 if parts.scheme == "https" else 80))


def http_answers(url: str, what: str, timeout: float = 5.0, verify: bool | str = True) -> str | None:
    """None when ``url`` answers a GET with a status below 500 within ``timeout``; else why not."""
    where = _where(url)
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout), verify=verify, follow_redirects=False) as client:
            with client.stream("GET", url, headers={"User-Agent": "certpilot-monitor"}) as response:
                if response.status_code >= 500:
                    return f"{what} {url} ({where}) answered HTTP {response.status_code}"
                received = 0
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received >= _BODY_BYTES:
                        break
                    if time.monotonic() > deadline:
                        return f"{what} {url} ({where}) did not finish its answer within {timeout:g} s"
        return None
    except httpx.ConnectTimeout:
        return f"{what} {url} ({where}): no connection within {timeout:g} s"
    except httpx.TimeoutException:
        return f"{what} {url} ({where}) did not answer within {timeout:g} s while waiting for the HTTP answer"
    except httpx.ConnectError as exc:
        return f"{what} {url} ({where}): cannot connect: {exc}"
    except httpx.HTTPError as exc:
        return f"{what} {url} ({where}): {type(exc).__name__}: {exc}"
    except (OSError, ValueError) as exc:  # a CA bundle that cannot be read, a URL that cannot be used
        return f"{what} {url} ({where}): {type(exc).__name__}: {exc}"


def ssh_answers(host: str, port: int, what: str, timeout: float = 5.0) -> str | None:
    """None when ``host:port`` sends an SSH identification line within ``timeout``; else why not."""
    where = endpoint_label(host, port)
    deadline = time.monotonic() + timeout
    doing = "connecting"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            doing = "waiting for its SSH identification line"
            received = b""
            while b"\n" not in received and len(received) < 1024:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(256)
                if not chunk:
                    return f"{what} ({where}) closed the connection without an SSH identification line"
                received += chunk
    except TimeoutError:
        return f"{what} ({where}) did not answer within {timeout:g} s while {doing}"
    except OSError as exc:
        return f"{what} ({where}): cannot connect: {exc.strerror or exc}"
    lines = received.decode("latin-1").splitlines()
    if not any(line.startswith("SSH-") for line in lines):
        return f"{what} ({where}) answered, but not with an SSH identification line: {lines[0][:60]!r}"
    return None
