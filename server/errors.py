"""REST errors: one catalogue of stable codes, one JSON body, the handlers that emit it.

Every error the REST API returns has the body `{"code": ..., "message": ...}`: `code` is
stable (clients and tests branch on it), `message` is for people and may change. The
catalogue below is the single source for the status of each code and for the OpenAPI text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.keys import KeyStoreError
from server.store.base import StoreError

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error response."""

    code: str = Field(description="Stable machine-readable error code.", examples=["no_face"])
    message: str = Field(description="What went wrong, for people; wording may change.")


# code -> (HTTP status, when it happens)
ERROR_CATALOGUE: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "The request does not match the schema (missing or bad field)."),
    "not_an_image": (400, "The upload is not an image file."),
    "bad_image": (400, "The image is truncated or corrupt and cannot be decoded."),
    "unsupported_format": (415, "An image, but not JPEG, PNG or WebP."),
    "image_too_large": (413, "The upload exceeds max_upload_bytes or max_image_pixels."),
    "no_face": (422, "No face was found in the photo."),
    "face_too_small": (422, "The face is too small in the photo to make an avatar."),
    "avatar_not_found": (404, "No avatar with this id."),
    "avatar_stale": (409, "The avatar was registered with other weights; register again."),
    "bad_pose": (422, "A pose is malformed: wrong count, NaN/Inf or out of range."),
    "too_many_poses": (413, "More poses in one request than max_poses_per_request."),
    "unauthorized": (401, "No API key, or one that is unknown or revoked (keys on)."),
    "avatar_quota_exceeded": (403, "The API key holds max_avatars_per_key avatars already."),
    "registration_rate_exceeded": (
        429, "The API key made registrations_per_hour registrations in the last hour; "
        "Retry-After says when to try again."
    ),
    "request_too_large": (413, "The request body is over max_upload_bytes (plus 64 KiB)."),
    "untrusted_host": (400, "The Host header is not in trusted_hosts."),
    "not_found": (404, "No such route."),
    "method_not_allowed": (405, "The route exists, but not with this method."),
    "not_ready": (503, "The server is starting or draining; retry later."),
    "store_unavailable": (503, "The avatar store (Redis) cannot be reached; retry later."),
    "runtime_error": (500, "The runtime failed to render or register."),
    "internal": (500, "An unexpected server error; the log has details."),
}


class ApiError(Exception):
    """An error with a catalogued code; the handler turns it into its status and body."""

    def __init__(
        self, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        if code not in ERROR_CATALOGUE:
            raise ValueError(f"unknown error code {code!r}; add it to ERROR_CATALOGUE")
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers

    @property
    def status(self) -> int:
        return ERROR_CATALOGUE[self.code][0]


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: one entry per status, naming each code it may carry."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERROR_CATALOGUE[code][0], []).append(code)

    responses: dict[int | str, dict[str, Any]] = {}
    for status, status_codes in sorted(by_status.items()):
        lines = [f"`{code}`: {ERROR_CATALOGUE[code][1]}" for code in status_codes]
        responses[status] = {"model": ErrorBody, "description": "<br>".join(lines)}
    return responses


def error_response(
    code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON response for one catalogued error."""
    return JSONResponse(
        status_code=ERROR_CATALOGUE[code][0],
        content=ErrorBody(code=code, message=message).model_dump(),
        headers=headers,
    )


def install_error_handlers(app: FastAPI, count_error: Callable[[str], None]) -> None:
    """Route every error through the catalogue; `count_error(code)` feeds the metrics."""

    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)  # registered for ApiError only
        count_error(error.code)
        return error_response(error.code, error.message, error.headers)

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        parts = []
        for item in error.errors()[:5]:
            where = ".".join(str(part) for part in item.get("loc", ()))
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        count_error("invalid_request")
        return error_response("invalid_request", "; ".join(parts) or "invalid request")

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        if code is None:
            count_error("internal")
            return JSONResponse(
                status_code=error.status_code,
                content=ErrorBody(code="http_error", message=str(error.detail)).model_dump(),
            )
        count_error(code)
        return error_response(code, f"{request.method} {request.url.path}: {error.detail}")

    async def on_store(request: Request, error: Exception) -> JSONResponse:
        logger.error("store failure on %s %s: %s", request.method, request.url.path, error)
        count_error("store_unavailable")
        return error_response("store_unavailable", str(error))

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        count_error("internal")
        return error_response("internal", f"{type(error).__name__} while serving the request")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(StoreError, on_store)
    app.add_exception_handler(KeyStoreError, on_store)
    app.add_exception_handler(Exception, on_unexpected)
