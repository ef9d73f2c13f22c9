"""The WebSocket stream protocol: message layouts, parsing and validation.

Pure functions and constants, no I/O and no web framework: the server, the Python client
and the tests share this module. docs/protocol.md is the written form; keep both in step.

All binary integers and floats are little-endian.

Client -> server, binary:

- pose message, 560 bytes: header `<4sBBHIHH` (magic b"AVPO", version, flags, reserved,
  sequence number, frame width, frame height) + 68 x 2 float32 (x, y).
  flags bit 0 set: the points are normalised ([-1, 1] in the crop frame, width and height
  may be 0); clear: pixel coordinates of a frame of width x height.
- camera message: header `<4sBBHI` (magic b"AVCJ", version, flags = 0, reserved, sequence
  number) + one JPEG image; the server finds the landmarks.

Server -> client, binary: frame message, header `<4sBBHIHHfffff` (magic b"AVFR", version,
format code, batch size, sequence number, width, height, then server timings in ms:
landmarks, queue, render, encode, total) + the encoded frame.

Both directions, text: JSON objects with a "type" field (hello, config, reset from the
client; ready, stats, warning, error from the server).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

PROTOCOL_VERSION = 1
NUM_POINTS = 68

POSE_MAGIC = b"AVPO"
CAMERA_MAGIC = b"AVCJ"
FRAME_MAGIC = b"AVFR"

POSE_HEADER = struct.Struct("<4sBBHIHH")  # magic, version, flags, reserved, seq, w, h
CAMERA_HEADER = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, seq
FRAME_HEADER = struct.Struct("<4sBBHIHHfffff")  # ..., seq, w, h, 5 timings (ms)
POSE_MESSAGE_SIZE = POSE_HEADER.size + NUM_POINTS * 2 * 4  # 16 + 544 = 560

FLAG_NORMALISED = 0x01
KNOWN_POSE_FLAGS = FLAG_NORMALISED

# pixel coordinates may leave the frame a little (a face at the border), not by much more
PIXEL_MARGIN = 1.0  # in frame sizes on each side

FORMAT_CODES = {"raw": 0, "jpeg": 1, "webp": 2}
FORMAT_NAMES = {code: name for name, code in FORMAT_CODES.items()}

OutputFormat = Literal["jpeg", "webp", "raw"]
InputMode = Literal["pose", "frames"]
MotionMode = Literal["absolute", "relative"]

# close codes (RFC 6455 and the application range 4000-4999)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_BAD_CONFIG = 4400
CLOSE_UNKNOWN_AVATAR = 4404
CLOSE_IDLE = 4408
CLOSE_STALE_AVATAR = 4409
CLOSE_TOO_MANY = 4429

# protocol error code -> close code; docs/protocol.md has the same table
ERROR_CLOSE_CODES: dict[str, int] = {
    "bad_json": CLOSE_INVALID_PAYLOAD,
    "bad_config": CLOSE_BAD_CONFIG,
    "unexpected_message": CLOSE_UNSUPPORTED_DATA,
    "bad_header": CLOSE_INVALID_PAYLOAD,
    "bad_version": CLOSE_INVALID_PAYLOAD,
    "bad_message_size": CLOSE_INVALID_PAYLOAD,
    "non_finite": CLOSE_INVALID_PAYLOAD,
    "out_of_range": CLOSE_INVALID_PAYLOAD,
    "bad_image": CLOSE_INVALID_PAYLOAD,
    "message_too_big": CLOSE_TOO_BIG,
    "unknown_avatar": CLOSE_UNKNOWN_AVATAR,
    "avatar_stale": CLOSE_STALE_AVATAR,
    "not_ready": CLOSE_TRY_AGAIN,
    "avatar_deleted": CLOSE_UNKNOWN_AVATAR,
    "internal": CLOSE_INTERNAL,
    "shutting_down": CLOSE_RESTART,
    "unauthorized": CLOSE_POLICY,
    "origin_not_allowed": CLOSE_POLICY,
    "too_many_streams": CLOSE_TRY_AGAIN,
    "stream_quota_exceeded": CLOSE_TOO_MANY,
    "rate_limited": CLOSE_TOO_MANY,
    "idle_timeout": CLOSE_IDLE,
}

MAX_REASON_BYTES = 123  # a close frame's reason is at most 123 bytes of UTF-8


class ProtocolError(Exception):
    """A message broke the protocol; the session closes with `close_code` and `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = ERROR_CLOSE_CODES[code]

    def close_reason(self) -> str:
        return close_reason(self.message)


def close_reason(message: str) -> str:
    """`message` cut to fit a close frame, on a character boundary."""
    data = message.encode()
    if len(data) <= MAX_REASON_BYTES:
        return message
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


# ---------------------------------------------------------------- text messages


@dataclass(frozen=True)
class StreamConfig:
    """What the client asked for in hello/config."""

    format: OutputFormat = "jpeg"
    quality: int = 85
    input: InputMode = "pose"
    motion: MotionMode = "absolute"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "quality": self.quality,
            "input": self.input,
            "motion": self.motion,
        }


CONFIG_CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("jpeg", "webp", "raw"),
    "input": ("pose", "frames"),
    "motion": ("absolute", "relative"),
}
CLIENT_TYPES = ("hello", "config", "reset")


def describe(value: Any) -> str:
    """A short rendering of what arrived, for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_text(text: str) -> dict[str, Any]:
    """One client JSON message; it must be an object with a known "type"."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(
            "bad_json", f"expected a JSON object, got invalid JSON ({error.msg} at {error.pos})"
        ) from error
    if not isinstance(message, dict):
        raise ProtocolError(
            "bad_json", f"expected a JSON object, got {type(message).__name__}"
        )

    kind = message.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(
            "unexpected_message",
            f"expected type one of {list(CLIENT_TYPES)}, got {describe(kind)}",
        )
    return message


def apply_config(base: StreamConfig, message: dict[str, Any]) -> StreamConfig:
    """`base` updated by the fields of a hello/config message, each one validated."""
    values = base.to_dict()
    unknown = sorted(set(message) - set(values) - {"type"})
    if unknown:
        raise ProtocolError(
            "bad_config", f"expected fields {sorted(values)}, got unknown field(s) {unknown}"
        )

    for name, choices in CONFIG_CHOICES.items():
        if name in message:
            if message[name] not in choices:
                raise ProtocolError(
                    "bad_config", f"{name}: expected one of {list(choices)}, got "
                    f"{describe(message[name])}"
                )
            values[name] = message[name]

    if "quality" in message:
        quality = message["quality"]
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ProtocolError(
                "bad_config", f"quality: expected an integer 1..100, got {describe(quality)}"
            )
        values["quality"] = quality

    return StreamConfig(**values)


def event(kind: str, **fields: Any) -> str:
    """A server JSON event."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


# ---------------------------------------------------------------- binary messages


@dataclass(frozen=True)
class PoseMessage:
    """A parsed pose message."""

    seq: int
    points: np.ndarray  # [68, 2] float32
    normalised: bool
    width: int
    height: int


@dataclass(frozen=True)
class CameraMessage:
    """A parsed camera message: one JPEG webcam frame."""

    seq: int
    jpeg: bytes


def pack_pose(
    seq: int,
    points: np.ndarray,
    *,
    normalised: bool,
    width: int = 0,
    height: int = 0,
) -> bytes:
    """One pose message; `points` is [68, 2] or [136] (x, y pairs)."""
    values = np.asarray(points, dtype="<f4").reshape(-1)
    if values.size != NUM_POINTS * 2:
        raise ValueError(f"expected {NUM_POINTS * 2} values, got {values.size}")
    flags = FLAG_NORMALISED if normalised else 0
    header = POSE_HEADER.pack(POSE_MAGIC, PROTOCOL_VERSION, flags, 0, seq, width, height)
    return header + values.tobytes()


def pack_camera(seq: int, jpeg: bytes) -> bytes:
    """One camera message."""
    return CAMERA_HEADER.pack(CAMERA_MAGIC, PROTOCOL_VERSION, 0, 0, seq) + jpeg


def _magic_name(magic: bytes) -> str:
    names = {POSE_MAGIC: "a pose message", CAMERA_MAGIC: "a camera message",
             FRAME_MAGIC: "a server frame message"}
    return names.get(magic, f"magic {magic!r}")


def _check_header(data: bytes, magic: bytes, header_size: int, what: str) -> None:
    if len(data) < header_size:
        raise ProtocolError(
            "bad_message_size",
            f"{what}: expected at least {header_size} bytes, got {len(data)}",
        )
    got = bytes(data[:4])
    if got != magic:
        code = "unexpected_message" if got in (POSE_MAGIC, CAMERA_MAGIC) else "bad_header"
        raise ProtocolError(code, f"expected {what} ({magic!r}), got {_magic_name(got)}")
    if data[4] != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"{what}: expected version {PROTOCOL_VERSION}, got {data[4]}"
        )


def parse_pose(data: bytes) -> PoseMessage:
    """Validate and unpack a pose message."""
    _check_header(data, POSE_MAGIC, POSE_HEADER.size, "a pose message")
    if len(data) != POSE_MESSAGE_SIZE:
        raise ProtocolError(
            "bad_message_size",
            f"pose message: expected {POSE_MESSAGE_SIZE} bytes, got {len(data)}",
        )
    _, _, flags, _, seq, width, height = POSE_HEADER.unpack_from(data)
    if flags & ~KNOWN_POSE_FLAGS:
        raise ProtocolError(
            "bad_header", f"pose message: expected flags in 0x{KNOWN_POSE_FLAGS:02x}, "
            f"got 0x{flags:02x}"
        )
    normalised = bool(flags & FLAG_NORMALISED)
    points = np.frombuffer(data, dtype="<f4", offset=POSE_HEADER.size).reshape(NUM_POINTS, 2)
    points = validate_points(points, normalised, width, height, f"pose seq {seq}")
    return PoseMessage(
        seq=seq, points=points, normalised=normalised,
        width=width, height=height,
    )


def validate_points(
    points: np.ndarray, normalised: bool, width: int, height: int, what: str
) -> np.ndarray:
    """Landmarks [68, 2] checked: finite, in range, not degenerate; float32 copy returned.

    Normalised points lie in [-1, 1]; pixel points need the frame size and may leave the
    frame by up to PIXEL_MARGIN frame sizes. `what` names the message in errors.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.shape != (NUM_POINTS, 2):
        raise ProtocolError(
            "bad_message_size", f"{what}: expected {NUM_POINTS} points (x, y), got shape "
            f"{list(points.shape)}"
        )

    # every coordinate a number
    finite = np.isfinite(points)
    if not finite.all():
        index = int(np.argwhere(~finite)[0][0])
        value = points[index][~finite[index]][0]
        raise ProtocolError(
            "non_finite", f"{what}: expected finite coordinates, got {value} at point {index}"
        )

    if normalised:
        _check_range(points, -1.0, 1.0, -1.0, 1.0, what, "normalised coordinates in [-1, 1]")
        return points.copy()

    if not width or not height:
        raise ProtocolError(
            "bad_header", f"{what}: pixel coordinates need the frame size, expected width "
            f"and height > 0, got {width}x{height}"
        )
    _check_range(
        points,
        -PIXEL_MARGIN * width, (1 + PIXEL_MARGIN) * width,
        -PIXEL_MARGIN * height, (1 + PIXEL_MARGIN) * height,
        what,
        f"pixel coordinates near the {width}x{height} frame",
    )
    span = points.max(axis=0) - points.min(axis=0)
    if float(span.min()) < 2.0:
        raise ProtocolError(
            "out_of_range", f"{what}: expected landmarks spanning at least 2 pixels, got a "
            f"{span[0]:.1f}x{span[1]:.1f} box"
        )
    return points.copy()


def _check_range(
    points: np.ndarray, x0: float, x1: float, y0: float, y1: float, what: str, expected: str
) -> None:
    low = np.array([x0, y0], dtype=np.float32)
    high = np.array([x1, y1], dtype=np.float32)
    outside = (points < low) | (points > high)
    if outside.any():
        index, axis = (int(v) for v in np.argwhere(outside)[0])
        raise ProtocolError(
            "out_of_range", f"{what}: expected {expected}, got "
            f"{'xy'[axis]}={float(points[index, axis]):.4g} at point {index}"
        )


def parse_camera(data: bytes) -> CameraMessage:
    """Validate and unpack a camera message (the JPEG itself is decoded later)."""
    _check_header(data, CAMERA_MAGIC, CAMERA_HEADER.size, "a camera message")
    _, _, flags, _, seq = CAMERA_HEADER.unpack_from(data)
    if flags != 0:
        raise ProtocolError(
            "bad_header", f"camera message: expected flags 0x00, got 0x{flags:02x}"
        )
    jpeg = bytes(data[CAMERA_HEADER.size:])
    if jpeg[:3] != b"\xff\xd8\xff":
        raise ProtocolError(
            "bad_image", f"camera seq {seq}: expected a JPEG image (FF D8 FF), got "
            f"{jpeg[:4].hex(' ') or 'no bytes'}"
        )
    return CameraMessage(seq=seq, jpeg=jpeg)


@dataclass(frozen=True)
class FrameTimings:
    """Server-side timings of one frame, milliseconds."""

    landmarks_ms: float = 0.0  # camera input only: decode + landmarks
    queue_ms: float = 0.0  # waiting for the batcher
    render_ms: float = 0.0  # the per-frame graph call (shared by the batch)
    encode_ms: float = 0.0
    total_ms: float = 0.0  # message received -> frame handed to the socket


@dataclass(frozen=True)
class FrameMessage:
    """A parsed server frame message."""

    seq: int
    format: OutputFormat
    width: int
    height: int
    batch: int
    timings: FrameTimings
    payload: bytes


def pack_frame(
    seq: int, fmt: OutputFormat, width: int, height: int, batch: int,
    timings: FrameTimings, payload: bytes,
) -> bytes:
    """One server frame message."""
    header = FRAME_HEADER.pack(
        FRAME_MAGIC, PROTOCOL_VERSION, FORMAT_CODES[fmt], batch, seq, width, height,
        timings.landmarks_ms, timings.queue_ms, timings.render_ms, timings.encode_ms,
        timings.total_ms,
    )
    return header + payload


def parse_frame(data: bytes) -> FrameMessage:
    """Unpack a server frame message (client side)."""
    if len(data) < FRAME_HEADER.size or bytes(data[:4]) != FRAME_MAGIC:
        raise ValueError(
            f"expected a frame message ({FRAME_MAGIC!r}, >= {FRAME_HEADER.size} bytes), "
            f"got {len(data)} bytes starting {bytes(data[:4])!r}"
        )
    magic, version, code, batch, seq, width, height, *ms = FRAME_HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION or code not in FORMAT_NAMES:
        raise ValueError(f"unknown frame version {version} or format code {code}")
    timings = FrameTimings(*(0.0 if math.isnan(v) else float(v) for v in ms))
    return FrameMessage(
        seq=seq, format=FORMAT_NAMES[code], width=width, height=height,  # type: ignore[arg-type]
        batch=batch, timings=timings, payload=bytes(data[FRAME_HEADER.size:]),
    )
