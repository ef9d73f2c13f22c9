"""Frame encoding: each format decodes back to the frame (JPEG/WebP within their loss)."""

from __future__ import annotations

import numpy as np
import pytest

from server.encode import decode_frame, encode_frame


def smooth_frame(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "tolerance"), [("jpeg", 12), ("webp", 12), ("raw", 0)])
def test_round_trip(fmt: str, tolerance: int) -> None:
    frame = smooth_frame()
    data = encode_frame(frame, fmt, 90)
    decoded = decode_frame(data, fmt, 64, 64)
    assert decoded.shape == frame.shape
    error = np.abs(decoded.astype(int) - frame.astype(int)).mean()
    assert error <= tolerance
    if fmt == "jpeg":
        assert data[:3] == b"\xff\xd8\xff"
    if fmt == "webp":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def test_quality_changes_size_and_bad_frames_are_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert len(encode_frame(noisy, "jpeg", 95)) > len(encode_frame(noisy, "jpeg", 20))
    with pytest.raises(ValueError, match="uint8"):
        encode_frame(noisy.astype(np.float32), "jpeg", 90)
    with pytest.raises(ValueError, match="format"):
        encode_frame(noisy, "gif", 90)  # type: ignore[arg-type]
