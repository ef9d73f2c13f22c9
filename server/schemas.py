"""Request and response bodies of the REST API (they become the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.store.base import AvatarMeta


class CropOut(BaseModel):
    """The square face crop, in pixels of the uploaded photo."""

    cx: float = Field(description="Centre x.")
    cy: float = Field(description="Centre y.")
    side: float = Field(description="Side length.")


class PhotoOut(BaseModel):
    """Size of the uploaded photo."""

    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")


class AvatarOut(BaseModel):
    """A registered avatar."""

    id: str = Field(description="Avatar id, used in every other route.")
    created: float = Field(description="Registration time, unix seconds.")
    image_size: int = Field(description="Frames are image_size x image_size pixels.")
    preset: str = Field(description="Model preset of the weights that registered it.")
    weights_sha256: str = Field(description="Checkpoint SHA-256 of those weights.")
    source_pose: list[float] = Field(
        description="The photo's pose: 68 (x, y) landmarks flattened to 136 values, "
        "normalised to [-1, 1] in the crop.",
        min_length=136, max_length=136,
    )
    crop: CropOut = Field(description="The face crop the avatar was made from.")
    photo: PhotoOut = Field(description="Size of the uploaded photo.")
    num_faces: int = Field(description="Faces found in the photo; the largest was used.")
    timings_ms: dict[str, float] = Field(
        description="Registration stages in ms: decode, landmarks, register (and, in the "
        "POST response, store and total)."
    )

    @classmethod
    def from_meta(cls, meta: AvatarMeta) -> AvatarOut:
        return cls(
            id=meta.id,
            created=meta.created,
            image_size=meta.image_size,
            preset=meta.preset,
            weights_sha256=meta.weights_sha256,
            source_pose=list(meta.source_pose),
            crop=CropOut(cx=meta.crop[0], cy=meta.crop[1], side=meta.crop[2]),
            photo=PhotoOut(width=meta.photo_size[0], height=meta.photo_size[1]),
            num_faces=meta.num_faces,
            timings_ms=meta.timings_ms,
        )


class AvatarList(BaseModel):
    """Every avatar, oldest first."""

    avatars: list[AvatarOut] = Field(description="The avatars, oldest first.")


class DeletedOut(BaseModel):
    """Result of a delete."""

    id: str = Field(description="The deleted avatar's id.")
    deleted: bool = Field(default=True, description="Always true on success.")
    streams_closed: int = Field(description="Open streams of the avatar that were closed.")


class PoseIn(BaseModel):
    """One driver pose: 68 (x, y) landmarks in iBUG-68 order."""

    points: list[tuple[float, float]] = Field(
        description="68 points [x, y]; normalised to [-1, 1] in the face crop, or pixel "
        "coordinates of a width x height frame.",
        min_length=68, max_length=68,
    )
    normalised: bool = Field(default=True, description="Points are normalised (else pixels).")
    width: int | None = Field(default=None, ge=1, le=65535, description="Frame width (pixels).")
    height: int | None = Field(default=None, ge=1, le=65535, description="Frame height (pixels).")


class FramesRequest(BaseModel):
    """Poses to render in one request (for clients that do not stream)."""

    poses: list[PoseIn] = Field(min_length=1, description="Poses, rendered in order.")
    format: Literal["jpeg", "webp", "raw"] = Field(default="jpeg", description="Frame encoding.")
    quality: int = Field(default=85, ge=1, le=100, description="JPEG/WebP quality.")
    motion: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="relative: the motion from the first pose to each pose is applied to "
        "the avatar's own source pose.",
    )


class FrameOut(BaseModel):
    """One rendered frame."""

    index: int = Field(description="Position of its pose in the request.")
    data: str = Field(description="The encoded frame, base64 (raw: RGB bytes, row-major).")
    batch: int = Field(description="Frames in the runtime call that rendered it.")
    render_ms: float = Field(description="Duration of that runtime call.")


class FramesResponse(BaseModel):
    """Rendered frames, one per pose, in request order."""

    format: Literal["jpeg", "webp", "raw"] = Field(description="Encoding of every frame.")
    width: int = Field(description="Frame width in pixels.")
    height: int = Field(description="Frame height in pixels.")
    frames: list[FrameOut] = Field(description="One frame per pose, in request order.")
    total_ms: float = Field(description="Server time for the whole request.")


class HealthOut(BaseModel):
    """Liveness."""

    status: Literal["ok"] = Field(default="ok", description="Always ok.")


class RuntimeOut(BaseModel):
    """The frame runtime in use."""

    name: str = Field(description="e.g. onnxruntime-cpu, tensorrt, torch-cpu.")
    precision: str = Field(description="fp32, fp16, bf16 or int8.")
    max_batch: int = Field(description="Largest batch the runtime was built for.")
    batch: int = Field(description="Largest batch the batcher forms.")
    ms_per_frame: dict[str, float] = Field(
        description="Warm-up measurement, ms per frame by batch size (empty if not measured)."
    )
    registration: str = Field(description="Registration runtime name.")


class WeightsOut(BaseModel):
    """The weights the server runs."""

    preset: str = Field(description="Model preset: paper or small.")
    image_size: int = Field(description="Frame size in pixels.")
    param_count: int = Field(description="Per-avatar Inference Generator parameters.")
    checkpoint_sha256: str = Field(description="SHA-256 of the bundle's checkpoint.")
    frame_graph_sha256: str = Field(description="SHA-256 of the per-frame ONNX graph.")
    trained: bool = Field(description="False: demo weights (random or briefly trained).")
    directory: str = Field(description="The bundle folder.")


class ReadyOut(BaseModel):
    """Readiness: runtimes loaded and warmed, store open."""

    ready: bool = Field(description="True once runtimes are loaded and warmed.")
    runtime: RuntimeOut | None = Field(default=None, description="The frame runtime.")
    weights: WeightsOut | None = Field(default=None, description="The weights it runs.")
    store: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="Store kind and counts: avatars, corrupt (skipped), cached.",
    )
    streams: int = Field(default=0, description="WebSocket streams open.")
    uptime_s: float = Field(default=0.0, description="Seconds since start-up finished.")
    api_keys: bool = Field(
        default=False,
        description="True when every avatar route and stream needs an API key.",
    )
    draining: bool = Field(
        default=False,
        description="True while shutting down: no new streams; route traffic elsewhere.",
    )
