"""A small Python client of the avatar server, sync and async (httpx + websockets).

    client = AvatarClient("http://127.0.0.1:8000")
    avatar = client.register("photo.jpg")
    with client.stream(avatar["id"], format="jpeg") as stream:
        stream.send_pose(0, points, normalised=True)
        frame = stream.receive_frame()

Errors from the REST API raise `ClientError` with the server's stable `code`. A server with
API keys needs `api_key=`: it goes in the Authorization header of every request and of
the stream's handshake.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed

from server.encode import decode_frame
from server.protocol import (
    FrameMessage,
    pack_camera,
    pack_pose,
    parse_frame,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The server answered with an error (status, stable code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class StreamClosed(Exception):
    """The server closed the stream (code and reason as sent)."""

    def __init__(self, code: int | None, reason: str, error: dict[str, Any] | None) -> None:
        super().__init__(f"stream closed with {code}: {reason}")
        self.code = code
        self.reason = reason
        self.error = error  # the JSON error event sent before the close, if any


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    raise ClientError(response.status_code, code, message)


def _photo(photo: str | Path | bytes) -> tuple[str, bytes]:
    if isinstance(photo, bytes):
        return "photo", photo
    path = Path(photo)
    return path.name, path.read_bytes()


def _ws_url(base_url: str, avatar_id: str) -> str:
    url = base_url.rstrip("/")
    if url.startswith("https://"):
        url = "wss://" + url.removeprefix("https://")
    elif url.startswith("http://"):
        url = "ws://" + url.removeprefix("http://")
    return f"{url}/avatars/{avatar_id}/stream"


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _pose_list(poses: Iterable[np.ndarray], normalised: bool) -> list[dict[str, Any]]:
    return [
        {"points": np.asarray(p, dtype=float).reshape(68, 2).tolist(), "normalised": normalised}
        for p in poses
    ]


@dataclass(frozen=True)
class Frame:
    """A frame received from a stream, decoded."""

    message: FrameMessage
    image: np.ndarray  # [H, W, 3] uint8 RGB

    @property
    def seq(self) -> int:
        return self.message.seq


def decode_message(message: FrameMessage) -> Frame:
    """Decode a frame message's payload into an RGB image."""
    image = decode_frame(message.payload, message.format, message.width, message.height)
    return Frame(message=message, image=image)


class AvatarClient:
    """Blocking client."""

    def __init__(
        self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=_auth_headers(api_key)
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AvatarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, photo: str | Path | bytes, content_type: str = "image/jpeg") -> dict:
        """Register a photo (path or bytes); returns the avatar."""
        name, data = _photo(photo)
        files = {"image": (name, data, content_type)}
        return _check(self.http.post("/avatars", files=files)).json()

    def list_avatars(self) -> list[dict]:
        return _check(self.http.get("/avatars")).json()["avatars"]

    def get_avatar(self, avatar_id: str) -> dict:
        return _check(self.http.get(f"/avatars/{avatar_id}")).json()

    def delete_avatar(self, avatar_id: str) -> dict:
        return _check(self.http.delete(f"/avatars/{avatar_id}")).json()

    def preview(self, avatar_id: str, format: str = "jpeg") -> bytes:
        """The avatar rendered in its source pose, encoded."""
        response = self.http.get(f"/avatars/{avatar_id}/preview", params={"format": format})
        return _check(response).content

    def render(
        self,
        avatar_id: str,
        poses: Iterable[np.ndarray],
        *,
        normalised: bool = True,
        format: str = "jpeg",
        quality: int = 85,
        motion: str = "absolute",
    ) -> list[bytes]:
        """Render poses over REST; returns the encoded frames in order."""
        body = {"poses": _pose_list(poses, normalised), "format": format, "quality": quality,
                "motion": motion}
        answer = _check(self.http.post(f"/avatars/{avatar_id}/frames", json=body)).json()
        return [base64.b64decode(frame["data"]) for frame in answer["frames"]]

    def healthz(self) -> dict:
        return _check(self.http.get("/healthz")).json()

    def readyz(self) -> dict:
        return _check(self.http.get("/readyz")).json()

    def metrics(self) -> str:
        return _check(self.http.get("/metrics")).text

    def stream(
        self, avatar_id: str, socket_options: dict[str, Any] | None = None, **config: Any
    ) -> PoseStream:
        """Open a stream and send hello with `config` (format, quality, input, motion);
        `socket_options` go to websockets' connect (e.g. max_queue, sock)."""
        options = dict(socket_options or {})
        headers = {**_auth_headers(self.api_key), **options.pop("additional_headers", {})}
        return PoseStream(
            _ws_url(self.base_url, avatar_id), config, additional_headers=headers, **options
        )


