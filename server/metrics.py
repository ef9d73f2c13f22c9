"""Prometheus metrics of one app, in a registry of its own (two apps in a process, as in
the tests, never share counters)."""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.frame_latency = Histogram(
            "avatar_frame_latency_seconds",
            "Pose received to frame handed to the socket (or to the REST response).",
            ["source"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.render_seconds = Histogram(
            "avatar_render_seconds", "Duration of one per-frame graph call (a whole batch).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.frames_rendered = Counter(
            "avatar_frames_rendered", "Frames rendered by the per-frame graph.", registry=r
        )
        self.frames_dropped = Counter(
            "avatar_frames_dropped",
            "Stream poses dropped because newer ones replaced them (backpressure).",
            registry=r,
        )
        self.batch_size = Histogram(
            "avatar_batch_size", "Frames per per-frame graph call.",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "avatar_queue_depth", "Frames waiting for the batcher.", registry=r
        )
        self.sessions_open = Gauge(
            "avatar_sessions_open", "WebSocket streams open.", registry=r
        )
        self.registrations = Counter(
            "avatar_registrations", "Registration attempts by outcome (ok or error code).",
            ["outcome"], registry=r,
        )
        self.registration_seconds = Histogram(
            "avatar_registration_seconds", "Duration of successful registrations.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), registry=r,
        )
        self.errors = Counter(
            "avatar_errors", "Errors returned to clients, REST and WebSocket, by code.",
            ["code"], registry=r,
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc)
        ProcessCollector(registry=r)

    def count_error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def render_text(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)
