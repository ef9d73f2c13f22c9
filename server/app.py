"""The application factory: `create_app(settings)` wires settings, runtimes, store, batcher
and routes; the lifespan builds everything heavy, warms it up, and takes it down again.

Start-up fails loudly and completely (never half up) when the weights, the runtime or the
store cannot be opened; /readyz turns true only after the warm-up. Shutdown runs the other
way round (`drain`): readiness false first, then open streams finish the frames they
accepted and close with 1012 and a reason, then the runtimes and the store are released.
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

from server.backends import BackendError, Backends, open_backends
from server.batcher import FrameBatcher, choose_batch_size, warmup_inputs
from server.errors import install_error_handlers
from server.keys import KeyStore
from server.limits import RateCounter
from server.metrics import Metrics
from server.protocol import StreamConfig
from server.registration import Registrar, WeightsInfo
from server.runtime.base import FrameRuntime, RegistrationRuntime, RuntimeFailure
from server.security import install_middleware
from server.session import SessionRegistry, StreamServices
from server.settings import Settings, is_loopback
from server.store.base import CachedStore

logger = logging.getLogger(__name__)

API_VERSION = "0.1.0"
SHUTDOWN_MESSAGE = "the server is shutting down; reconnect (another replica can serve you)"


class StartupError(RuntimeError):
    """The server cannot start; the message says what to fix."""


@dataclass
class AppServices:
    """Everything the routes use, built by the lifespan."""

    settings: Settings
    metrics: Metrics
    store: CachedStore
    backends: Backends
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
    draining: bool = False  # shutting down: /readyz false, no new streams

    @property
    def sessions(self) -> SessionRegistry:
        return self.stream.registry

    @property
    def keys(self) -> KeyStore:
        return self.backends.keys

    @property
    def counters(self) -> RateCounter:
        return self.backends.counters


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


def open_stores(settings: Settings) -> Backends:
    """The avatar, key and counter stores named by the settings."""
    try:
        backends = open_backends(settings)
    except BackendError as error:
        raise StartupError(str(error)) from error

    if not settings.api_keys:
        logger.warning(
            "API KEYS ARE OFF: every caller can register, list, stream and delete every "
            "avatar. %s",
            f"Only this machine can reach {settings.host}." if is_loopback(settings.host)
            else f"{settings.host} is reachable from the network "
            "(AVATAR_ALLOW_UNAUTHENTICATED_NETWORK): a front must authenticate callers.",
        )
    else:
        try:
            active = backends.keys.count_active()
        except Exception as error:
            backends.close()
            raise StartupError(f"key store: cannot read the API keys: {error}") from error
        if active == 0:
            logger.warning(
                "API keys are on but none exists yet: every call will get 401 until "
                "`avatar keys create --name NAME` makes one"
            )
        else:
            logger.info("API keys on: %d active key(s)", active)
    return backends


def check_startup(settings: Settings) -> None:
    """What `avatar serve` checks before uvicorn starts, for a clear message instead of a
    traceback: the weight bundle, and that the stores open."""
    load_weights(settings)
    try:
        open_backends(settings).close()
    except BackendError as error:
        raise StartupError(str(error)) from error


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
            engine_dir=settings.engine_dir,
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

    backends = await asyncio.to_thread(open_stores, settings)
    store = CachedStore(backends.avatars, settings.cache_avatars)
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
        max_message_bytes=settings.ws_max_message_bytes,
        max_messages_per_s=settings.ws_max_messages_per_s,
        burst_messages=settings.ws_burst_messages,
        idle_timeout_s=settings.ws_idle_timeout_s,
        drain_timeout_s=settings.drain_timeout_s,
    )
    subscribe_store_events(store, stream.registry)
    return AppServices(
        settings=settings,
        metrics=metrics,
        store=store,
        backends=backends,
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


def subscribe_store_events(store: CachedStore, registry: SessionRegistry) -> None:
    """With a shared store: forget cached avatars another replica replaced or deleted, and
    close this replica's streams of a deleted one."""
    inner = store.inner
    subscribe = getattr(inner, "subscribe", None)
    if not store.shared or subscribe is None:
        return
    loop = asyncio.get_running_loop()

    def on_event(kind: str, avatar_id: str) -> None:  # the listener's thread
        store.invalidate(avatar_id)
        if kind == "deleted":
            loop.call_soon_threadsafe(registry.close_avatar, avatar_id)

    subscribe(on_event)


async def drain(services: AppServices) -> None:
    """Readiness off and new streams refused; open streams send the frames of the poses
    they accepted, then close with 1012 and a reason. Safe to call twice."""
    services.draining = True
    closing = services.sessions.close_all("shutting_down", SHUTDOWN_MESSAGE, drain=True)
    if closing:
        logger.info("draining %d stream(s)", closing)
    deadline = time.perf_counter() + services.settings.drain_timeout_s + 2.0
    while len(services.sessions) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    if len(services.sessions):
        logger.warning("%d stream(s) still open after the drain", len(services.sessions))


async def stop_services(services: AppServices) -> None:
    """Streams drained (if no one did it yet), then everything released; the store last,
    after the registrations in flight have finished writing."""
    await drain(services)
    services.ready = False

    await services.batcher.close()
    for executor in (
        services.encode_executor, services.registration_executor, services.landmark_executor
    ):
        executor.shutdown(wait=True)
    services.registrar.pipeline.close()
    services.store.close()  # closes the backends' avatar store
    services.backends.keys.close()
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
    install_middleware(app, settings, metrics.count_error)
    app.include_router(avatars_router)
    app.include_router(stream_router)
    app.include_router(health_router)
    app.include_router(web_router)
    return app
