"""A strict, forgiving PEM reader: bundles, text between blocks, CRLF line ends, precise errors.

Forgiving about what RFC 7468 allows around blocks (explanatory text, blank lines, any line end);
strict about what is inside them (base64 that does not decode, a block with no END line).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from certpilot.errors import ParseError

_BEGIN = re.compile(r"^-----BEGIN ([A-Z0-9 ]+)-----\s*$")
_END = re.compile(r"^-----END ([A-Z0-9 ]+)-----\s*$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+:")

# Labels whose contents are secret: never keep their text in an error.
SECRET_LABELS = frozenset({"PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY",
                           "DSA PRIVATE KEY", "OPENSSH PRIVATE KEY"})


@dataclass(frozen=True)
class PemBlock:
    label: str
    line: int  # 1-based line of the BEGIN line
    der: bytes = field(repr=False)
    text: str = field(repr=False)  # the whole block, BEGIN to END, with its headers

    @property
    def is_secret(self) -> bool:
        return self.label in SECRET_LABELS


def looks_like_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def read_pem_blocks(data: bytes, source: str | None = None) -> list[PemBlock]:
    """Every PEM block in ``data``, in order. Raises ParseError naming the line of the first bad block."""
    text = data.decode("latin-1")
    blocks: list[PemBlock] = []
    label: str | None = None
    start = 0
    body: list[str] = []
    raw: list[str] = []
    has_headers = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if label is None:
            match = _BEGIN.match(stripped)
            if match:
                label, start, body, raw, has_headers = match.group(1), number, [], [stripped], False
            continue
        raw.append(stripped)
        if _BEGIN.match(stripped):
            raise ParseError(f"PEM block {label!r} at line {start} has no END line before the next "
                             f"BEGIN at line {number} (truncated?)", source)
        end = _END.match(stripped)
        if end:
            if end.group(1) != label:
                raise ParseError(f"PEM block {label!r} at line {start} ends with END {end.group(1)!r} "
                                 f"at line {number}", source)
            blocks.append(PemBlock(label, start, _decode(label, start, body, source), "\n".join(raw) + "\n"))
            label = None
            continue
        if _HEADER.match(stripped) and not body:
            has_headers = True  # RFC 1421 headers (Proc-Type, DEK-Info) precede the body
            continue
        if has_headers and not stripped and not body:
            continue
        body.append(stripped)
    if label is not None:
        raise ParseError(f"PEM block {label!r} at line {start} has no END line (truncated?)", source)
    return blocks


def _decode(label: str, line: int, body: list[str], source: str | None) -> bytes:
    joined = "".join("".join(body).split())
    if not joined:
        raise ParseError(f"PEM block {label!r} at line {line} is empty", source)
    try:
        return base64.b64decode(joined, validate=True)
    except (binascii.Error, ValueError):
        bad = next((c for c in joined if not (c.isalnum() or c in "+/=")), None)
        why = f"invalid character {bad!r}" if bad is not None else "wrong length or padding"
        raise ParseError(f"PEM block {label!r} at line {line} is not valid base64 ({why})", source) from None


def to_pem(label: str, der: bytes) -> str:
    encoded = base64.b64encode(der).decode("ascii")
    lines = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
