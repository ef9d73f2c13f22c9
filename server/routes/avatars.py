"""Avatar routes: register, list, read, delete, preview, render poses."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from server.app import AppServices
from server.encode import MEDIA_TYPES, encode_frame
from server.errors import ApiError, error_responses
from server.motion import MotionMapper
from server.protocol import ProtocolError, validate_points
from server.routes.deps import Owner, Services, check_owner, load_avatar
from server.runtime.base import RuntimeFailure
from server.schemas import (
    AvatarList,
    AvatarOut,
    DeletedOut,
    FrameOut,
    FramesRequest,
    FramesResponse,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/avatars", tags=["avatars"])

ImageUpload = Annotated[
    UploadFile, File(description="The portrait photo: JPEG, PNG or WebP, one visible face.")
]


@router.post(
    "",
    status_code=201,
    response_model=AvatarOut,
    responses=error_responses(
        "invalid_request", "not_an_image", "bad_image", "unsupported_format",
        "image_too_large", "request_too_large", "no_face", "face_too_small", "unauthorized",
        "avatar_quota_exceeded", "registration_rate_exceeded", "runtime_error", "not_ready",
    ),
)
async def register_avatar(services: Services, owner: Owner, image: ImageUpload) -> AvatarOut:
    """Register an avatar from one portrait photo (multipart field `image`)."""
    metrics = services.metrics
    limit = services.settings.max_upload_bytes
    data = await image.read(limit + 1)
    loop = asyncio.get_running_loop()
    try:
        if owner is not None:
            await check_key_limits(services, owner)
        avatar = await loop.run_in_executor(
            services.registration_executor, services.registrar.register, data, owner
        )
    except ApiError as error:
        metrics.registrations.labels(outcome=error.code).inc()
        raise
    metrics.registrations.labels(outcome="ok").inc()
    metrics.registration_seconds.observe(avatar.meta.timings_ms["total"] / 1000.0)
    return AvatarOut.from_meta(avatar.meta)


async def check_key_limits(services: AppServices, owner: str) -> None:
    """ApiError when the key holds max_avatars_per_key avatars, or made
    registrations_per_hour registrations in the last hour."""
    settings = services.settings
    most = settings.max_avatars_per_key
    if most:
        held = await asyncio.to_thread(services.store.count, owner)
        if held >= most:
            raise ApiError(
                "avatar_quota_exceeded", f"expected at most {most} avatars per API key, this "
                f"key holds {held}; delete one first"
            )
    per_hour = settings.registrations_per_hour
    if per_hour:
        wait = await asyncio.to_thread(
            services.counters.hit, f"register:{owner}", per_hour, 3600.0
        )
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                "registration_rate_exceeded", f"expected at most {per_hour} registrations "
                f"per hour per API key; retry in {seconds} s", {"Retry-After": str(seconds)},
            )


@router.get(
    "", response_model=AvatarList, responses=error_responses("unauthorized", "not_ready")
)
async def list_avatars(services: Services, owner: Owner) -> AvatarList:
    """List the caller's avatars (every avatar without API keys), oldest first."""
    metas = await asyncio.to_thread(services.store.list, owner)
    return AvatarList(avatars=[AvatarOut.from_meta(meta) for meta in metas])


@router.get(
    "/{avatar_id}",
    response_model=AvatarOut,
    responses=error_responses(
        "avatar_not_found", "invalid_request", "unauthorized", "not_ready"
    ),
)
async def get_avatar(services: Services, owner: Owner, avatar_id: str) -> AvatarOut:
    """Read one avatar's metadata."""
    meta = await asyncio.to_thread(services.store.get_meta, avatar_id)
    if meta is None:
        raise ApiError("avatar_not_found", f"no avatar with id {avatar_id!r}")
    check_owner(owner, meta.owner, avatar_id)
    return AvatarOut.from_meta(meta)


