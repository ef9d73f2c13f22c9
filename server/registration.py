"""Registration: one uploaded photo -> a stored avatar.

Runs in a worker thread (blocking): checks the upload's format and size, decodes it,
finds the face (landmarks, crop, stickman, mask), runs the registration graph once, and
stores the texture and the Inference Generator parameters. Every way an upload can be
unusable maps to a catalogued error code (server/errors.py).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.pose import PoseError, PosePipeline, decode_image, image_to_chw
from server.errors import ApiError
from server.runtime.base import RegistrationRuntime, RuntimeFailure
from server.store.base import Avatar, AvatarMeta, AvatarStore

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("jpeg", "png", "webp")

# leading bytes of image formats; the first three are accepted, the rest are named in the
# unsupported_format error
SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("jpeg", b"\xff\xd8\xff", 0),
    ("png", b"\x89PNG\r\n\x1a\n", 0),
    ("webp", b"WEBP", 8),  # RIFF....WEBP
    ("gif", b"GIF8", 0),
    ("bmp", b"BM", 0),
    ("tiff", b"II*\x00", 0),
    ("tiff", b"MM\x00*", 0),
    ("ico", b"\x00\x00\x01\x00", 0),
    ("heif/avif", b"ftyp", 4),
    ("jpeg2000", b"\x00\x00\x00\x0cjP  ", 0),
    ("psd", b"8BPS", 0),
)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights the server runs (for /readyz, and stamped on every avatar)."""

    preset: str
    image_size: int
    param_count: int
    checkpoint_sha256: str
    frame_graph_sha256: str
    trained: bool
    directory: str


def sniff_format(data: bytes) -> str | None:
    """The image format by its leading bytes, or None when no known signature matches."""
    for name, signature, offset in SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            if name == "webp" and data[:4] != b"RIFF":
                continue
            return name
    return None


def check_upload(data: bytes, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Format, width and height of an upload; ApiError when it cannot be registered."""
    if len(data) > max_bytes:
        raise ApiError(
            "image_too_large", f"expected at most {max_bytes} bytes, got {len(data)}"
        )
    if not data:
        raise ApiError("not_an_image", "expected a JPEG, PNG or WebP file, got an empty upload")

    kind = sniff_format(data)
    if kind is None:
        # Pillow knows more formats than the signatures above
        try:
            with Image.open(io.BytesIO(data)) as image:
                kind = (image.format or "unknown").lower()
        except Image.DecompressionBombError as error:
            raise ApiError(
                "image_too_large", f"expected at most {max_pixels} pixels, got {error}"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ApiError(
                "not_an_image", f"expected a JPEG, PNG or WebP file, got {len(data)} bytes "
                f"starting {data[:8]!r}, which is no image format"
            ) from None
    if kind not in ACCEPTED_FORMATS:
        raise ApiError(
            "unsupported_format", f"expected a JPEG, PNG or WebP image, got {kind.upper()}"
        )

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        # Pillow refuses far over its own limit before we see the size
        raise ApiError(
            "image_too_large", f"expected at most {max_pixels} pixels, got {error}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ApiError("bad_image", f"the {kind.upper()} header cannot be read: {error}") from None
    if width * height > max_pixels:
        raise ApiError(
            "image_too_large",
            f"expected at most {max_pixels} pixels, got {width}x{height} = {width * height}",
        )
    return kind, width, height


class Registrar:
    """Turns photos into stored avatars; thread-safe (the pose pipeline locks itself)."""

    def __init__(
        self,
        runtime: RegistrationRuntime,
        pipeline: PosePipeline,
        store: AvatarStore,
        weights: WeightsInfo,
        *,
        max_upload_bytes: int,
        max_image_pixels: int,
    ) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.store = store
        self.weights = weights
        self.max_upload_bytes = max_upload_bytes
        self.max_image_pixels = max_image_pixels

    def register(self, data: bytes, owner: str | None = None) -> Avatar:
        """Register one photo; blocking; ApiError for every unusable upload."""
        started = time.perf_counter()
        kind, width, height = check_upload(data, self.max_upload_bytes, self.max_image_pixels)

        # decode (truncated or corrupt files fail here)
        try:
            photo = decode_image(data)  # [H, W, 3]
        except PoseError as error:
            raise ApiError("bad_image", f"{kind.upper()}: {error.message}") from None
        decoded = time.perf_counter()

        # face, crop, pose, stickman, mask
        try:
            source = self.pipeline.prepare_source(photo)
        except PoseError as error:
            code = error.code if error.code in ("no_face", "face_too_small") else "bad_image"
            raise ApiError(code, error.message) from None
        prepared = time.perf_counter()

        # the heavy networks, once
        try:
            tensors = self.runtime.register(
                image_to_chw(source.image)[None],  # [1, 3, S, S]
                image_to_chw(source.stickman)[None],  # [1, 3, S, S]
                source.pose[None].astype(np.float32),  # [1, 136]
                source.mask[None, None].astype(np.float32),  # [1, 1, S, S]
            )
        except RuntimeFailure as error:
            raise ApiError("runtime_error", f"registration failed: {error}") from None
        registered = time.perf_counter()

        meta = AvatarMeta(
            id=secrets.token_hex(8),
            created=time.time(),
            image_size=self.weights.image_size,
            preset=self.weights.preset,
            weights_sha256=self.weights.checkpoint_sha256,
            source_pose=tuple(float(v) for v in source.pose),
            crop=(source.crop.cx, source.crop.cy, source.crop.side),
            photo_size=(width, height),
            num_faces=source.num_faces,
            timings_ms={
                "decode": round((decoded - started) * 1000.0, 2),
                "landmarks": round((prepared - decoded) * 1000.0, 2),
                "register": round((registered - prepared) * 1000.0, 2),
            },
            owner=owner,
        )
        avatar = Avatar(
            meta=meta,
            texture=np.ascontiguousarray(tensors.texture, dtype=np.float32),  # [3, S, S]
            params=np.ascontiguousarray(tensors.params, dtype=np.float32),  # [P]
        )
        self.store.put(avatar)
        stored = time.perf_counter()

        # the stored record keeps the three stages; the response adds store and total
        timings = {
            **meta.timings_ms,
            "store": round((stored - registered) * 1000.0, 2),
            "total": round((stored - started) * 1000.0, 2),
        }
        logger.info(
            "avatar %s registered from a %dx%d %s in %.0f ms (%d face(s))",
            meta.id, width, height, kind, timings["total"], source.num_faces,
        )
        return dataclasses.replace(avatar, meta=dataclasses.replace(meta, timings_ms=timings))

    def warmup(self) -> None:
        """Run the registration graph once on a blank input (first-call allocations)."""
        size = self.weights.image_size
        blank = np.zeros((1, 3, size, size), dtype=np.float32)
        self.runtime.register(
            blank, blank, np.zeros((1, 136), np.float32), np.ones((1, 1, size, size), np.float32)
        )
