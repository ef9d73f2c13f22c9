"""API keys: the token format, how tokens are hashed and checked, and where keys live.

A token reads `avk_<id>_<secret>`: `id` (12 hex digits) names the key in listings, logs
and avatar ownership; `secret` is 32 random bytes (URL-safe base64). Only the SHA-256 of
the whole token is stored. A slow password hash would add nothing here: the token is
random with 256 bits of entropy, so there is no dictionary to walk.

Keys live beside the avatars: in `keys.sqlite` in the embedded store's folder, or in the
Redis database of a Redis store (server/store/redis.py), so every replica sees a key the
moment `avatar keys create` makes it, and stops accepting it when it is revoked.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "avk"
KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")
TOKEN_PATTERN = re.compile(r"^avk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = re.compile(r"^[\w .@:+-]{1,64}$")


class KeyStoreError(Exception):
    """A key operation cannot be done (bad name, store failure); the message says why."""


@dataclass(frozen=True)
class ApiKey:
    """A stored key: never the token itself, only its hash."""

    id: str
    name: str
    created: float  # unix seconds
    token_sha256: str
    revoked: float | None = None  # unix seconds, once revoked

    @property
    def active(self) -> bool:
        return self.revoked is None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh (key id, token)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def token_key_id(token: str) -> str | None:
    """The key id a token names, or None when it is not shaped like a token."""
    match = TOKEN_PATTERN.match(token)
    return match.group(1) if match else None


def check_name(name: str) -> str:
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise KeyStoreError(
            f"key name: expected 1-64 letters, digits, spaces or . @ : + - _, got {name!r}"
        )
    return name


class KeyStore(ABC):
    """Where API keys live. Blocking; async code calls it in a thread."""

    kind: str = "abstract"

    @abstractmethod
    def add(self, key: ApiKey) -> None:
        """Store a new key."""

    @abstractmethod
    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not; None when unknown."""

    @abstractmethod
    def list(self) -> list[ApiKey]:
        """Every key, oldest first, revoked ones included."""

    @abstractmethod
    def mark_revoked(self, key_id: str, when: float) -> None:
        """Record the revocation of an existing key."""

    def close(self) -> None:  # noqa: B027 - a store without resources needs no close
        """Release files and connections."""

    def create(self, name: str) -> tuple[ApiKey, str]:
        """Make a key; returns it and its token (shown once, never stored)."""
        key_id, token = new_token()
        key = ApiKey(id=key_id, name=check_name(name), created=time.time(),
                     token_sha256=hash_token(token))
        self.add(key)
        logger.info("API key %s (%s) created", key.id, key.name)
        return key, token

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key (idempotent); returns it, or None when unknown."""
        key = self.get(key_id) if KEY_ID_PATTERN.match(key_id) else None
        if key is None:
            return None
        if key.active:
            self.mark_revoked(key_id, time.time())
            logger.info("API key %s (%s) revoked", key.id, key.name)
        return self.get(key_id)

    def verify(self, token: str) -> ApiKey | None:
        """The active key of a token, or None (malformed, unknown, revoked, wrong secret)."""
        key_id = token_key_id(token)
        if key_id is None:
            return None
        key = self.get(key_id)
        if key is None or not key.active:
            return None
        if not hmac.compare_digest(key.token_sha256, hash_token(token)):
            return None
        return key

    def count_active(self) -> int:
        return sum(1 for key in self.list() if key.active)


KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    token_sha256 TEXT NOT NULL,
    revoked REAL
)
"""


class SqliteKeyStore(KeyStore):
    """Keys in `keys.sqlite` in the embedded store's folder; other processes (the
    `avatar keys` command) may write it while the server reads it."""

    kind = "sqlite"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "keys.sqlite"
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute(KEYS_SCHEMA)
        except sqlite3.Error as error:
            raise KeyStoreError(f"cannot open the key store {self.path}: {error}") from error

    @staticmethod
    def _key(row: tuple) -> ApiKey:
        return ApiKey(id=row[0], name=row[1], created=row[2], token_sha256=row[3],
                      revoked=row[4])

    def add(self, key: ApiKey) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (id, name, created, token_sha256, revoked) "
                "VALUES (?, ?, ?, ?, ?)",
                (key.id, key.name, key.created, key.token_sha256, key.revoked),
            )

    def get(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created, token_sha256, revoked FROM api_keys WHERE id = ?",
                (key_id,),
            ).fetchone()
        return None if row is None else self._key(row)

    def list(self) -> builtins.list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, created, token_sha256, revoked FROM api_keys "
                "ORDER BY created"
            ).fetchall()
        return [self._key(row) for row in rows]

    def mark_revoked(self, key_id: str, when: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (when, key_id),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