@router.delete(
    "/{avatar_id}",
    response_model=DeletedOut,
    responses=error_responses(
        "avatar_not_found", "invalid_request", "unauthorized", "not_ready"
    ),
)
async def delete_avatar(services: Services, owner: Owner, avatar_id: str) -> DeletedOut:
    """Delete an avatar: its files, its index row, its cache entry; close its streams."""
    meta = await asyncio.to_thread(services.store.get_meta, avatar_id)
    if meta is not None:
        check_owner(owner, meta.owner, avatar_id)
    closed = services.sessions.close_avatar(avatar_id)
    existed = await asyncio.to_thread(services.store.delete, avatar_id)
    if not existed:
        raise ApiError("avatar_not_found", f"no avatar with id {avatar_id!r}")
    logger.info("avatar %s deleted (%d stream(s) closed)", avatar_id, closed)
    return DeletedOut(id=avatar_id, streams_closed=closed)


@router.get(
    "/{avatar_id}/preview",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/webp": {}},
              "description": "The avatar rendered in its own source pose."},
        **error_responses(
            "avatar_not_found", "avatar_stale", "invalid_request", "unauthorized", "not_ready"
        ),
    },
)
async def preview_avatar(
    services: Services,
    owner: Owner,
    avatar_id: str,
    format: Annotated[Literal["jpeg", "webp"], Query(description="Image format.")] = "jpeg",
    quality: Annotated[int, Query(ge=1, le=100, description="JPEG/WebP quality.")] = 90,
) -> Response:
    """Render the avatar in its own source pose."""
    avatar = await load_avatar(services, avatar_id, owner)
    try:
        result = await services.batcher.render(
            avatar.source_pose, avatar.texture, avatar.params
        )
    except RuntimeFailure as error:
        raise ApiError("runtime_error", f"rendering failed: {error}") from None
    data = await asyncio.get_running_loop().run_in_executor(
        services.encode_executor, encode_frame, result.frame, format, quality
    )
    return Response(content=data, media_type=MEDIA_TYPES[format])


@router.post(
    "/{avatar_id}/frames",
    response_model=FramesResponse,
    responses=error_responses(
        "avatar_not_found", "avatar_stale", "bad_pose", "too_many_poses", "invalid_request",
        "request_too_large", "unauthorized", "runtime_error", "not_ready",
    ),
)
async def render_frames(
    services: Services, owner: Owner, avatar_id: str, request: FramesRequest
) -> FramesResponse:
    """Render the avatar in one or a few poses (JSON in, base64 frames out)."""
    started = time.perf_counter()
    limit = services.settings.max_poses_per_request
    if len(request.poses) > limit:
        raise ApiError(
            "too_many_poses", f"expected at most {limit} poses, got {len(request.poses)}"
        )

    # every pose checked before anything renders
    checked = []
    for index, pose in enumerate(request.poses):
        try:
            points = validate_points(
                np.asarray(pose.points, dtype=np.float64), pose.normalised,
                pose.width or 0, pose.height or 0, f"poses[{index}]",
            )
        except ProtocolError as error:
            raise ApiError("bad_pose", error.message) from None
        checked.append((points, pose.normalised))

    avatar = await load_avatar(services, avatar_id, owner)
    motion = MotionMapper(request.motion, avatar.source_pose)
    poses = [motion(points, normalised) for points, normalised in checked]  # [136] each

    # submitted together, so they may share batches
    try:
        futures = [
            services.batcher.submit(pose, avatar.texture, avatar.params) for pose in poses
        ]
        results = await asyncio.gather(*futures)
    except RuntimeFailure as error:
        raise ApiError("runtime_error", f"rendering failed: {error}") from None

    loop = asyncio.get_running_loop()
    encoded = await asyncio.gather(*(
        loop.run_in_executor(
            services.encode_executor, encode_frame, result.frame, request.format,
            request.quality,
        )
        for result in results
    ))
    total_ms = (time.perf_counter() - started) * 1000.0
    latency = services.metrics.frame_latency.labels(source="rest")
    for _ in results:
        latency.observe(total_ms / 1000.0)

    size = avatar.meta.image_size
    return FramesResponse(
        format=request.format,
        width=size,
        height=size,
        frames=[
            FrameOut(
                index=index,
                data=base64.b64encode(data).decode(),
                batch=result.batch,
                render_ms=round(result.render_ms, 3),
            )
            for index, (data, result) in enumerate(zip(encoded, results, strict=True))
        ],
        total_ms=round(total_ms, 3),
    )
