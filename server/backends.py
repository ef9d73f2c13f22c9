"""Open the stores the settings name: avatars, API keys and rate counters, all three in
the same place (the embedded folder, or one Redis database shared by every replica)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.keys import KeyStore, KeyStoreError, SqliteKeyStore
from server.limits import MemoryRateCounter, RateCounter
from server.settings import Settings, redact_url
from server.store.base import AvatarStore, StoreError

logger = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A store cannot be opened; the message names it and says why."""


@dataclass
class Backends:
    """The stores of one server process."""

    avatars: AvatarStore
    keys: KeyStore
    counters: RateCounter

    def close(self) -> None:
        self.keys.close()
        self.avatars.close()


def open_key_store(settings: Settings) -> KeyStore:
    """The API key store alone (the `avatar keys` command)."""
    if settings.store_kind == "redis":
        from server.store.redis import RedisKeyStore, connect

        try:
            return RedisKeyStore(connect(settings.store_url), settings.store_url)
        except StoreError as error:
            raise BackendError(f"key store: {error}") from error
    try:
        return SqliteKeyStore(settings.store_dir)
    except (KeyStoreError, OSError) as error:
        raise BackendError(f"key store: {error}") from error


def open_backends(settings: Settings) -> Backends:
    """Every store of the server; BackendError when one cannot be used."""
    if settings.store_kind == "redis":
        from server.store.redis import RedisKeyStore, RedisRateCounter, RedisStore, connect

        try:
            client = connect(settings.store_url)
        except StoreError as error:
            raise BackendError(
                f"store: {error}; check AVATAR_STORE_URL and that redis-server runs"
            ) from error
        logger.info("avatar store: Redis at %s", redact_url(settings.store_url))
        return Backends(
            avatars=RedisStore(settings.store_url, client),
            keys=RedisKeyStore(client, settings.store_url),
            counters=RedisRateCounter(client),
        )

    from server.store.local import LocalStore

    try:
        avatars = LocalStore(settings.store_dir)
    except OSError as error:
        raise BackendError(f"store: cannot open {settings.store_dir}: {error}") from error
    try:
        keys = SqliteKeyStore(settings.store_dir)
    except (KeyStoreError, OSError) as error:
        avatars.close()
        raise BackendError(f"key store: {error}") from error
    return Backends(avatars=avatars, keys=keys, counters=MemoryRateCounter())
