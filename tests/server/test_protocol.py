"""The stream protocol's message formats: round trips and every rejection."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server import protocol
from server.protocol import (
    CAMERA_MAGIC,
    POSE_MESSAGE_SIZE,
    FrameTimings,
    ProtocolError,
    StreamConfig,
    apply_config,
    close_reason,
    pack_camera,
    pack_frame,
    pack_pose,
    parse_camera,
    parse_frame,
    parse_pose,
    parse_text,
)


def face_points(rng: np.random.Generator, scale: float = 100.0) -> np.ndarray:
    """68 points spread like a face in a 320x240 frame."""
    return (rng.uniform(-1, 1, (68, 2)) * scale + [160, 120]).astype(np.float32)


def test_pose_round_trip_pixels_and_normalised() -> None:
    rng = np.random.default_rng(0)
    points = face_points(rng)
    message = parse_pose(pack_pose(7, points, normalised=False, width=320, height=240))
    assert message.seq == 7 and not message.normalised
    assert (message.width, message.height) == (320, 240)
    np.testing.assert_array_equal(message.points, points)

    normalised = rng.uniform(-0.9, 0.9, 136).astype(np.float32)
    data = pack_pose(2**32 - 1, normalised, normalised=True)
    assert len(data) == POSE_MESSAGE_SIZE == 560
    message = parse_pose(data)
    assert message.seq == 2**32 - 1 and message.normalised
    np.testing.assert_array_equal(message.points.reshape(-1), normalised)


def test_pose_layout_is_little_endian_as_documented() -> None:
    points = np.arange(136, dtype=np.float32).reshape(68, 2) / 200.0
    data = pack_pose(0x01020304, points, normalised=True)
    assert data[:4] == b"AVPO" and data[4] == 1 and data[5] == 1
    assert data[8:12] == bytes([4, 3, 2, 1])
    assert struct.unpack_from("<f", data, 16 + 4 * 5)[0] == pytest.approx(5 / 200.0)


@pytest.mark.parametrize(
    ("mutate", "code", "close_code", "words"),
    [
        (lambda d: d[:100], "bad_message_size", 1007, "expected 560 bytes, got 100"),
        (lambda d: d + b"\0", "bad_message_size", 1007, "got 561"),
        (lambda d: d[:10], "bad_message_size", 1007, "at least 16 bytes, got 10"),
        (lambda d: b"XXXX" + d[4:], "bad_header", 1007, "magic b'XXXX'"),
        (lambda d: CAMERA_MAGIC + d[4:], "unexpected_message", 1003, "a camera message"),
        (lambda d: d[:4] + b"\x02" + d[5:], "bad_version", 1007, "version 1, got 2"),
        (lambda d: d[:5] + b"\x81" + d[6:], "bad_header", 1007, "flags"),
    ],
)
def test_pose_header_rejections(mutate, code, close_code, words) -> None:
    data = pack_pose(1, np.zeros(136, np.float32), normalised=True)
    with pytest.raises(ProtocolError) as caught:
        parse_pose(mutate(data))
    assert caught.value.code == code
    assert caught.value.close_code == close_code
    assert words in caught.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pose_non_finite(bad: float) -> None:
    points = np.zeros((68, 2), np.float32)
    points[12, 1] = bad
    with pytest.raises(ProtocolError) as caught:
        parse_pose(pack_pose(3, points, normalised=True))
    assert caught.value.code == "non_finite"
    assert caught.value.close_code == 1007
    assert "point 12" in caught.value.message


def test_pose_ranges() -> None:
    rng = np.random.default_rng(1)

    # normalised beyond [-1, 1]
    points = np.zeros((68, 2), np.float32)
    points[3, 0] = 1.5
    with pytest.raises(ProtocolError, match=r"x=1.5 at point 3") as caught:
        parse_pose(pack_pose(1, points, normalised=True))
    assert caught.value.code == "out_of_range"

    # pixel points without a frame size
    with pytest.raises(ProtocolError, match="need the frame size") as caught:
        parse_pose(pack_pose(1, face_points(rng), normalised=False))
    assert caught.value.code == "bad_header"

    # pixel points far outside the frame
    far = face_points(rng) + 5000
    with pytest.raises(ProtocolError, match="near the 320x240 frame"):
        parse_pose(pack_pose(1, far, normalised=False, width=320, height=240))

    # every point on one spot: no crop can be made
    spot = np.full((68, 2), 50.0, np.float32)
    with pytest.raises(ProtocolError, match="spanning at least 2 pixels"):
        parse_pose(pack_pose(1, spot, normalised=False, width=320, height=240))


def test_camera_messages() -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 50
    message = parse_camera(pack_camera(9, jpeg))
    assert message.seq == 9 and message.jpeg == jpeg

    with pytest.raises(ProtocolError) as caught:
        parse_camera(pack_camera(9, b"\x89PNG...."))
    assert caught.value.code == "bad_image" and "FF D8 FF" in caught.value.message

    with pytest.raises(ProtocolError) as caught:
        parse_camera(pack_pose(1, np.zeros(136, np.float32), normalised=True))
    assert caught.value.code == "unexpected_message"


def test_text_messages() -> None:
    assert parse_text('{"type": "hello", "format": "webp"}')["format"] == "webp"

    cases = [
        ("{not json", "bad_json", 1007, "invalid JSON"),
        ("[1, 2]", "bad_json", 1007, "got list"),
        ('{"format": "jpeg"}', "unexpected_message", 1003, "got None"),
        ('{"type": "dance"}', "unexpected_message", 1003, "got 'dance'"),
    ]
    for text, code, close_code, words in cases:
        with pytest.raises(ProtocolError) as caught:
            parse_text(text)
        assert (caught.value.code, caught.value.close_code) == (code, close_code)
        assert words in caught.value.message


def test_config_validation() -> None:
    base = StreamConfig()
    config = apply_config(
        base, {"type": "hello", "format": "raw", "quality": 40, "input": "frames",
               "motion": "relative"}
    )
    assert config == StreamConfig(format="raw", quality=40, input="frames", motion="relative")

    bad = [
        ({"format": "gif"}, "format: expected one of ['jpeg', 'webp', 'raw'], got 'gif'"),
        ({"quality": 0}, "quality: expected an integer 1..100, got 0"),
        ({"quality": True}, "got True"),
        ({"motion": "sideways"}, "motion"),
        ({"speed": 2}, "unknown field(s) ['speed']"),
    ]
    for fields, words in bad:
        with pytest.raises(ProtocolError) as caught:
            apply_config(base, {"type": "config", **fields})
        assert caught.value.code == "bad_config" and caught.value.close_code == 4400
        assert words in caught.value.message


def test_frame_round_trip() -> None:
    timings = FrameTimings(1.5, 2.0, 3.25, 0.5, 7.25)
    data = pack_frame(42, "webp", 128, 96, 3, timings, b"payload")
    message = parse_frame(data)
    assert (message.seq, message.format, message.width, message.height, message.batch) == (
        42, "webp", 128, 96, 3
    )
    assert message.timings == timings
    assert message.payload == b"payload"
    with pytest.raises(ValueError):
        parse_frame(b"AVPO" + data[4:])


def test_close_reason_fits_a_close_frame() -> None:
    long = "é" * 200
    reason = close_reason(long)
    assert len(reason.encode()) <= protocol.MAX_REASON_BYTES
    assert reason.endswith("...")
    assert close_reason("short") == "short"


def test_events_are_json() -> None:
    assert json.loads(protocol.event("stats", sent=3)) == {"type": "stats", "sent": 3}