class PoseStream:
    """A blocking stream (websockets' sync client)."""

    def __init__(self, url: str, config: dict[str, Any], **options: Any) -> None:
        from websockets.sync.client import connect

        # frames are compressed already: no permessage-deflate on top
        self.socket = connect(url, max_size=64 * 1024 * 1024, compression=None, **options)
        self.events: list[dict[str, Any]] = []
        self.ready: dict[str, Any] | None = None
        try:
            self.socket.send(json.dumps({"type": "hello", **config}))
        except ConnectionClosed:
            pass  # refused at once (unknown avatar): receive() reports how

    def send_pose(
        self, seq: int, points: np.ndarray, *, normalised: bool, width: int = 0, height: int = 0
    ) -> None:
        self.send_raw(pack_pose(seq, points, normalised=normalised, width=width,
                                height=height))

    def send_camera(self, seq: int, jpeg: bytes) -> None:
        self.send_raw(pack_camera(seq, jpeg))

    def send_raw(self, data: bytes | str) -> None:
        """Send one message; StreamClosed when the server has closed the stream."""
        try:
            self.socket.send(data)
        except ConnectionClosed as closed:
            raise self._closed(closed) from None

    def receive(self, timeout: float | None = 30.0) -> FrameMessage | dict[str, Any]:
        """The next frame message or JSON event; StreamClosed when the server closed."""
        try:
            data = self.socket.recv(timeout=timeout)
        except ConnectionClosed as closed:
            raise self._closed(closed) from None
        if isinstance(data, str):
            message = json.loads(data)
            self.events.append(message)
            if message.get("type") == "ready":
                self.ready = message
            return message
        return parse_frame(data)

    def receive_frame(self, timeout: float | None = 30.0) -> Frame:
        """The next frame (events in between are kept in `events`)."""
        while True:
            message = self.receive(timeout)
            if isinstance(message, FrameMessage):
                return decode_message(message)

    def _closed(self, closed: Exception) -> StreamClosed:
        rcvd = getattr(closed, "rcvd", None)
        error = next((e for e in reversed(self.events) if e.get("type") == "error"), None)
        return StreamClosed(
            rcvd.code if rcvd else None, rcvd.reason if rcvd else "", error
        )

    def close(self) -> None:
        try:
            self.socket.close()
        except ConnectionClosed:
            pass

    def __enter__(self) -> PoseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAvatarClient:
    """Asynchronous client (httpx.AsyncClient, websockets' asyncio client)."""

    def __init__(
        self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=_auth_headers(api_key)
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncAvatarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register(self, photo: str | Path | bytes, content_type: str = "image/jpeg") -> dict:
        name, data = _photo(photo)
        files = {"image": (name, data, content_type)}
        return _check(await self.http.post("/avatars", files=files)).json()

    async def list_avatars(self) -> list[dict]:
        return _check(await self.http.get("/avatars")).json()["avatars"]

    async def get_avatar(self, avatar_id: str) -> dict:
        return _check(await self.http.get(f"/avatars/{avatar_id}")).json()

    async def delete_avatar(self, avatar_id: str) -> dict:
        return _check(await self.http.delete(f"/avatars/{avatar_id}")).json()

    async def preview(self, avatar_id: str, format: str = "jpeg") -> bytes:
        response = await self.http.get(
            f"/avatars/{avatar_id}/preview", params={"format": format}
        )
        return _check(response).content

    async def render(
        self,
        avatar_id: str,
        poses: Iterable[np.ndarray],
        *,
        normalised: bool = True,
        format: str = "jpeg",
        quality: int = 85,
        motion: str = "absolute",
    ) -> list[bytes]:
        body = {"poses": _pose_list(poses, normalised), "format": format, "quality": quality,
                "motion": motion}
        response = await self.http.post(f"/avatars/{avatar_id}/frames", json=body)
        return [base64.b64decode(frame["data"]) for frame in _check(response).json()["frames"]]

    async def readyz(self) -> dict:
        return _check(await self.http.get("/readyz")).json()

    async def stream(self, avatar_id: str, **config: Any) -> AsyncPoseStream:
        """Open a stream and send hello with `config`."""
        stream = AsyncPoseStream(_ws_url(self.base_url, avatar_id), self.api_key)
        await stream.open(config)
        return stream

    async def metrics(self) -> str:
        return _check(await self.http.get("/metrics")).text


class AsyncPoseStream:
    """An asynchronous stream (websockets' asyncio client)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url
        self.api_key = api_key
        self.socket: Any = None
        self.events: list[dict[str, Any]] = []

    async def open(self, config: dict[str, Any]) -> None:
        from websockets.asyncio.client import connect

        self.socket = await connect(
            self.url, max_size=64 * 1024 * 1024, compression=None,
            additional_headers=_auth_headers(self.api_key),
        )
        try:
            await self.socket.send(json.dumps({"type": "hello", **config}))
        except ConnectionClosed:
            pass  # refused at once (unknown avatar): receive() reports how

    async def send_pose(
        self, seq: int, points: np.ndarray, *, normalised: bool, width: int = 0, height: int = 0
    ) -> None:
        await self.send_raw(
            pack_pose(seq, points, normalised=normalised, width=width, height=height)
        )

    async def send_camera(self, seq: int, jpeg: bytes) -> None:
        await self.send_raw(pack_camera(seq, jpeg))

    async def send_raw(self, data: bytes | str) -> None:
        """Send one message; StreamClosed when the server has closed the stream."""
        try:
            await self.socket.send(data)
        except ConnectionClosed as closed:
            raise self._closed(closed) from None

    def _closed(self, closed: ConnectionClosed) -> StreamClosed:
        rcvd = closed.rcvd
        error = next((e for e in reversed(self.events) if e.get("type") == "error"), None)
        return StreamClosed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "", error)

    async def receive(self) -> FrameMessage | dict[str, Any]:
        """The next frame message or JSON event; StreamClosed when the server closed."""
        try:
            data = await self.socket.recv()
        except ConnectionClosed as closed:
            raise self._closed(closed) from None
        if isinstance(data, str):
            message = json.loads(data)
            self.events.append(message)
            return message
        return parse_frame(data)

    async def close(self) -> None:
        try:
            await self.socket.close()
        except ConnectionClosed:
            pass

    async def __aenter__(self) -> AsyncPoseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
