"""The WebSocket stream route (protocol: server/protocol.py, docs/protocol.md)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, WebSocket

from server.app import AppServices
from server.errors import ApiError
from server.protocol import ProtocolError, event
from server.routes.deps import Owner, check_compatible, check_owner
from server.session import StreamSession

logger = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])


@router.websocket("/avatars/{avatar_id}/stream")
async def stream_avatar(websocket: WebSocket, owner: Owner, avatar_id: str) -> None:
    """Stream poses in, rendered frames out (see docs/protocol.md)."""
    services: AppServices | None = websocket.app.state.services
    if services is None or not services.ready:
        await websocket.accept()
        error = ProtocolError("not_ready", "the server is starting or shutting down; retry")
        await websocket.send_text(event("error", code=error.code, message=error.message))
        await websocket.close(error.close_code, error.message)
        return

    session = StreamSession(websocket, avatar_id, services.stream)
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
    await session.run(avatar)
