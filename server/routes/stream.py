"""The WebSocket stream route (protocol: server/protocol.py, docs/protocol.md)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, WebSocket

from server.app import AppServices
from server.errors import ApiError
from server.protocol import ProtocolError, close_reason, event
from server.routes.deps import authenticate, bearer_token, check_compatible, check_owner
from server.security import origin_allowed
from server.session import StreamSession

logger = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])


async def _refuse_early(websocket: WebSocket, error: ProtocolError) -> None:
    """Refuse before the services exist (starting) or while draining."""
    await websocket.accept()
    await websocket.send_text(event("error", code=error.code, message=error.message))
    await websocket.close(error.close_code, close_reason(error.message))


@router.websocket("/avatars/{avatar_id}/stream")
async def stream_avatar(websocket: WebSocket, avatar_id: str) -> None:
    """Stream poses in, rendered frames out (see docs/protocol.md)."""
    services: AppServices | None = websocket.app.state.services
    if services is None or not services.ready:
        await _refuse_early(websocket, ProtocolError(
            "not_ready", "the server is starting or shutting down; retry"
        ))
        return
    if services.draining:
        await _refuse_early(websocket, ProtocolError(
            "shutting_down", "the server is shutting down; reconnect (another replica can "
            "serve you)"
        ))
        return

    settings = services.settings
    session = StreamSession(websocket, avatar_id, services.stream)
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), settings.cors_origins):
        await session.refuse(ProtocolError(
            "origin_not_allowed", f"expected a page of this server or of cors_origins, got "
            f"Origin {origin!r}"
        ))
        return

    # the key: an Authorization header, or ?token= for browsers (they cannot set headers)
    owner: str | None = None
    if settings.api_keys:
        try:
            token = bearer_token(websocket.headers.get("authorization"))
            owner = await authenticate(services, token or websocket.query_params.get("token"))
        except ApiError as error:
            await session.refuse(ProtocolError("unauthorized", error.message))
            return
    session.owner = owner

    avatar = await asyncio.to_thread(services.store.get, avatar_id)
    try:
        if avatar is None:
            raise ApiError("avatar_not_found", avatar_id)
        check_owner(owner, avatar.meta.owner, avatar_id)
    except ApiError:
        await session.refuse(ProtocolError(
            "unknown_avatar", f"expected a registered avatar id, got {avatar_id!r}"
        ))
        return
    try:
        check_compatible(services, avatar)
    except ApiError as error:
        await session.refuse(ProtocolError("avatar_stale", error.message))
        return

    refusal = services.sessions.admit(session, settings.max_streams, settings.max_streams_per_key)
    if refusal is not None:
        await session.refuse(refusal)
        return
    await session.run(avatar)
