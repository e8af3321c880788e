"""Parsing of option values shared by several command groups, the choices options take, the actor
and key ring of a command, and the password of a private key leaving certpilot."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from certpilot import audit, keystore
from certpilot.settings import load_settings
from certpilot.timespan import parse_timespan
from connectors import kms
from cli.console import note, usage_error

PasswordFile = Annotated[Optional[Path], typer.Option(metavar="FILE", help="Read the password from this file.")]
PasswordEnv = Annotated[Optional[str], typer.Option(metavar="VAR", help="Read the password from this environment variable.")]
PlaintextKey = Annotated[bool, typer.Option("--plaintext-key", help="Write the private key unencrypted (no password): "
                                                                     "anyone who reads the output has the key.")]


# The choices options take: an unknown value is a usage error (exit 2) listing these. Each lists
# exactly the values the core accepts (tests/unit/test_cli_promises.py checks that).

class CertificateStatus(StrEnum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"
    EXPIRED = "expired"


class ExportFormat(StrEnum):
    PEM = "pem"
    DER = "der"
    PKCS12 = "pkcs12"
    JSON = "json"


class CrlFormat(StrEnum):
    DER = "der"
    PEM = "pem"


class Profile(StrEnum):
    TLS_SERVER = "tls-server"
    TLS_CLIENT = "tls-client"
    MTLS = "mtls"


class KeyAlgorithm(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"
    ML_DSA_44 = "ml-dsa-44"  # post-quantum (FIPS 204): private CAs only
    ML_DSA_65 = "ml-dsa-65"
    ML_DSA_87 = "ml-dsa-87"


class RevocationReason(StrEnum):
    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    AFFILIATION_CHANGED = "affiliation-changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"
    PRIVILEGE_WITHDRAWN = "privilege-withdrawn"


def actor() -> audit.Actor:
    return audit.Actor(load_settings().actor)


def ring() -> keystore.KeyRing:
    return kms.load_key_ring(load_settings(), announce=note)


def parse_tags(values: list[str] | None) -> dict[str, str]:
    tags = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise usage_error(f"{value!r} is not key=value", "--tag")
        tags[key] = val
    return tags


def read_password(password_file: Path | None, password_env: str | None) -> bytes | None:
    if password_file:
        try:
            return password_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise usage_error(f"cannot read {password_file}: {exc.strerror or exc}", "--password-file") from None
    if password_env:
        if password_env not in os.environ:
            raise usage_error(f"environment variable {password_env} is not set", "--password-env")
        return os.environ[password_env].encode()
    return None


def stdin_is_terminal() -> bool:
    """Whether a person can be asked (a password, a confirmation) on standard input."""
    return sys.stdin.isatty()


def key_password(password_file: Path | None, password_env: str | None, plaintext: bool, what: str) -> bytes | None:
    """The password that encrypts a private key leaving certpilot (``what`` names it), or None when the
    user asked for it in plaintext with --plaintext-key. From --password-file or --password-env; else,
    on a terminal, asked for twice; else a usage error saying how to give one."""
    password = read_password(password_file, password_env)
    if password is not None and plaintext:
        raise usage_error("--plaintext-key writes the key unencrypted: give it or a password, not both", "--plaintext-key")
    if plaintext:
        return None
    if password is None:
        if not stdin_is_terminal():
            raise usage_error(f"{what} is encrypted with a password: give --password-file FILE or --password-env VAR "
                              "(or --plaintext-key to write it unencrypted)")
        password = typer.prompt(f"Password to encrypt {what}", hide_input=True, confirmation_prompt=True,
                                err=True).encode()
    if not password:
        raise usage_error("the password is empty: give one, or --plaintext-key to write the key unencrypted")
    return password


def whole_days(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        span = parse_timespan(text)
    except ValueError as exc:
        raise usage_error(str(exc), option) from None
    if span.total_seconds() % 86400:
        raise usage_error(f"{text!r} is not a whole number of days", option)
    return int(span.total_seconds() // 86400)
