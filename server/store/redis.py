"""The Redis avatar store: every replica of the server reads and writes the same avatars.

Layout in the database (all names under the prefix `avatar:`):

    avatar:a:<id>            hash: meta (JSON), blob (the .npz bytes of the avatar), sha256
    avatar:index             sorted set of every avatar id, scored by creation time
    avatar:owner:<key id>    sorted set of one API key's avatar ids
    avatar:key:<key id>      hash: an API key (name, created, token_sha256, revoked)
    avatar:keys              sorted set of every key id
    avatar:rate:<name>:<n>   counter of a rate limit's window n (expires with it)
    avatar:events            pub/sub channel: "deleted <id>" and "put <id>"

Writes are MULTI/EXEC transactions, so a reader sees an avatar whole or not at all. Each
replica keeps its own hot cache (server/store/base.py: CachedStore) and checks a cached
avatar's sha256 against Redis before using it, so an avatar deleted through another
replica is refused at once; the events channel also lets a replica close its streams of
an avatar deleted elsewhere.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from server.keys import ApiKey, KeyStore, KeyStoreError
from server.limits import RateCounter
from server.settings import redact_url
from server.store.base import Avatar, AvatarMeta, AvatarStore, StoreError, valid_avatar_id
from server.store.local import pack_avatar, unpack_avatar

logger = logging.getLogger(__name__)

PREFIX = "avatar:"
EVENTS_CHANNEL = PREFIX + "events"
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0

EventHandler = Callable[[str, str], None]  # (kind, avatar id)


def connect(url: str) -> redis.Redis:
    """A client of the Redis server at `url`, checked with PING; StoreError when it cannot
    be reached."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            health_check_interval=30,
        )
        client.ping()
    except (RedisError, ValueError, OSError) as error:
        raise StoreError(f"cannot reach Redis at {redact_url(url)}: {error}") from error
    return client


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore(AvatarStore):
    """Avatars in Redis; thread-safe (redis-py pools its connections)."""

    kind = "redis"
    shared = True

    def __init__(self, url: str, client: redis.Redis | None = None) -> None:
        self.url = url
        self.client = client if client is not None else connect(url)
        self._listener: Any = None

    @staticmethod
    def _key(avatar_id: str) -> str:
        return f"{PREFIX}a:{avatar_id}"

    @staticmethod
    def _owner_index(owner: str) -> str:
        return f"{PREFIX}owner:{owner}"

    def _failed(self, what: str, error: Exception) -> StoreError:
        return StoreError(f"Redis at {redact_url(self.url)}: cannot {what}: {error}")

    # ------------------------------------------------------------ interface

    def put(self, avatar: Avatar) -> None:
        if not valid_avatar_id(avatar.id):
            raise StoreError(f"avatar id: expected [A-Za-z0-9_-]{{1,64}}, got {avatar.id!r}")
        avatar.check()
        blob = pack_avatar(avatar)
        meta = avatar.meta
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(meta.id))
                pipe.hset(self._key(meta.id), mapping={
                    "meta": meta.to_json(),
                    "blob": blob,
                    "sha256": hashlib.sha256(blob).hexdigest(),
                })
                pipe.zadd(PREFIX + "index", {meta.id: meta.created})
                if meta.owner is not None:
                    pipe.zadd(self._owner_index(meta.owner), {meta.id: meta.created})
                pipe.publish(EVENTS_CHANNEL, f"put {meta.id}")
                pipe.execute()
        except RedisError as error:
            raise self._failed(f"store avatar {meta.id}", error) from error

    def get(self, avatar_id: str) -> Avatar | None:
        if not valid_avatar_id(avatar_id):
            return None
        try:
            blob, digest = self.client.hmget(self._key(avatar_id), ["blob", "sha256"])
        except RedisError as error:
            raise self._failed(f"read avatar {avatar_id}", error) from error
        if blob is None:
            return None
        blob = blob.encode() if isinstance(blob, str) else bytes(blob)
        if hashlib.sha256(blob).hexdigest() != _text(digest):
            logger.warning("avatar %s skipped: its bytes do not match its sha256", avatar_id)
            return None
        try:
            return unpack_avatar(blob)
        except StoreError as error:
            logger.warning("avatar %s skipped: %s", avatar_id, error)
            return None

    def get_meta(self, avatar_id: str) -> AvatarMeta | None:
        if not valid_avatar_id(avatar_id):
            return None
        try:
            raw = self.client.hget(self._key(avatar_id), "meta")
        except RedisError as error:
            raise self._failed(f"read avatar {avatar_id}", error) from error
        if raw is None:
            return None
        try:
            return AvatarMeta.from_json(_text(raw) or "")
        except StoreError as error:
            logger.warning("avatar %s skipped: %s", avatar_id, error)
            return None

    def version(self, avatar_id: str) -> str | None:
        if not valid_avatar_id(avatar_id):
            return None
        try:
            return _text(self.client.hget(self._key(avatar_id), "sha256"))
        except RedisError as error:
            raise self._failed(f"read avatar {avatar_id}", error) from error

    def list(self, owner: str | None = None) -> list[AvatarMeta]:
        index = PREFIX + "index" if owner is None else self._owner_index(owner)
        try:
            ids = [_text(raw) or "" for raw in self.client.zrange(index, 0, -1)]
            with self.client.pipeline(transaction=False) as pipe:
                for avatar_id in ids:
                    pipe.hget(self._key(avatar_id), "meta")
                metas = pipe.execute()
        except RedisError as error:
            raise self._failed("list avatars", error) from error

        result = []
        for avatar_id, raw in zip(ids, metas, strict=True):
            if raw is None:
                continue  # deleted between the two reads
            try:
                result.append(AvatarMeta.from_json(_text(raw) or ""))
            except StoreError as error:
                logger.warning("avatar %s skipped: %s", avatar_id, error)
        return result

    def count(self, owner: str | None = None) -> int:
        index = PREFIX + "index" if owner is None else self._owner_index(owner)
        try:
            return int(self.client.zcard(index))
        except RedisError as error:
            raise self._failed("count avatars", error) from error

    def delete(self, avatar_id: str) -> bool:
        if not valid_avatar_id(avatar_id):
            return False
        meta = self.get_meta(avatar_id)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(avatar_id))
                pipe.zrem(PREFIX + "index", avatar_id)
                if meta is not None and meta.owner is not None:
                    pipe.zrem(self._owner_index(meta.owner), avatar_id)
                pipe.publish(EVENTS_CHANNEL, f"deleted {avatar_id}")
                removed, *_ = pipe.execute()
        except RedisError as error:
            raise self._failed(f"delete avatar {avatar_id}", error) from error
        return bool(removed)

    def health(self) -> dict[str, Any]:
        try:
            avatars = int(self.client.zcard(PREFIX + "index"))
        except RedisError as error:
            return {"kind": self.kind, "url": redact_url(self.url), "error": str(error)}
        return {"kind": self.kind, "url": redact_url(self.url), "avatars": avatars}

    # ------------------------------------------------------------ events

    def subscribe(self, handler: EventHandler) -> None:
        """Call `handler(kind, avatar_id)` (in a background thread) for every put and
        delete made by any replica, this one included."""

        def on_message(message: dict[str, Any]) -> None:
            kind, _, avatar_id = (_text(message.get("data")) or "").partition(" ")
            if kind and avatar_id:
                try:
                    handler(kind, avatar_id)
                except Exception:  # one bad event must not stop the listener
                    logger.exception("store event %s %s failed", kind, avatar_id)

        def on_error(error: BaseException, pubsub: Any, thread: Any) -> None:
            logger.warning("Redis events: %s; reconnecting", error)
            time.sleep(1.0)

        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{EVENTS_CHANNEL: on_message})
        self._listener = pubsub.run_in_thread(
            sleep_time=0.5, daemon=True, exception_handler=on_error
        )

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener.join(timeout=2.0)
            self._listener = None
        self.client.close()


