"""Graceful shutdown of a real `avatar serve` process with open streams and a registration
in flight: readiness turns false first while streams go on, every stream gets the frames
of the poses the server accepted, whole, then a close 1012 with a reason; the
registration finishes and its avatar is on disk."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.client import AvatarClient, decode_message
from server.protocol import pack_pose, parse_frame
from server.store.local import LocalStore

from .conftest import SAMPLE, spawn_server

STREAMS = 3


async def drive(url: str, pose: np.ndarray, started: threading.Event) -> dict[str, Any]:
    """One stream sending poses at about 40 per second until the server closes it; every
    frame is parsed and decoded as it arrives."""
    frames: list[tuple[float, int]] = []  # (arrival, seq)
    events: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    async with connect(url, compression=None, max_size=None) as socket:
        await socket.send(json.dumps({"type": "hello", "format": "jpeg"}))

        async def send() -> None:
            seq = 0
            try:
                while True:
                    nod = np.tile([0.0, 0.02 * np.sin(seq / 5)], 68).astype(np.float32)
                    await socket.send(pack_pose(seq, np.clip(pose + nod, -1, 1),
                                                normalised=True))
                    seq += 1
                    await asyncio.sleep(0.025)
            except ConnectionClosed:
                return

        sender = asyncio.create_task(send())
        try:
            while True:
                message = await socket.recv()
                if isinstance(message, str):
                    events.append(json.loads(message))
                    continue
                frame = decode_message(parse_frame(message))  # raises on a torn frame
                assert frame.image.shape == (128, 128, 3)
                frames.append((time.monotonic(), frame.seq))
                if len(frames) >= 5:
                    started.set()
        except ConnectionClosed as closed:
            result["code"] = closed.rcvd.code if closed.rcvd else None
            result["reason"] = closed.rcvd.reason if closed.rcvd else ""
        await sender
    result.update(frames=frames, events=events)
    return result


def test_graceful_shutdown_with_open_streams(tmp_path: Path) -> None:
    server = spawn_server(tmp_path, shutdown_delay_s=1.5, drain_timeout_s=5.0)
    terminated = False
    try:
        with AvatarClient(server.url) as client:
            avatar = client.register(SAMPLE)
        pose = np.asarray(avatar["source_pose"], np.float32)
        url = server.url.replace("http://", "ws://") + f"/avatars/{avatar['id']}/stream"

        # streams running, frames flowing
        started = [threading.Event() for _ in range(STREAMS)]
        results: list[Any] = []

        def run_streams() -> None:
            async def main() -> list[dict[str, Any]]:
                return await asyncio.gather(*(drive(url, pose, e) for e in started))

            results.extend(asyncio.run(main()))

        streams = threading.Thread(target=run_streams)
        streams.start()
        for event in started:
            assert event.wait(60), "a stream got no frames"

        # a registration in flight, then SIGTERM
        registration: dict[str, Any] = {}

        def register() -> None:
            response = httpx.post(f"{server.url}/avatars", timeout=60,
                                  files={"image": ("a.jpg", SAMPLE.read_bytes(), "image/jpeg")})
            registration.update(status=response.status_code, body=response.json())

        registering = threading.Thread(target=register)
        registering.start()
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        terminated = True

        # readiness goes false while the streams are still served
        not_ready_at = None
        deadline = time.monotonic() + 10
        while not_ready_at is None and time.monotonic() < deadline:
            answer = httpx.get(f"{server.url}/readyz", timeout=5)
            if answer.status_code == 503:
                assert answer.json()["draining"] is True
                not_ready_at = time.monotonic()
            time.sleep(0.02)
        assert not_ready_at is not None, "readiness never turned false"

        streams.join(60)
        registering.join(60)
        assert not streams.is_alive() and not registering.is_alive()
        code = server.process.wait(60)
    finally:
        if not terminated:
            server.terminate()
    log = server.output()

    assert len(results) == STREAMS
    for result in results:
        # told why, with the code a client reconnects on
        assert result["code"] == 1012, (result.get("code"), log)
        assert "shutting down" in result["reason"]
        errors = [e for e in result["events"] if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["shutting_down"]

        # frames kept coming after readiness turned false (the load balancer's window)
        assert any(arrival > not_ready_at for arrival, _ in result["frames"])

        # every pose the server accepted was answered or replaced by a newer one: the
        # last stats event (sent just before the close) accounts for all of them
        stats = [e for e in result["events"] if e["type"] == "stats"][-1]
        assert stats["sent"] == len(result["frames"])
        assert stats["received"] == stats["sent"] + stats["dropped"] + stats["no_face"]
        seqs = [seq for _, seq in result["frames"]]
        assert seqs == sorted(seqs)

    # the registration in flight finished, and its avatar was stored before exit
    assert registration["status"] == 201, registration
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    store = LocalStore(tmp_path / "data")
    assert {avatar["id"], registration["body"]["id"]} <= {m.id for m in store.list()}
    store.close()
