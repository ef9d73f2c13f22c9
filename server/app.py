"""The application factory: `create_app(settings)` wires settings, runtimes, store, batcher
and routes; the lifespan builds everything heavy, warms it up, and takes it down again.

Start-up fails loudly and completely (never half up) when the weights, the runtime or the
store cannot be opened; /readyz turns true only after the warm-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from server.batcher import FrameBatcher, choose_batch_size, warmup_inputs
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.protocol import StreamConfig
from server.registration import Registrar, WeightsInfo
from server.runtime.base import FrameRuntime, RegistrationRuntime, RuntimeFailure
from server.session import SessionRegistry, StreamServices
from server.settings import Settings
from server.store.base import AvatarStore, CachedStore

logger = logging.getLogger(__name__)

API_VERSION = "0.1.0"
DRAIN_TIMEOUT_S = 5.0


class StartupError(RuntimeError):
    """The server cannot start; the message says what to fix."""


@dataclass
class AppServices:
    """Everything the routes use, built by the lifespan."""

    settings: Settings
    metrics: Metrics
    store: CachedStore
    frame_runtime: FrameRuntime
    registration_runtime: RegistrationRuntime
    batcher: FrameBatcher
    registrar: Registrar
    stream: StreamServices
    weights: WeightsInfo
    encode_executor: ThreadPoolExecutor
    registration_executor: ThreadPoolExecutor
    landmark_executor: ThreadPoolExecutor
    batch_ms_per_frame: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ready: bool = False

    @property
    def sessions(self) -> SessionRegistry:
        return self.stream.registry


def load_weights(settings: Settings) -> WeightsInfo:
    """Read and check the weight bundle's manifest."""
    from export.bundle import BundleError, load_manifest, sha256_file

    try:
        manifest = load_manifest(settings.weights_dir)
    except BundleError as error:
        raise StartupError(
            f"weights: cannot use the bundle in {settings.weights_dir} ({error}); set "
            "AVATAR_WEIGHTS_DIR to a folder made by `avatar export`"
        ) from error
    return WeightsInfo(
        preset=manifest.preset,
        image_size=manifest.image_size,
        param_count=manifest.param_count,
        checkpoint_sha256=manifest.checkpoint_sha256,
        frame_graph_sha256=sha256_file(manifest.graph_path("frame")),
        trained=manifest.trained,
        directory=str(manifest.directory),
    )


def open_store(settings: Settings) -> AvatarStore:
    """The avatar store named by the settings (embedded files + SQLite by default)."""
    from server.store.local import LocalStore

    try:
        return LocalStore(settings.store_dir)
    except OSError as error:
        raise StartupError(f"store: cannot open {settings.store_dir}: {error}") from error


def build_runtimes(settings: Settings) -> tuple[FrameRuntime, RegistrationRuntime]:
    """The frame and registration runtimes named by the settings."""
    from server.runtime.select import build_frame_runtime, build_registration_runtime

    limit = settings.max_batch or settings.batch_search_limit
    threads = settings.runtime_threads or None
    try:
        frame = build_frame_runtime(
            settings.runtime,  # type: ignore[arg-type]
            settings.weights_dir,
            max_batch=limit,
            precision=settings.precision,
            threads=threads,
        )
        kind = settings.runtime if settings.runtime in ("onnxruntime", "torch") else "auto"
        registration = build_registration_runtime(
            kind,  # type: ignore[arg-type]
            settings.weights_dir,
            threads=threads,
        )
    except (RuntimeFailure, ValueError) as error:
        raise StartupError(f"runtime: {error}") from error
    return frame, registration


def _warm_frames(runtime: FrameRuntime, settings: Settings) -> tuple[int, dict[int, float]]:
    """Pick the batch size (or take the configured one) and run the graph once at it."""
    if settings.max_batch == 0:
        return choose_batch_size(runtime, settings.batch_search_limit)
    if settings.warmup:
        runtime.render(*warmup_inputs(runtime, settings.max_batch))
        runtime.render(*warmup_inputs(runtime, 1))
    return settings.max_batch, {}


