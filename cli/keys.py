"""The keys commands: private keys at rest and the master key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from certpilot import inventory, keystore
from certpilot.database import get_engine, read_session
from certpilot.settings import load_settings
from cli.console import JsonOption, line, note, out, print_json, usage_error
from cli.options import actor

app = typer.Typer(help="Private keys at rest and the master key.", no_args_is_help=True)


@app.command("rotate-master")
def rotate_master_command(
    new_key_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help=(
        "Where to write the new master key (required when it comes from CERTPILOT_MASTER_KEY)."))] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate a new master key and re-seal every stored private key under it."""
    settings = load_settings()
    rotation = keystore.rotate_master_key(get_engine(settings), settings, actor(), new_key_file)
    if as_json:
        print_json({"old": rotation.old_id, "new": rotation.new_id, "keys": rotation.keys, "key_file": str(rotation.key_file)})
        return
    out.print(line(f"master key {rotation.old_id} -> {rotation.new_id}: {rotation.keys} key(s) re-sealed; "
                   f"new key in {rotation.key_file}"))
    if settings.master_key:
        note(f"now set CERTPILOT_MASTER_KEY_FILE={rotation.key_file} (or CERTPILOT_MASTER_KEY to its contents)", out)


@app.command("list")
def keys_list_command(as_json: JsonOption = False) -> None:
    """Stored private keys (never their contents)."""
    from sqlmodel import select

    from certpilot.models import PrivateKey

    with read_session(get_engine()) as session:
        rows = [{"ref": f"key:{k.id}", "algorithm": k.algorithm, "spki_sha256": k.spki_sha256, "origin": k.origin,
                 "master_key_id": k.master_key_id, "created_at": inventory.iso(k.created_at),
                 "destroyed_at": inventory.iso(k.destroyed_at)} for k in session.exec(select(PrivateKey)).all()]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        state = f"destroyed {row['destroyed_at']}" if row["destroyed_at"] else f"sealed by {row['master_key_id']}"
        out.print(line(f"{row['ref']}  {row['algorithm']:<9} spki {(row['spki_sha256'] or '')[:16]}  "
                       f"{row['origin']:<9} {state}"))


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
