"""A server with API keys and tight limits, against real HTTP and WebSocket clients: each
isolation rule and each limit answers with its documented code; everyone else goes on."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.client import AsyncAvatarClient, AvatarClient, ClientError, StreamClosed
from server.keys import SqliteKeyStore
from server.protocol import pack_pose

from .conftest import SAMPLE, RunningServer, make_settings, start_server


@dataclass
class KeyedServer:
    server: RunningServer
    keys: dict[str, str]  # name -> token
    store: SqliteKeyStore

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws(self) -> str:
        return self.server.url.replace("http://", "ws://")

    def client(self, name: str | None) -> AvatarClient:
        return AvatarClient(self.url, api_key=self.keys[name] if name else None)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    data = tmp_path_factory.mktemp("keyed")
    store = SqliteKeyStore(data)
    keys = {name: store.create(name)[1] for name in ("alice", "bob", "carol", "dave", "erin")}
    settings = make_settings(
        data,
        api_keys=True,
        max_batch=1,
        max_avatars_per_key=2,
        registrations_per_hour=3,
        max_streams=2,
        max_streams_per_key=1,
        ws_max_messages_per_s=20.0,
        ws_burst_messages=20,
        ws_idle_timeout_s=1.5,
        trusted_hosts=["127.0.0.1", "avatars.example"],
        cors_origins=["https://app.example"],
    )
    server = start_server(settings)
    yield KeyedServer(server, keys, store)
    server.stop()
    store.close()


@pytest.fixture(scope="module")
def alices_avatar(keyed: KeyedServer) -> dict:
    with keyed.client("alice") as alice:
        return alice.register(SAMPLE)


def pose_of(avatar: dict) -> np.ndarray:
    return np.asarray(avatar["source_pose"], np.float32)


def refusal(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
    """Open a stream, send hello, read until closed: (close code, reason, error event)."""
    events = []
    with connect(url, additional_headers=headers, compression=None) as ws:
        try:
            ws.send(json.dumps({"type": "hello"}))
        except ConnectionClosed:
            pass  # refused before the hello went out: what came first is still readable
        try:
            while True:
                events.append(json.loads(ws.recv(timeout=20)))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            errors = [e for e in events if e.get("type") == "error"]
            return closed.rcvd.code, closed.rcvd.reason, errors[-1] if errors else {}
    raise AssertionError("not closed")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_until_no_streams(keyed: KeyedServer) -> None:
    """A stream the client closed leaves the server a moment later; the per-key limit of
    one stream counts it until then."""
    deadline = time.monotonic() + 10
    while httpx.get(f"{keyed.url}/readyz").json()["streams"] and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------- keys


def test_readyz_says_keys_are_needed_and_health_needs_none(keyed: KeyedServer) -> None:
    ready = httpx.get(f"{keyed.url}/readyz").json()
    assert ready["ready"] is True and ready["api_keys"] is True
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    assert "avatar_errors_total" in httpx.get(f"{keyed.url}/metrics").text


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "got none"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "got the scheme 'Basic'"),
        ({"Authorization": "Bearer avk_000000000000_" + "x" * 43}, "unknown or revoked"),
        ({"Authorization": "Bearer nonsense"}, "unknown or revoked"),
    ],
    ids=["none", "basic", "unknown", "malformed"],
)
def test_rest_without_a_valid_key_is_401(keyed: KeyedServer, headers, words: str) -> None:
    for method, path in (("GET", "/avatars"), ("POST", "/avatars"), ("GET", "/avatars/x"),
                         ("DELETE", "/avatars/x"), ("GET", "/avatars/x/preview")):
        response = httpx.request(method, f"{keyed.url}{path}", headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["code"] == "unauthorized"
        assert words in response.json()["message"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_stream_without_a_valid_key_closes_1008(keyed: KeyedServer, alices_avatar) -> None:
    url = f"{keyed.ws}/avatars/{alices_avatar['id']}/stream"
    for headers, query in ((None, ""), (bearer("avk_nope"), ""), (None, "?token=wrong")):
        code, reason, error = refusal(url + query, headers)
        assert code == 1008 and error["code"] == "unauthorized", (headers, query)
        assert "API key" in reason


def test_a_key_works_as_header_or_query_token(keyed: KeyedServer, alices_avatar) -> None:
    url = f"{keyed.ws}/avatars/{alices_avatar['id']}/stream"
    for headers, query in ((bearer(keyed.keys["alice"]), ""),
                           (None, f"?token={keyed.keys['alice']}")):
        wait_until_no_streams(keyed)
        with connect(url + query, additional_headers=headers, compression=None) as ws:
            ws.send(json.dumps({"type": "hello", "format": "raw"}))
            assert json.loads(ws.recv(timeout=20))["type"] == "ready"
            ws.send(pack_pose(7, pose_of(alices_avatar), normalised=True))
            frame = ws.recv(timeout=20)
            assert isinstance(frame, bytes) and frame[:4] == b"AVFR"


def test_revoking_a_key_locks_it_out_at_once(keyed: KeyedServer) -> None:
    key, token = keyed.store.create("short-lived")
    with AvatarClient(keyed.url, api_key=token) as client:
        assert client.list_avatars() == []
        keyed.store.revoke(key.id)  # as `avatar keys revoke` does, from another connection
        with pytest.raises(ClientError) as caught:
            client.list_avatars()
    assert caught.value.status == 401 and caught.value.code == "unauthorized"


# ---------------------------------------------------------------- isolation


def test_another_keys_avatar_is_404_everywhere(keyed: KeyedServer, alices_avatar) -> None:
    avatar_id = alices_avatar["id"]
    with keyed.client("alice") as alice, keyed.client("bob") as bob:
        assert avatar_id in [a["id"] for a in alice.list_avatars()]
        assert bob.list_avatars() == []

        calls = [
            lambda: bob.get_avatar(avatar_id),
            lambda: bob.preview(avatar_id),
            lambda: bob.render(avatar_id, [pose_of(alices_avatar)]),
            lambda: bob.delete_avatar(avatar_id),
        ]
        for call in calls:
            with pytest.raises(ClientError) as caught:
                call()
            assert caught.value.status == 404 and caught.value.code == "avatar_not_found"
            # exactly what an id that does not exist gets: nothing tells them apart
            assert avatar_id in caught.value.message

        # over the stream too, with either way of giving the key
        url = f"{keyed.ws}/avatars/{avatar_id}/stream"
        for headers, query in ((bearer(keyed.keys["bob"]), ""),
                               (None, f"?token={keyed.keys['bob']}")):
            code, reason, error = refusal(url + query, headers)
            assert code == 4404 and error["code"] == "unknown_avatar"

        # still all there for its owner
        assert alice.get_avatar(avatar_id)["id"] == avatar_id
        assert alice.preview(avatar_id)[:3] == b"\xff\xd8\xff"


# ---------------------------------------------------------------- limits


def test_avatars_per_key(keyed: KeyedServer, alices_avatar) -> None:
    with keyed.client("alice") as alice:
        second = alice.register(SAMPLE)
        with pytest.raises(ClientError) as caught:
            alice.register(SAMPLE)
        assert caught.value.status == 403 and caught.value.code == "avatar_quota_exceeded"
        assert "at most 2 avatars" in caught.value.message

        # deleting one makes room again
        alice.delete_avatar(second["id"])
        third = alice.register(SAMPLE)
        alice.delete_avatar(third["id"])


def test_registrations_per_hour(keyed: KeyedServer) -> None:
    headers = bearer(keyed.keys["carol"])
    files = {"image": ("notes.txt", b"not a photo at all", "text/plain")}
    for _ in range(3):  # attempts count, failed ones too
        response = httpx.post(f"{keyed.url}/avatars", headers=headers, files=files)
        assert response.json()["code"] == "not_an_image"
    response = httpx.post(f"{keyed.url}/avatars", headers=headers, files=files)
    assert response.status_code == 429
    assert response.json()["code"] == "registration_rate_exceeded"
    assert 3000 < int(response.headers["retry-after"]) <= 3600

    # another key is not affected
    other = httpx.post(f"{keyed.url}/avatars", headers=bearer(keyed.keys["dave"]), files=files)
    assert other.json()["code"] == "not_an_image"


def test_streams_per_key_and_in_all(keyed: KeyedServer, alices_avatar) -> None:
    with keyed.client("bob") as bob, keyed.client("dave") as dave:
        bobs = bob.register(SAMPLE)
        daves = dave.register(SAMPLE)
    wait_until_no_streams(keyed)
    try:
        with keyed.client("alice") as alice, keyed.client("bob") as bob:
            with alice.stream(alices_avatar["id"]) as first:
                first.send_pose(0, pose_of(alices_avatar), normalised=True)
                assert first.receive_frame().seq == 0

                # the same key again: its one stream is taken
                code, reason, error = refusal(
                    f"{keyed.ws}/avatars/{alices_avatar['id']}/stream",
                    bearer(keyed.keys["alice"]),
                )
                assert code == 4429 and error["code"] == "stream_quota_exceeded"
                assert "at most 1 open streams per API key" in reason

                with bob.stream(bobs["id"]) as second:
                    second.send_pose(0, pose_of(bobs), normalised=True)
                    assert second.receive_frame().seq == 0

                    # a third key: the server's two places are taken
                    code, reason, error = refusal(
                        f"{keyed.ws}/avatars/{daves['id']}/stream", bearer(keyed.keys["dave"])
                    )
                    assert code == 1013 and error["code"] == "too_many_streams"

                    # the open streams go on
                    first.send_pose(1, pose_of(alices_avatar), normalised=True)
                    assert first.receive_frame().seq == 1

        # closed streams give their places back
        wait_until_no_streams(keyed)
        with keyed.client("dave") as dave, dave.stream(daves["id"]) as stream:
            stream.send_pose(0, pose_of(daves), normalised=True)
            assert stream.receive_frame().seq == 0
    finally:
        with keyed.client("bob") as bob, keyed.client("dave") as dave:
            bob.delete_avatar(bobs["id"])
            dave.delete_avatar(daves["id"])


def test_message_rate(keyed: KeyedServer, alices_avatar) -> None:
    url = f"{keyed.ws}/avatars/{alices_avatar['id']}/stream"
    pose = pack_pose(0, pose_of(alices_avatar), normalised=True)
    wait_until_no_streams(keyed)
    with connect(url, additional_headers=bearer(keyed.keys["alice"]),
                 compression=None) as ws:
        ws.send(json.dumps({"type": "hello"}))
        events = []
        with pytest.raises(ConnectionClosed) as caught:
            for _ in range(60):  # far above 20 per second with bursts of 20
                ws.send(pose)
            while True:
                message = ws.recv(timeout=20)
                if isinstance(message, str):
                    events.append(json.loads(message))
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 4429
    assert "at most 20 messages per second" in caught.value.rcvd.reason
    assert [e["code"] for e in events if e["type"] == "error"] == ["rate_limited"]


def test_idle_timeout(keyed: KeyedServer, alices_avatar) -> None:
    url = f"{keyed.ws}/avatars/{alices_avatar['id']}/stream"
    wait_until_no_streams(keyed)
    started = time.monotonic()
    code, reason, error = refusal(url, bearer(keyed.keys["alice"]))
    assert code == 4408 and error["code"] == "idle_timeout"
    assert "every 1.5 s" in reason
    assert 1.4 < time.monotonic() - started < 10


def test_request_body_size(keyed: KeyedServer) -> None:
    headers = bearer(keyed.keys["erin"])
    limit = keyed.server.settings.max_upload_bytes + 64 * 1024
    big = b"\xff\xd8\xff" + b"\0" * (limit + 100)

    # announced by Content-Length: refused before the body is read
    response = httpx.post(f"{keyed.url}/avatars", headers=headers,
                          files={"image": ("big.jpg", big, "image/jpeg")})
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"

    # streamed without a length: refused once the bytes pass the limit
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    response = httpx.post(
        f"{keyed.url}/avatars/x/frames",
        headers={**headers, "Content-Type": "application/json"}, content=chunks(),
    )
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds one row: a decompression bomb's
    header, without the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" + b"\0" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(
        b"IEND", b""
    )


def test_image_pixels(keyed: KeyedServer) -> None:
    bomb = png_header_only(50_000, 50_000)
    assert len(bomb) < 1000
    response = httpx.post(f"{keyed.url}/avatars", headers=bearer(keyed.keys["erin"]),
                          files={"image": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413 and response.json()["code"] == "image_too_large"
    assert "2500000000" in response.json()["message"]


def test_trusted_hosts(keyed: KeyedServer, alices_avatar) -> None:
    headers = bearer(keyed.keys["alice"])
    response = httpx.get(f"{keyed.url}/avatars", headers={**headers, "Host": "evil.example"})
    assert response.status_code == 400 and response.json()["code"] == "untrusted_host"
    ok = httpx.get(f"{keyed.url}/avatars", headers={**headers, "Host": "avatars.example:8443"})
    assert ok.status_code == 200

    # a stream whose Host is another name (the socket still goes to the test server)
    port = int(keyed.url.rsplit(":", 1)[1])
    url = f"ws://evil.example:{port}/avatars/{alices_avatar['id']}/stream"
    with pytest.raises(InvalidStatus) as caught:
        connect(url, sock=socket.create_connection(("127.0.0.1", port)),
                additional_headers=headers)
    assert caught.value.response.status_code == 403


def test_cors_and_stream_origins(keyed: KeyedServer, alices_avatar) -> None:
    preflight = httpx.options(f"{keyed.url}/avatars", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    })
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{keyed.url}/avatars", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    })
    assert "access-control-allow-origin" not in other.headers

    url = f"{keyed.ws}/avatars/{alices_avatar['id']}/stream?token={keyed.keys['alice']}"
    code, reason, error = refusal(url, {"Origin": "https://evil.example"})
    assert code == 1008 and error["code"] == "origin_not_allowed"
    for origin in ("https://app.example", keyed.url):  # a listed site, the server's own page
        wait_until_no_streams(keyed)
        with connect(url, origin=origin, compression=None) as ws:  # type: ignore[arg-type]
            ws.send(json.dumps({"type": "hello"}))
            assert json.loads(ws.recv(timeout=20))["type"] == "ready"


def test_stream_origins_behind_a_front() -> None:
    from server.security import origin_allowed

    # nginx passes `Host: example.org` while the page's Origin names the public port
    assert origin_allowed("http://example.org:8080", "example.org", [])
    assert origin_allowed("https://[::1]:8443", "[::1]:8000", [])
    assert origin_allowed(None, "example.org", [])  # not a browser
    assert not origin_allowed("https://evil.example", "example.org", [])
    assert origin_allowed("https://evil.example", "example.org", ["*"])
    assert origin_allowed("https://app.example/", "example.org", ["https://app.example"])


def test_everyone_else_is_served_meanwhile(keyed: KeyedServer, alices_avatar) -> None:
    wait_until_no_streams(keyed)

    async def main() -> int:
        async with AsyncAvatarClient(keyed.url, api_key=keyed.keys["alice"]) as client:
            stream = await client.stream(alices_avatar["id"], format="raw")
            frames = 0
            for seq in range(5):
                await stream.send_pose(seq, pose_of(alices_avatar), normalised=True)
                while True:
                    try:
                        message = await stream.receive()
                    except StreamClosed:
                        return frames
                    if not isinstance(message, dict):
                        frames += 1
                        break
            await stream.close()
            return frames

    assert asyncio.run(main()) == 5


def test_local_mode_refuses_the_network_unless_told(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="AVATAR_API_KEYS=true"):
        Settings(data_dir=tmp_path, host="0.0.0.0")
    assert Settings(data_dir=tmp_path, host="0.0.0.0", api_keys=True).api_keys
    assert Settings(data_dir=tmp_path, host="0.0.0.0", allow_unauthenticated_network=True)
    assert Settings(data_dir=tmp_path, host="::1").host == "::1"
    assert Settings(data_dir=tmp_path, host="localhost").host == "localhost"
