"""`avatar keys create|list|revoke`: manage API keys in the store the server uses.

The commands read the same settings as `avatar serve` (AVATAR_STORE_URL, AVATAR_DATA_DIR
or the flags below), so keys land where the server looks: keys.sqlite in the embedded
store's folder, or the Redis database every replica shares. A running server sees a new
key, or a revocation, on the next request.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from server.commands import _fail, load_settings

logger = logging.getLogger(__name__)

StoreUrlOption = Annotated[
    str | None, typer.Option(help="Avatar store; empty: embedded [AVATAR_STORE_URL].")
]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Embedded store folder [AVATAR_DATA_DIR].")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _open(store_url: str | None, data_dir: Path | None):  # -> KeyStore
    from server.backends import BackendError, open_key_store

    settings = load_settings(store_url=store_url, data_dir=data_dir)
    try:
        return open_key_store(settings)
    except BackendError as error:
        raise _fail(str(error), code=2) from None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def keys_create_command(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    store_url: StoreUrlOption = None,
    data_dir: DataDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create an API key; prints the key once (only its hash is stored)."""
    from server.keys import KeyStoreError

    store = _open(store_url, data_dir)
    try:
        key, token = store.create(name)
    except KeyStoreError as error:
        raise _fail(str(error)) from None
    finally:
        store.close()
    if json_out:
        typer.echo(json.dumps({"id": key.id, "name": key.name, "created": key.created,
                               "key": token}))
        return
    typer.echo(token)
    typer.echo(
        f"created key {key.id} ({key.name}); store it now: it cannot be shown again",
        err=True,
    )


def keys_list_command(
    store_url: StoreUrlOption = None,
    data_dir: DataDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """List API keys (ids and names; never the keys themselves)."""
    store = _open(store_url, data_dir)
    try:
        keys = store.list()
    finally:
        store.close()
    if json_out:
        typer.echo(json.dumps([
            {"id": k.id, "name": k.name, "created": k.created, "revoked": k.revoked,
             "active": k.active}
            for k in keys
        ]))
        return
    if not keys:
        typer.echo("no API keys; make one with `avatar keys create --name NAME`", err=True)
        return
    typer.echo(f"{'id':<12}  {'status':<8}  {'created':<19}  {'revoked':<19}  name")
    for key in keys:
        status = "active" if key.active else "revoked"
        typer.echo(
            f"{key.id:<12}  {status:<8}  {_when(key.created):<19}  {_when(key.revoked):<19}"
            f"  {key.name}"
        )


def keys_revoke_command(
    key_id: Annotated[str, typer.Argument(help="Key id (from `avatar keys list`).")],
    store_url: StoreUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key: from the next request on, it opens nothing (its avatars stay,
    out of reach; its open streams run until they close)."""
    store = _open(store_url, data_dir)
    try:
        key = store.revoke(key_id)
    finally:
        store.close()
    if key is None:
        raise _fail(f"no API key with id {key_id!r} (see `avatar keys list`)")
    typer.echo(f"revoked key {key.id} ({key.name})")
