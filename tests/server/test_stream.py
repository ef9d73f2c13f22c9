"""The WebSocket stream against a real uvicorn, the real ONNX bundle and real mediapipe:
frames in order, motion modes, camera input, every protocol error, backpressure, delete,
restart."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest
import simplejpeg

from server.client import AsyncAvatarClient, AvatarClient, StreamClosed, decode_message
from server.encode import decode_frame
from server.protocol import POSE_MESSAGE_SIZE, FrameMessage, pack_camera, pack_pose

from .conftest import SAMPLE, RunningServer, make_settings, start_server


def source_pose(avatar: dict) -> np.ndarray:
    return np.asarray(avatar["source_pose"], np.float32)  # [136]


def source_pixels(avatar: dict) -> np.ndarray:
    """The photo's landmarks in photo pixels, from the pose and the crop box."""
    crop = avatar["crop"]
    unit = (source_pose(avatar).reshape(68, 2) + 1) / 2
    origin = np.array([crop["cx"] - crop["side"] / 2, crop["cy"] - crop["side"] / 2])
    return (unit * crop["side"] + origin).astype(np.float32)  # [68, 2]


def nod(pose: np.ndarray, index: int) -> np.ndarray:
    """The source pose moved a little: a smooth nod."""
    shift = np.tile([0.0, 0.03 * np.sin(index / 4)], 68).astype(np.float32)
    return np.clip(pose + shift, -1, 1)


def assert_stream_works(client: AvatarClient, avatar: dict, frames: int = 3) -> None:
    with client.stream(avatar["id"]) as stream:
        for seq in range(frames):
            stream.send_pose(seq, nod(source_pose(avatar), seq), normalised=True)
            assert stream.receive_frame().seq == seq


