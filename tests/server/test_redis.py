"""The Redis store against a real redis-server: the store interface, keys and counters,
and two `avatar serve` processes sharing one database (register on one, stream from the
other, delete on the other and see the first refuse)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from server.cli import _register_commands
from server.cli import app as cli_app
from server.client import AvatarClient, ClientError
from server.store.base import Avatar, AvatarMeta, CachedStore
from server.store.redis import RedisKeyStore, RedisRateCounter, RedisStore

from .conftest import SAMPLE, launch_server
from .test_stream import closed_with, source_pose

pytestmark = pytest.mark.redis

_register_commands()


def make_avatar(avatar_id: str, owner: str | None, created: float, value: float) -> Avatar:
    meta = AvatarMeta(
        id=avatar_id, created=created, image_size=8, preset="tiny", weights_sha256="w" * 64,
        source_pose=tuple(np.linspace(-0.5, 0.5, 136).tolist()), crop=(4.0, 4.0, 8.0),
        photo_size=(16, 16), num_faces=1, timings_ms={"total": 1.0}, owner=owner,
    )
    return Avatar(
        meta=meta,
        texture=np.full((3, 8, 8), value, np.float32),
        params=np.arange(10, dtype=np.float32) * value,
    )


@pytest.fixture
def fresh_redis(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


def test_store_interface(fresh_redis: str) -> None:
    store = RedisStore(fresh_redis)
    first = make_avatar("first", "k1", 1.0, 0.25)
    second = make_avatar("second", "k2", 2.0, 0.5)
    store.put(second)
    store.put(first)

    got = store.get("first")
    assert got is not None and got.meta == first.meta
    np.testing.assert_array_equal(got.texture, first.texture)
    np.testing.assert_array_equal(got.params, first.params)
    assert store.get_meta("second") == second.meta
    assert [m.id for m in store.list()] == ["first", "second"]  # oldest first
    assert [m.id for m in store.list("k2")] == ["second"]
    assert (store.count(), store.count("k1"), store.count("nobody")) == (2, 1, 0)
    assert store.health()["avatars"] == 2 and store.health()["kind"] == "redis"

    # a replacement changes the version
    version = store.version("first")
    store.put(make_avatar("first", "k1", 1.0, 0.75))
    assert store.version("first") not in (None, version)

    # damaged bytes are reported and treated as gone, never served
    client = redis.Redis.from_url(fresh_redis)
    client.hset("avatar:a:second", "blob", b"garbage")
    assert store.get("second") is None

    assert store.delete("first") and not store.delete("first")
    assert store.get("first") is None and store.get_meta("first") is None
    assert store.count("k1") == 0 and [m.id for m in store.list()] == ["second"]
    assert store.get("../etc") is None and not store.delete("no such/id")
    store.close()


def test_cache_of_one_replica_sees_another_replicas_delete(fresh_redis: str) -> None:
    one = CachedStore(RedisStore(fresh_redis), capacity=4)
    two = CachedStore(RedisStore(fresh_redis), capacity=4)
    events: list[tuple[str, str]] = []
    one.inner.subscribe(lambda kind, avatar_id: events.append((kind, avatar_id)))  # type: ignore[attr-defined]
    time.sleep(0.3)  # the subscription is live

    two.put(make_avatar("shared", None, 1.0, 0.5))
    assert one.get("shared") is not None and one.get("shared") is not None
    assert one.hits == 1  # the second read came from the cache

    two.delete("shared")
    assert one.get("shared") is None  # the cached copy is checked, not trusted
    deadline = time.monotonic() + 5
    while ("deleted", "shared") not in events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ("put", "shared") in events and ("deleted", "shared") in events
    one.close()
    two.close()


def test_keys_and_rate_counters_are_shared(fresh_redis: str) -> None:
    client = redis.Redis.from_url(fresh_redis)
    keys_one, keys_two = RedisKeyStore(client, fresh_redis), RedisKeyStore(
        redis.Redis.from_url(fresh_redis), fresh_redis
    )
    key, token = keys_one.create("shared key")
    assert keys_two.verify(token) == key
    assert [k.id for k in keys_two.list()] == [key.id]
    keys_two.revoke(key.id)
    assert keys_one.verify(token) is None and keys_one.count_active() == 0
    assert token.encode() not in b"".join(
        v for k in client.keys("avatar:key:*") for v in client.hgetall(k).values()
    )

    one, two = RedisRateCounter(client), RedisRateCounter(redis.Redis.from_url(fresh_redis))
    assert one.hit("register:k", 3, 3600.0) is None
    assert two.hit("register:k", 3, 3600.0) is None
    assert one.hit("register:k", 3, 3600.0) is None
    wait = two.hit("register:k", 3, 3600.0)
    assert wait is not None and 0 < wait <= 3600.0


def test_two_server_processes_share_one_redis(fresh_redis: str, tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(cli_app, ["keys", "create", "--name", "alice", "--json",
                                   "--store-url", fresh_redis])
    assert made.exit_code == 0, made.output
    alice_key = json.loads(made.stdout)
    bob_key = json.loads(runner.invoke(
        cli_app, ["keys", "create", "--name", "bob", "--json", "--store-url", fresh_redis]
    ).stdout)

    settings = {"store_url": fresh_redis, "api_keys": "true", "drain_timeout_s": 2}
    first = launch_server(tmp_path / "one", **settings)
    second = launch_server(tmp_path / "two", **settings)
    try:
        first.wait_ready()
        second.wait_ready()
        for server in (first, second):
            ready = httpx.get(f"{server.url}/readyz").json()
            assert ready["store"]["kind"] == "redis" and ready["api_keys"] is True

        with AvatarClient(first.url, api_key=alice_key["key"]) as one, \
                AvatarClient(second.url, api_key=alice_key["key"]) as two, \
                AvatarClient(second.url, api_key=bob_key["key"]) as bob_two:
            # registered through the first, visible and streamable through the second
            avatar = one.register(SAMPLE)
            assert two.get_avatar(avatar["id"])["id"] == avatar["id"]
            assert [a["id"] for a in two.list_avatars()] == [avatar["id"]]
            pose = source_pose(avatar)
            with two.stream(avatar["id"], format="raw") as stream:
                for seq in range(5):
                    stream.send_pose(seq, pose, normalised=True)
                    frame = stream.receive_frame()
                    assert frame.seq == seq and frame.image.shape == (128, 128, 3)

            # the owner's key decides on every replica
            assert bob_two.list_avatars() == []
            with pytest.raises(ClientError) as caught:
                bob_two.get_avatar(avatar["id"])
            assert caught.value.code == "avatar_not_found"

            # the first replica holds it hot (a preview and an open stream), then the
            # second deletes it: the first closes its stream and refuses it from then on
            preview = one.preview(avatar["id"])
            with one.stream(avatar["id"]) as held:
                held.send_pose(0, pose, normalised=True)
                assert held.receive_frame().seq == 0
                assert two.delete_avatar(avatar["id"])["id"] == avatar["id"]
                closed = closed_with(held)
            assert closed.code == 4404 and "was deleted" in closed.reason
            assert preview[:3] == b"\xff\xd8\xff"
            for call in (lambda: one.get_avatar(avatar["id"]),
                         lambda: one.preview(avatar["id"])):
                with pytest.raises(ClientError) as caught:
                    call()
                assert caught.value.code == "avatar_not_found"
            with one.stream(avatar["id"]) as refused:
                assert closed_with(refused).code == 4404

            # revoking the key through the command locks it out of both replicas
            revoked = runner.invoke(
                cli_app, ["keys", "revoke", alice_key["id"], "--store-url", fresh_redis]
            )
            assert revoked.exit_code == 0, revoked.output
            for client in (one, two):
                with pytest.raises(ClientError) as caught:
                    client.list_avatars()
                assert caught.value.status == 401
    finally:
        codes = [server.terminate() for server in (first, second)]
    # uvicorn finishes its shutdown, then lets SIGTERM end the process as usual (-15)
    assert set(codes) <= {0, -signal.SIGTERM}, first.output() + second.output()
    for server in (first, second):
        assert "Application shutdown complete" in server.output()


def test_serve_fails_clearly_when_redis_is_unreachable(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, [
        "serve", "--store-url", "redis://127.0.0.1:1/0", "--data-dir", str(tmp_path),
    ])
    assert result.exit_code == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.output
    assert "Traceback" not in result.output