class RedisKeyStore(KeyStore):
    """API keys in the Redis database of the store."""

    kind = "redis"

    def __init__(self, client: redis.Redis, url: str) -> None:
        self.client = client
        self.url = url

    @staticmethod
    def _name(key_id: str) -> str:
        return f"{PREFIX}key:{key_id}"

    def _failed(self, what: str, error: Exception) -> KeyStoreError:
        return KeyStoreError(f"Redis at {redact_url(self.url)}: cannot {what}: {error}")

    @staticmethod
    def _decode(key_id: str, raw: dict[Any, Any]) -> ApiKey:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        revoked = fields.get("revoked")
        return ApiKey(
            id=key_id,
            name=fields.get("name") or "",
            created=float(fields.get("created") or 0.0),
            token_sha256=fields.get("token_sha256") or "",
            revoked=float(revoked) if revoked else None,
        )

    def add(self, key: ApiKey) -> None:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(self._name(key.id), mapping={
                    "name": key.name,
                    "created": repr(key.created),
                    "token_sha256": key.token_sha256,
                    "revoked": "" if key.revoked is None else repr(key.revoked),
                })
                pipe.zadd(PREFIX + "keys", {key.id: key.created})
                pipe.execute()
        except RedisError as error:
            raise self._failed(f"store key {key.id}", error) from error

    def get(self, key_id: str) -> ApiKey | None:
        try:
            raw = self.client.hgetall(self._name(key_id))
        except RedisError as error:
            raise self._failed(f"read key {key_id}", error) from error
        return self._decode(key_id, raw) if raw else None

    def list(self) -> builtins.list[ApiKey]:
        try:
            ids = [_text(raw) or "" for raw in self.client.zrange(PREFIX + "keys", 0, -1)]
            with self.client.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(self._name(key_id))
                rows = pipe.execute()
        except RedisError as error:
            raise self._failed("list keys", error) from error
        return [self._decode(key_id, raw) for key_id, raw in zip(ids, rows, strict=True) if raw]

    def mark_revoked(self, key_id: str, when: float) -> None:
        try:
            self.client.hset(self._name(key_id), "revoked", repr(when))
        except RedisError as error:
            raise self._failed(f"revoke key {key_id}", error) from error


class RedisRateCounter(RateCounter):
    """Fixed windows counted in Redis, shared by every replica."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def hit(self, name: str, limit: int, window_s: float) -> float | None:
        now = time.time()
        window = int(now // window_s)
        counter = f"{PREFIX}rate:{name}:{window}"
        with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, int(window_s) + 1)
            count, _ = pipe.execute()
        if int(count) > limit:
            self.client.decr(counter)
            return max((window + 1) * window_s - now, 0.001)
        return None
