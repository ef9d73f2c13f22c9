"""What stands between the network and the routes: trusted Host names, request body size,
browser origins (CORS for REST, an Origin check for streams), and keys kept out of logs.

Each refusal is a catalogued error (server/errors.py) with a stable code; the stream
route refuses with a close code instead (server/protocol.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.settings import Settings

logger = logging.getLogger(__name__)

# multipart framing around the photo: boundaries, part headers, the file name
MULTIPART_OVERHEAD = 64 * 1024

TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host: str) -> str:
    """The name part of a Host header: without port, without IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, patterns: list[str]) -> bool:
    name = host_name(host)
    for pattern in patterns:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """A WebSocket's Origin: none (not a browser), a page of the host it connects to, or a
    CORS origin. Host names are compared without ports: a front such as nginx often
    passes `Host` without the public port the page's Origin carries."""
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    if "*" in allowed or origin in (o.lower() for o in allowed):
        return True
    netloc = origin.split("://", 1)[-1]
    return host is not None and host_name(netloc) == host_name(host)


class HostCheck:
    """400 `untrusted_host` (HTTP) or a refused handshake (WebSocket) for a Host header
    outside `trusted_hosts`; guards against DNS rebinding and misrouted traffic."""

    def __init__(
        self, app: ASGIApp, patterns: list[str], count_error: Callable[[str], None]
    ) -> None:
        self.app = app
        self.patterns = patterns
        self.count_error = count_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or "*" in self.patterns:
            await self.app(scope, receive, send)
            return
        host = header(scope, b"host") or ""
        if host_allowed(host, self.patterns):
            await self.app(scope, receive, send)
            return

        self.count_error("untrusted_host")
        message = f"expected a Host in trusted_hosts, got {host!r}"
        if scope["type"] == "websocket":
            # closing before accepting answers the handshake with HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": message[:123]})
            return
        await error_response("untrusted_host", message)(scope, receive, send)


class BodyLimit:
    """413 `request_too_large` for a request body over `limit` bytes: at once when its
    Content-Length says so, otherwise as soon as the streamed bytes pass it."""

    def __init__(self, app: ASGIApp, limit: int, count_error: Callable[[str], None]) -> None:
        self.app = app
        self.limit = limit
        self.count_error = count_error

    def _refusal(self, size: str) -> Any:
        self.count_error("request_too_large")
        return error_response(
            "request_too_large", f"expected a request body of at most {self.limit} bytes, "
            f"got {size}"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refusal(f"{length} bytes")(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's own error for the cut body is replaced below
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refusal(f"more than {self.limit} bytes")(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised from inside receive() to stop reading an oversized body."""


class RedactTokens(logging.Filter):
    """Keeps `?token=...` of stream URLs out of the access and error logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and "token=" in arg for arg in record.args
        ):
            record.args = tuple(
                TOKEN_IN_TEXT.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = TOKEN_IN_TEXT.sub(r"\1***", record.msg)
        return True


def redact_server_logs() -> None:
    """Install the token filter on uvicorn's loggers (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in target.filters):
            target.addFilter(RedactTokens())


def install_middleware(
    app: FastAPI, settings: Settings, count_error: Callable[[str], None]
) -> None:
    """Wire the checks; the last added runs first (host, then size, then CORS)."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(
        BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD, count_error=count_error
    )
    app.add_middleware(HostCheck, patterns=settings.trusted_hosts, count_error=count_error)
    redact_server_logs()
