"""Parsing of option values shared by several command groups, and the actor and key ring of a command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from certpilot import audit, keystore
from certpilot.settings import load_settings
from certpilot.timespan import parse_timespan
from cli.console import err

PasswordFile = Annotated[Optional[Path], typer.Option(help="Read the password (PKCS#12, encrypted keys) from this file.")]
PasswordEnv = Annotated[Optional[str], typer.Option(help="Read the password from this environment variable.")]


def actor() -> audit.Actor:
    return audit.Actor(load_settings().actor)


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings(), announce=lambda message: err.print(f"[yellow]note:[/] {message}"))


def parse_tags(values: list[str] | None) -> dict[str, str]:
    tags = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not key=value", param_hint="--tag")
        tags[key] = val
    return tags


def read_password(password_file: Path | None, password_env: str | None) -> bytes | None:
    if password_file:
        return password_file.read_bytes().rstrip(b"\r\n")
    if password_env:
        if password_env not in os.environ:
            raise typer.BadParameter(f"environment variable {password_env} is not set", param_hint="--password-env")
        return os.environ[password_env].encode()
    return None


def whole_days(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        span = parse_timespan(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if span.total_seconds() % 86400:
        raise typer.BadParameter(f"{text!r} is not a whole number of days", param_hint=option)
    return int(span.total_seconds() // 86400)