async def start_services(settings: Settings, metrics: Metrics) -> AppServices:
    """Build and warm every service; StartupError when something cannot be used."""
    from models.pose import FrameTracker, PosePipeline

    weights = await asyncio.to_thread(load_weights, settings)
    frame_runtime, registration_runtime = await asyncio.to_thread(build_runtimes, settings)
    if frame_runtime.image_size != weights.image_size:
        raise StartupError(
            f"runtime: frame graph renders {frame_runtime.image_size} px, the manifest says "
            f"{weights.image_size}"
        )

    inner = await asyncio.to_thread(open_store, settings)
    store = CachedStore(inner, settings.cache_avatars)
    pipeline = await asyncio.to_thread(PosePipeline, weights.image_size)

    registrar = Registrar(
        registration_runtime, pipeline, store, weights,
        max_upload_bytes=settings.max_upload_bytes,
        max_image_pixels=settings.max_image_pixels,
    )
    batch, table = await asyncio.to_thread(_warm_frames, frame_runtime, settings)
    if settings.warmup:
        await asyncio.to_thread(registrar.warmup)

    batcher = FrameBatcher(
        frame_runtime, max_batch=batch, wait_ms=settings.batch_wait_ms, metrics=metrics
    )
    batcher.start()

    encode_executor = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="encode")
    landmark_executor = ThreadPoolExecutor(
        settings.landmark_workers, thread_name_prefix="landmarks"
    )
    stream = StreamServices(
        batcher=batcher,
        metrics=metrics,
        encode_executor=encode_executor,
        landmark_executor=landmark_executor,
        tracker_factory=lambda: FrameTracker(weights.image_size),
        defaults=StreamConfig(format=settings.default_format, quality=settings.default_quality),
        max_pending=settings.max_pending,
        stats_interval_s=settings.stats_interval_s,
        max_image_pixels=settings.max_image_pixels,
    )
    return AppServices(
        settings=settings,
        metrics=metrics,
        store=store,
        frame_runtime=frame_runtime,
        registration_runtime=registration_runtime,
        batcher=batcher,
        registrar=registrar,
        stream=stream,
        weights=weights,
        encode_executor=encode_executor,
        registration_executor=ThreadPoolExecutor(
            settings.registration_workers, thread_name_prefix="register"
        ),
        landmark_executor=landmark_executor,
        batch_ms_per_frame=table,
    )


async def stop_services(services: AppServices) -> None:
    """Readiness off, streams told, in-flight frames finished, everything released."""
    services.ready = False
    closing = services.sessions.close_all("shutting_down", "the server is shutting down")
    deadline = time.perf_counter() + DRAIN_TIMEOUT_S
    while len(services.sessions) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    if closing:
        logger.info("closed %d stream(s) for shutdown", closing)

    await services.batcher.close()
    for executor in (
        services.encode_executor, services.registration_executor, services.landmark_executor
    ):
        executor.shutdown(wait=True)
    services.registrar.pipeline.close()
    services.store.close()
    services.frame_runtime.close()
    services.registration_runtime.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving avatars with `settings` (default: from AVATAR_* variables)."""
    from server.routes.avatars import router as avatars_router
    from server.routes.health import router as health_router
    from server.routes.stream import router as stream_router
    from server.routes.web import router as web_router

    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    logging.getLogger("server").setLevel(settings.log_level.upper())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        services = await start_services(settings, metrics)
        app.state.services = services
        services.ready = True
        logger.info(
            "ready in %.1f s: %s (%s) batch %d, weights %s (%s, trained=%s), store %s",
            time.perf_counter() - started, services.frame_runtime.name,
            services.frame_runtime.precision, services.batcher.max_batch,
            services.weights.preset, services.weights.checkpoint_sha256[:12],
            services.weights.trained, services.store.kind,
        )
        try:
            yield
        finally:
            await stop_services(services)
            app.state.services = None

    app = FastAPI(
        title="Bi-layer avatar server",
        version=API_VERSION,
        description="Register an avatar from one photo, then render it in any head pose: "
        "over REST, or streamed over the WebSocket `/avatars/{id}/stream` "
        "(protocol in docs/protocol.md).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    install_error_handlers(app, metrics.count_error)
    app.include_router(avatars_router)
    app.include_router(stream_router)
    app.include_router(health_router)
    app.include_router(web_router)
    return app
