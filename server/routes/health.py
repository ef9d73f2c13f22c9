"""Health, readiness and metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.app import AppServices
from server.schemas import HealthOut, ReadyOut, RuntimeOut, WeightsOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """Liveness: the process answers."""
    return HealthOut()


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Starting or draining: not ready."}},
)
async def readyz(request: Request) -> Response:
    """Readiness: runtime loaded and warmed, store open, not draining; names the weights
    it runs and whether API keys are needed."""
    services: AppServices | None = request.app.state.services
    api_keys = request.app.state.settings.api_keys
    if services is None or not services.ready or services.draining:
        draining = services is not None and services.draining
        body = ReadyOut(ready=False, api_keys=api_keys, draining=draining)
        return JSONResponse(status_code=503, content=body.model_dump())

    runtime = services.frame_runtime
    body = ReadyOut(
        ready=True,
        runtime=RuntimeOut(
            name=runtime.name,
            precision=runtime.precision,
            max_batch=runtime.max_batch,
            batch=services.batcher.max_batch,
            ms_per_frame={str(b): round(ms, 3) for b, ms in services.batch_ms_per_frame.items()},
            registration=services.registration_runtime.name,
        ),
        weights=WeightsOut(**services.weights.__dict__),
        store=await asyncio.to_thread(services.store.health),
        streams=len(services.sessions),
        uptime_s=round(time.time() - services.started, 3),
        api_keys=api_keys,
    )
    return JSONResponse(content=body.model_dump())


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                     "description": "Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this server."""
    text = request.app.state.metrics.render_text()
    return Response(content=text, media_type=CONTENT_TYPE_LATEST)
