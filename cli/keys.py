"""The keys commands: private keys at rest and the master key (a file, the environment, or AWS KMS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sqlmodel import Session

from certpilot import key_listing, keystore
from certpilot.database import get_engine, read_session
from certpilot.settings import load_settings
from certpilot.token_keys import list_token_keys
from cli.console import JsonOption, line, note, out, print_json, usage_error
from cli.options import actor
from connectors import kms

app = typer.Typer(help="Private keys at rest and the master key.", no_args_is_help=True)


@app.command("rotate-master")
def rotate_master_command(
    new_key_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help=(
        "Where to write the new master key (required when it comes from CERTPILOT_MASTER_KEY)."))] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate a new master key and re-seal every stored private key under it.

    With CERTPILOT_MASTER_KEY_KMS set, the new master key is a new data key of that KMS key, kept as its KMS
    ciphertext: this moves a file or environment master key into KMS, or rotates within KMS."""
    settings = load_settings()
    rotation = kms.rotate_master_key(get_engine(settings), settings, actor(), new_key_file)
    if as_json:
        print_json({"old": rotation.old_id, "new": rotation.new_id, "keys": rotation.keys,
                    "key_file": str(rotation.key_file), "kms_key_arn": rotation.kms_key_arn,
                    "retired": rotation.retired})
        return
    held = f"in KMS key {rotation.kms_key_arn}, its ciphertext in" if rotation.kms_key_arn else "in"
    out.print(line(f"master key {rotation.old_id} -> {rotation.new_id}: {rotation.keys} key(s) re-sealed; "
                   f"new key {held} {rotation.key_file}"))
    if rotation.retired:
        note(f"stored keys no longer need the master key in {rotation.retired}: keep it with the backups made "
             "before now, then remove it from this machine's configuration", out)
    elif settings.master_key and not rotation.kms_key_arn:
        note(f"now set CERTPILOT_MASTER_KEY_FILE={rotation.key_file} (or CERTPILOT_MASTER_KEY to its contents)", out)


def token_keys(session: Session) -> list[key_listing.ListedKey]:
    """The keys held in PKCS#11 tokens (a private CA's issuing key), as ListedKey(store="token"): the token
    and the key's label, and the attributes the token reported when it made the key; never a PIN."""
    held = list_token_keys(session)
    uses = key_listing.uses_of(session, [k.spki_sha256 for k in held])
    listed = []
    for k in held:
        size, curve = key_listing.size_and_curve(k.algorithm)
        custody = ("made on the token" if k.made_on_token else "imported into the token") + (
            ", extractable" if k.extractable else ", not extractable")
        listed.append(key_listing.ListedKey(
            ref=f"token:{k.token_label}/{k.key_label}", store=key_listing.TOKEN_STORE, algorithm=k.algorithm,
            key_size=size, curve=curve, spki_sha256=k.spki_sha256, created_at=k.created_at, origin=custody,
            used_by=(key_listing.KeyUse(f"ca-{k.role}", k.ca), *uses.get(k.spki_sha256, ())),
            token=f"{k.token_label} key {k.key_label} (module {k.module})"))
    return listed


@app.command("list")
def keys_list_command(as_json: JsonOption = False) -> None:
    """Every private key, where it lives and what uses it (never its contents): keystore keys with the master
    key that seals them and that key's source (file, environment, KMS key), and keys held in tokens."""
    settings = load_settings()
    with read_session(get_engine(settings)) as session:
        keys = key_listing.keystore_keys(session, settings) + token_keys(session)
    if as_json:
        print_json([key.as_json() for key in keys])
        return
    for key in keys:
        if key.destroyed_at:
            place = f"destroyed {key_listing.iso(key.destroyed_at)}"
        elif key.store == key_listing.KEYSTORE_STORE:
            source = key.master_key or "not configured here"
            place = f"keystore, sealed by master key {key.master_key_id} ({source})"
        else:
            place = f"{key.store} {key.token or ''}".strip()
        used = "; used by " + ", ".join(str(u) for u in key.used_by) if key.used_by else "; unused"
        out.print(line(f"{key.ref}  {key.algorithm:<9} spki {key.spki_sha256[:16]}  {key.origin or '-':<9} "
                       f"{place}{used}"))


@app.command("destroy")
def keys_destroy_command(ref: Annotated[str, typer.Argument(metavar="KEY", help="key:ID as shown by `keys list`.")],
                         yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
                         as_json: JsonOption = False) -> None:
    """Crypto-shred a private key: its ciphertext and data key are erased."""
    if not yes:
        raise usage_error("destroying a key cannot be undone: add --yes")
    keystore.shred(get_engine(), keystore.KeyRef(ref.removeprefix("key:")), actor())
    if as_json:
        print_json({"ref": ref if ref.startswith("key:") else f"key:{ref}", "destroyed": True})
        return
    out.print(line(f"destroyed {ref}"))
