"""Frame encoding: JPEG through libjpeg-turbo (simplejpeg), WebP through Pillow, or raw RGB.

Called from worker threads, never on the event loop.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import simplejpeg
from PIL import Image

from server.protocol import OutputFormat

logger = logging.getLogger(__name__)

MEDIA_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "raw": "application/octet-stream"}


def encode_frame(frame: np.ndarray, fmt: OutputFormat, quality: int) -> bytes:
    """One uint8 RGB frame [H, W, 3] in `fmt`; raw is the H*W*3 bytes, row-major RGB."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}")
    frame = np.ascontiguousarray(frame)

    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(
            frame, quality=quality, colorspace="RGB", colorsubsampling="420", fastdct=True
        )
    if fmt == "webp":
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="WEBP", quality=quality, method=0)
        return buffer.getvalue()
    if fmt == "raw":
        return frame.tobytes()
    raise ValueError(f"expected format jpeg, webp or raw, got {fmt!r}")


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG as uint8 RGB [H, W, 3]; ValueError when it cannot be decoded."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot decode JPEG ({len(data)} bytes): {error}") from error


def decode_frame(data: bytes, fmt: OutputFormat, width: int, height: int) -> np.ndarray:
    """Inverse of encode_frame (used by the client and the tests)."""
    if fmt == "jpeg":
        return decode_jpeg(data)
    if fmt == "webp":
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    if len(data) != width * height * 3:
        raise ValueError(f"raw frame: expected {width * height * 3} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
