"""Dependencies shared by the routes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from server.app import AppServices
from server.errors import ApiError
from server.store.base import Avatar

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="avatar"'}


def get_services(request: Request) -> AppServices:
    """The app's services; 503 `not_ready` while starting or draining."""
    services: AppServices | None = request.app.state.services
    if services is None or not services.ready:
        raise ApiError("not_ready", "the server is starting or shutting down; retry shortly")
    return services


Services = Annotated[AppServices, Depends(get_services)]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; ApiError for another scheme."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            "unauthorized", f"expected 'Authorization: Bearer <key>', got the scheme "
            f"{scheme[:20]!r}", CHALLENGE,
        )
    return token.strip()


async def authenticate(services: AppServices, token: str | None) -> str:
    """The key id of a token; ApiError `unauthorized` when missing, unknown or revoked."""
    if not token:
        raise ApiError(
            "unauthorized", "expected an API key (Authorization: Bearer <key>), got none",
            CHALLENGE,
        )
    key = await asyncio.to_thread(services.keys.verify, token)
    if key is None:
        raise ApiError("unauthorized", "the API key is unknown or revoked", CHALLENGE)
    return key.id


async def current_owner(request: Request, services: Services) -> str | None:
    """Who is asking: the caller's API key id, which owns the avatars it registers; each
    route shows a key only its own avatars. None while the server runs without keys
    (everyone sees every avatar)."""
    if not services.settings.api_keys:
        return None
    return await authenticate(services, bearer_token(request.headers.get("authorization")))


Owner = Annotated[str | None, Depends(current_owner)]


def check_owner(owner: str | None, avatar_owner: str | None, avatar_id: str) -> None:
    """404 for another key's avatar, exactly as for an unknown one."""
    if owner is not None and avatar_owner != owner:
        raise ApiError("avatar_not_found", f"no avatar with id {avatar_id!r}")


async def load_avatar(services: AppServices, avatar_id: str, owner: str | None) -> Avatar:
    """The avatar, ready to render; 404 when unknown, 409 when made by other weights."""
    avatar = await asyncio.to_thread(services.store.get, avatar_id)
    if avatar is None:
        raise ApiError("avatar_not_found", f"no avatar with id {avatar_id!r}")
    check_owner(owner, avatar.meta.owner, avatar_id)
    check_compatible(services, avatar)
    return avatar


def check_compatible(services: AppServices, avatar: Avatar) -> None:
    """ApiError `avatar_stale` unless the avatar fits the weights the server runs."""
    weights = services.weights
    fits = (
        avatar.meta.weights_sha256 == weights.checkpoint_sha256
        and avatar.params.shape == (weights.param_count,)
        and avatar.meta.image_size == weights.image_size
    )
    if not fits:
        raise ApiError(
            "avatar_stale",
            f"avatar {avatar.id} was registered with weights {avatar.meta.weights_sha256[:12]} "
            f"({avatar.meta.preset}); the server runs {weights.checkpoint_sha256[:12]} "
            f"({weights.preset}): register its photo again",
        )