def closed_with(stream, timeout: float = 30.0) -> StreamClosed:
    """Read until the server closes; return how it closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stream.receive(timeout=deadline - time.monotonic())
        except StreamClosed as closed:
            return closed
    raise AssertionError("the server did not close the stream")


def test_hundred_poses_hundred_frames_in_order(client: AvatarClient, astronaut: dict) -> None:
    pose = source_pose(astronaut)
    received: list[int] = []
    with client.stream(astronaut["id"], format="jpeg", quality=80) as stream:
        # two in flight, as a live client would have: no drops, frames pipelined
        stream.send_pose(0, nod(pose, 0), normalised=True)
        for seq in range(1, 101):
            if seq < 100:
                stream.send_pose(seq, nod(pose, seq), normalised=True)
            frame = stream.receive_frame()
            assert frame.image.shape == (128, 128, 3)
            assert frame.message.format == "jpeg"
            assert frame.message.timings.render_ms > 0
            assert frame.message.timings.total_ms >= frame.message.timings.render_ms
            received.append(frame.seq)

    assert received == list(range(100))
    ready = stream.ready
    assert ready is not None and ready["width"] == ready["height"] == 128
    assert ready["format"] == "jpeg" and ready["quality"] == 80


@pytest.mark.parametrize("fmt", ["webp", "raw"])
def test_other_formats(client: AvatarClient, astronaut: dict, fmt: str) -> None:
    with client.stream(astronaut["id"], format=fmt) as stream:
        for seq in range(5):
            stream.send_pose(seq, nod(source_pose(astronaut), seq), normalised=True)
            frame = stream.receive_frame()
            assert frame.message.format == fmt and frame.image.shape == (128, 128, 3)
    if fmt == "raw":
        assert len(frame.message.payload) == 128 * 128 * 3


def test_pixel_coordinates_and_relative_motion(client: AvatarClient, astronaut: dict) -> None:
    reference = decode_frame(
        client.render(astronaut["id"], [source_pose(astronaut)], format="raw")[0],
        "raw", 128, 128,
    )
    pixels = source_pixels(astronaut)

    def frames(motion: str, points_list: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        with client.stream(astronaut["id"], format="raw", motion=motion) as stream:
            for seq, points in enumerate(points_list):
                stream.send_pose(seq, points, normalised=False, width=512, height=512)
                out.append(stream.receive_frame().image)
        return out

    def difference(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - b.astype(int)).mean())

    # absolute, pixels: normalised in the points' own crop, which is the photo's crop
    (absolute,) = frames("absolute", [pixels])
    assert difference(absolute, reference) < 0.5

    # relative: a driver with another face (wider, elsewhere, bigger) starts at the
    # avatar's own pose, and its motion moves the avatar
    driver = (pixels - pixels.mean(axis=0)) * [1.6, 1.2] + [260, 300]
    first, moved = frames("relative", [driver, driver + [0.0, 25.0]])
    assert difference(first, reference) < 0.5
    assert difference(moved, reference) > 1.0


def test_camera_frames_mode(client: AvatarClient, astronaut: dict) -> None:
    photo = simplejpeg.decode_jpeg(SAMPLE.read_bytes())
    blank = simplejpeg.encode_jpeg(np.full((240, 320, 3), 90, np.uint8), colorspace="RGB")
    with client.stream(astronaut["id"], input="frames", motion="relative") as stream:
        for seq in range(3):
            shifted = np.roll(photo, 4 * seq, axis=1)
            stream.send_camera(seq, simplejpeg.encode_jpeg(shifted, colorspace="RGB"))
            frame = stream.receive_frame(timeout=60)
            assert frame.seq == seq and frame.image.shape == (128, 128, 3)
            assert frame.message.timings.landmarks_ms > 0

        # a frame without a face: a warning, and the stream goes on
        stream.send_camera(3, blank)
        stream.send_camera(4, SAMPLE.read_bytes())
        frame = stream.receive_frame(timeout=60)
        assert frame.seq == 4
        warnings = [e for e in stream.events if e["type"] == "warning"]
        assert warnings and warnings[0]["code"] == "no_face" and warnings[0]["seq"] == 3


BAD_INPUTS = [
    # (name, hello or None, message, close code, error code, words in the reason)
    ("bad-json", None, "{hello", 1007, "bad_json", "expected a JSON object"),
    ("binary-first", None, b"\0" * 560, 1003, "unexpected_message", "JSON hello first"),
    ("bad-config", None, '{"type": "hello", "format": "png"}', 4400, "bad_config", "'png'"),
    ("short-pose", {}, pack_pose(1, np.zeros(136), normalised=True)[:300], 1007,
     "bad_message_size", f"expected {POSE_MESSAGE_SIZE} bytes, got 300"),
    ("nan-pose", {}, pack_pose(1, np.full(136, np.nan), normalised=True), 1007, "non_finite",
     "expected finite coordinates, got nan"),
    ("inf-pose", {}, pack_pose(1, np.full(136, np.inf), normalised=True), 1007, "non_finite",
     "got inf"),
    ("out-of-range", {}, pack_pose(1, np.full(136, 3.0), normalised=True), 1007,
     "out_of_range", "in [-1, 1]"),
    ("camera-in-pose-mode", {}, pack_camera(1, b"\xff\xd8\xff\xe0"), 1003,
     "unexpected_message", "camera message"),
    ("broken-jpeg", {"input": "frames"}, pack_camera(1, b"\xff\xd8\xff" + b"\x13" * 900),
     1007, "bad_image", "camera seq 1"),
    ("too-big", {"input": "frames"}, pack_camera(1, b"\xff\xd8\xff" + b"\0" * 600_000), 1009,
     None, ""),
]


@pytest.mark.parametrize(
    ("hello", "message", "close_code", "code", "words"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_protocol_errors_close_with_their_code(
    client: AvatarClient, astronaut: dict, hello, message, close_code, code, words
) -> None:
    from websockets.sync.client import connect

    url = client.base_url.replace("http://", "ws://") + f"/avatars/{astronaut['id']}/stream"
    with connect(url, compression=None) as socket_:
        if hello is not None:
            socket_.send(json.dumps({"type": "hello", **hello}))
            assert json.loads(socket_.recv(timeout=10))["type"] == "ready"
        socket_.send(message)
        events = []
        with pytest.raises(Exception) as caught:
            while True:
                events.append(json.loads(socket_.recv(timeout=30)))
    closed = caught.value
    assert closed.rcvd is not None, closed
    assert closed.rcvd.code == close_code
    assert words in closed.rcvd.reason
    if code is not None:
        error = [e for e in events if e["type"] == "error"]
        assert error and error[-1]["code"] == code and words in error[-1]["message"]

    # the server goes on serving everyone else
    assert_stream_works(client, astronaut)


def test_unknown_avatar(client: AvatarClient) -> None:
    with client.stream("nobody") as stream:
        closed = closed_with(stream)
    assert closed.code == 4404
    assert "expected a registered avatar id, got 'nobody'" in closed.reason
    assert closed.error is not None and closed.error["code"] == "unknown_avatar"


def test_concurrent_async_streams_each_get_their_frames(
    live_server: RunningServer, astronaut: dict
) -> None:
    async def one_stream(client: AsyncAvatarClient, offset: float) -> list[tuple[int, float]]:
        pose = source_pose(astronaut)
        got = []
        async with await client.stream(astronaut["id"], format="raw") as stream:
            for seq in range(12):
                moved = np.clip(pose + np.float32(offset), -1, 1)
                await stream.send_pose(seq, moved, normalised=True)
                while not isinstance(message := await stream.receive(), FrameMessage):
                    pass
                got.append((message.seq, float(decode_message(message).image.mean())))
        return got

    async def main():
        async with AsyncAvatarClient(live_server.url) as client:
            return await asyncio.gather(*(one_stream(client, d) for d in (-0.04, 0.0, 0.04)))

    results = asyncio.run(main())
    for got in results:
        assert [seq for seq, _ in got] == list(range(12))
    # each stream got its own poses' frames (the three shifts render differently)
    means = [round(np.mean([m for _, m in got]), 3) for got in results]
    assert len(set(means)) == 3


def rendered_total(server: RunningServer) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("avatar_frames_rendered_total "):
            return float(line.split()[1])
    raise AssertionError("avatar_frames_rendered_total missing")


def test_backpressure_a_client_that_stops_reading(
    live_server: RunningServer, client: AvatarClient, astronaut: dict
) -> None:
    # a client with a small socket buffer whose library reads at most one message ahead
    sock = socket.create_connection(("127.0.0.1", int(live_server.url.rsplit(":", 1)[1])))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    pose = source_pose(astronaut)
    flood = 300
    with client.stream(
        astronaut["id"], socket_options={"sock": sock, "max_queue": 1}, format="raw"
    ) as stalled:
        before = rendered_total(live_server)
        for seq in range(flood):
            stalled.send_pose(seq, nod(pose, seq), normalised=True)

        # rendering stops once the frames in flight fill the socket buffers
        previous, still = -1.0, 0
        deadline = time.monotonic() + 30
        while still < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            current = rendered_total(live_server)
            still = still + 1 if current == previous else 0
            previous = current
        stalled_frames = previous - before
        assert still >= 3, "rendering never stopped for a client that does not read"
        assert stalled_frames < 40

        # everyone else is served meanwhile
        assert_stream_works(client, astronaut)

        # reading again: the newest poses arrive, the flood in between was dropped
        seqs = []
        stats = None
        stalled.send_pose(flood, pose, normalised=True)
        while not seqs or seqs[-1] != flood:
            message = stalled.receive(timeout=30)
            if isinstance(message, FrameMessage):
                seqs.append(message.seq)
        for _ in range(20):
            message = stalled.receive(timeout=30)
            if isinstance(message, dict) and message["type"] == "stats":
                stats = message
                break
    assert seqs == sorted(seqs) and len(seqs) < flood / 2
    assert stats is not None
    assert stats["dropped"] >= flood - len(seqs) - 2
    assert stats["received"] == flood + 1


def test_deleting_an_avatar_closes_its_streams(client: AvatarClient) -> None:
    avatar = client.register(SAMPLE)
    with client.stream(avatar["id"]) as stream:
        stream.send_pose(0, source_pose(avatar), normalised=True)
        assert stream.receive_frame().seq == 0
        assert client.delete_avatar(avatar["id"])["streams_closed"] == 1
        closed = closed_with(stream)
    assert closed.code == 4404 and "was deleted" in closed.reason


def test_restart_keeps_avatars(tmp_path) -> None:
    """Register on one server, stop it, start a new one on the same data folder."""
    first = start_server(make_settings(tmp_path, max_batch=1, warmup=False))
    try:
        with AvatarClient(first.url) as client:
            avatar = client.register(SAMPLE)
            preview = client.preview(avatar["id"])
            assert_stream_works(client, avatar, frames=5)
    finally:
        first.stop()

    second = start_server(make_settings(tmp_path, max_batch=1, warmup=False))
    try:
        with AvatarClient(second.url) as client:
            assert [a["id"] for a in client.list_avatars()] == [avatar["id"]]
            assert client.preview(avatar["id"]) == preview
            assert_stream_works(client, avatar, frames=20)
    finally:
        second.stop()
