"""How the server process starts and stops: uvicorn with a drain in front of its shutdown.

On SIGTERM (or SIGINT) uvicorn would close the listener and drop every WebSocket with a
bare 1012. `AvatarServer` first turns readiness false and waits `shutdown_delay_s` while
still serving (a load balancer polling /readyz stops routing here), then stops accepting,
lets each open stream send the frames of the poses it accepted and close with 1012 and a
reason, and only then hands over to uvicorn's own shutdown: HTTP requests in flight end,
then the lifespan releases the runtimes and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from fastapi import FastAPI

from server.app import AppServices, create_app, drain
from server.settings import Settings

logger = logging.getLogger(__name__)

# uvicorn's own wait for HTTP requests in flight, after the streams have drained
HTTP_GRACE_S = 10


class AvatarServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the avatar streams first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.avatar_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        services: AppServices | None = self.avatar_app.state.services
        if services is not None and not self.force_exit:
            services.draining = True
            delay = services.settings.shutdown_delay_s
            logger.info("shutting down: not ready; listener closes in %.1f s", delay)
            waited = 0.0
            while waited < delay and not self.force_exit:
                await asyncio.sleep(0.1)
                waited += 0.1

            # no new connections from here on; uvicorn closes the listener again, harmlessly
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            if not self.force_exit:  # a second Ctrl+C skips the drain
                await drain(services)
        await super().shutdown(sockets)


def make_server(settings: Settings, log_level: str | None = None) -> AvatarServer:
    """The app and the uvicorn server that runs it, as `avatar serve` and the tests use
    them."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level or settings.log_level,
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,  # frames are compressed already
        timeout_graceful_shutdown=HTTP_GRACE_S,
        lifespan="on",
    )
    return AvatarServer(config, app)
