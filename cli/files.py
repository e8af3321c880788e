"""Files the CLI reads and writes: a file that cannot be read is bad usage naming it; nothing is written
over an existing file unless told (--force), and a file holding a private key is mode 0600 before a
byte is written."""

from __future__ import annotations

import os
from pathlib import Path

from certpilot.errors import InvalidOptionError, PermanentError


def refuse_existing(path: Path) -> None:
    """Fail (exit 1) before any work when ``path`` exists, so that nothing is done for a file that
    cannot be written."""
    if path.exists() or path.is_symlink():
        raise PermanentError(f"{path} exists: refusing to overwrite it (add --force to replace it)")


def write_new_file(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    """Write ``data`` to ``path``: a new file, or over an existing one only with ``force``. A file
    holding a key is mode 0600 before a byte is written (an existing file's mode is changed first)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if secret else 0o644)
    except FileExistsError:
        raise PermanentError(f"{path} exists: refusing to overwrite it (add --force to replace it)") from None
    except OSError as exc:
        raise PermanentError(f"cannot write {path}: {exc.strerror or exc}") from None
    if secret:
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file: an existing one keeps its own
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def read_text_file(path: Path, name: str = "FILE") -> str:
    """The UTF-8 text of ``path``; one that cannot be read is bad usage naming the option and why."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptionError(name, str(path), f"a readable UTF-8 file ({exc})") from None
