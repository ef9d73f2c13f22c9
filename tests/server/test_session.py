"""The session state machine, the pending queue and the motion mapping (no sockets)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.pose import crop_box, normalise_points
from server.motion import MotionMapper
from server.protocol import ProtocolError, StreamConfig, pack_camera, pack_pose
from server.session import PendingQueue, PoseJob, SessionState, StreamProtocol


def new_protocol() -> StreamProtocol:
    return StreamProtocol(StreamConfig(), max_image_pixels=10_000)


def test_hello_then_poses() -> None:
    machine = new_protocol()
    assert machine.state is SessionState.AWAITING_HELLO
    machine.on_text('{"type": "hello", "format": "raw", "motion": "relative"}')
    assert machine.state is SessionState.STREAMING
    assert machine.config.format == "raw" and machine.config.motion == "relative"

    job = machine.on_bytes(pack_pose(5, np.zeros(136, np.float32), normalised=True), 1.0)
    assert job.seq == 5 and job.normalised and job.points.shape == (68, 2)

    machine.on_text('{"type": "config", "quality": 50}')
    assert machine.config.quality == 50 and machine.config.format == "raw"
    assert machine.on_text('{"type": "reset"}')["type"] == "reset"

    machine.close()
    with pytest.raises(ProtocolError):
        machine.on_text('{"type": "reset"}')


@pytest.mark.parametrize(
    ("first", "code", "words"),
    [
        (b"\x00" * 560, "unexpected_message", "expected a JSON hello first, got a binary"),
        ('{"type": "config"}', "unexpected_message", "expected a hello message first"),
        ("hello", "bad_json", "expected a JSON object"),
        ('{"type": "hello", "format": "bmp"}', "bad_config", "got 'bmp'"),
    ],
)
def test_wrong_first_message(first, code, words) -> None:
    machine = new_protocol()
    with pytest.raises(ProtocolError) as caught:
        if isinstance(first, bytes):
            machine.on_bytes(first, 0.0)
        else:
            machine.on_text(first)
    assert caught.value.code == code and words in caught.value.message


def test_second_hello_and_wrong_input_kind() -> None:
    machine = new_protocol()
    machine.on_text('{"type": "hello"}')
    with pytest.raises(ProtocolError, match="second hello"):
        machine.on_text('{"type": "hello"}')

    # pose mode refuses camera messages; frames mode refuses poses
    with pytest.raises(ProtocolError) as caught:
        machine.on_bytes(pack_camera(1, b"\xff\xd8\xff\xe0"), 0.0)
    assert caught.value.code == "unexpected_message" and caught.value.close_code == 1003
    machine.on_text('{"type": "config", "input": "frames"}')
    with pytest.raises(ProtocolError) as caught:
        machine.on_bytes(pack_pose(1, np.zeros(136, np.float32), normalised=True), 0.0)
    assert caught.value.code == "unexpected_message"


def test_camera_jpeg_header_checked_before_decoding() -> None:
    import simplejpeg

    machine = new_protocol()
    machine.on_text('{"type": "hello", "input": "frames"}')
    small = simplejpeg.encode_jpeg(np.zeros((64, 64, 3), np.uint8), colorspace="RGB")
    assert machine.on_bytes(pack_camera(3, small), 0.0).jpeg == small

    large = simplejpeg.encode_jpeg(np.zeros((200, 200, 3), np.uint8), colorspace="RGB")
    with pytest.raises(ProtocolError, match="at most 10000 pixels, got 200x200") as caught:
        machine.on_bytes(pack_camera(4, large), 0.0)
    assert caught.value.code == "bad_image"

    with pytest.raises(ProtocolError) as caught:
        machine.on_bytes(pack_camera(5, b"\xff\xd8\xff" + b"\x00" * 20), 0.0)
    assert caught.value.code == "bad_image"


def test_pending_queue_keeps_the_newest() -> None:
    async def main() -> tuple[list[int], list[int]]:
        queue = PendingQueue(capacity=2)
        dropped = []
        for seq in range(5):
            out = queue.put(PoseJob(seq=seq, received=0.0))
            if out is not None:
                dropped.append(out.seq)
        left = [(await queue.get()).seq for _ in range(len(queue))]
        return dropped, left

    dropped, left = asyncio.run(main())
    assert dropped == [0, 1, 2]
    assert left == [3, 4]


def pixel_face(scale: float, shift: tuple[float, float]) -> np.ndarray:
    """A face-like set of 68 points: a wide ellipse of points, in pixels."""
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    points = np.stack([np.cos(angles) * 1.3, np.sin(angles)], axis=1) * scale
    return (points + shift).astype(np.float32)


def test_absolute_motion() -> None:
    mapper = MotionMapper("absolute", np.zeros(136, np.float32))
    points = pixel_face(40, (200, 150))
    np.testing.assert_allclose(
        mapper(points, normalised=False), normalise_points(points, crop_box(points))
    )
    normalised = np.linspace(-0.5, 0.5, 136, dtype=np.float32).reshape(68, 2)
    np.testing.assert_array_equal(mapper(normalised, normalised=True), normalised.reshape(-1))


def test_relative_motion_moves_the_source_pose_by_the_driver_motion() -> None:
    source = normalise_points(pixel_face(30, (100, 100)) * [0.8, 1.0], crop_box(
        pixel_face(30, (100, 100)) * [0.8, 1.0]
    ))
    mapper = MotionMapper("relative", source)

    # the first driver frame is the reference: the avatar keeps its own pose
    first = pixel_face(60, (300, 200))
    np.testing.assert_allclose(mapper(first, normalised=False), source, atol=1e-6)

    # the driver moves right by 12 px: the avatar moves right, by the driver's motion in
    # its first crop, scaled by the ratio of face widths; y does not change
    moved = first + [12.0, 0.0]
    pose = mapper(moved, normalised=False).reshape(68, 2)
    delta = pose - source.reshape(68, 2)
    side = crop_box(first).side
    source_width = np.ptp(source.reshape(68, 2)[:, 0])
    driver_width = np.ptp(normalise_points(first, crop_box(first)).reshape(68, 2)[:, 0])
    np.testing.assert_allclose(delta[:, 0], 12.0 / side * 2 * source_width / driver_width,
                               rtol=1e-4)
    np.testing.assert_allclose(delta[:, 1], 0.0, atol=1e-6)

    # reset: the next frame is the new reference
    mapper.reset()
    np.testing.assert_allclose(mapper(moved, normalised=False), source, atol=1e-6)

    # far motion is clipped to the valid range
    assert np.abs(mapper(moved + [900.0, 0.0], normalised=False)).max() <= 1.0
