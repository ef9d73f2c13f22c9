"""The frame batcher: one scheduler per frame runtime, shared by every session.

Sessions (and REST renders) submit one pose with their avatar's state and await the
frame. The scheduler takes whatever is pending, up to the batch size, and runs one call of
the stateless per-frame graph in its own worker thread, so the event loop keeps serving
while the runtime works and the next batch gathers meanwhile (greedy batching: under load
the batch fills by itself, with no wait at all).

The wait window: when more streams are attached than the batch so far holds, the
scheduler may wait up to `wait_ms` for their poses before it runs; with one stream, or a
batch size of 1, it never waits. The batch size itself can be measured at warm-up
(`choose_batch_size`): on CPUs batch 1 is often fastest per frame, on GPUs larger batches.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.metrics import Metrics
from server.runtime.base import FrameBatch, FrameRuntime, RuntimeFailure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderResult:
    """One rendered frame and how it went."""

    frame: np.ndarray  # [H, W, 3] uint8
    mask: np.ndarray  # [H, W] uint8
    queue_ms: float  # submitted -> its batch started
    render_ms: float  # the batch call
    batch: int  # frames in that call


@dataclass
class _Job:
    pose: np.ndarray  # [136] float32
    texture: np.ndarray  # [3, H, W] float32
    params: np.ndarray  # [P] float32
    future: asyncio.Future[RenderResult]
    submitted: float  # perf_counter seconds


class BatcherClosed(RuntimeFailure):
    """The batcher is stopping and takes no more frames."""


class FrameBatcher:
    """Gathers frames from all sessions into batched runtime calls."""

    def __init__(
        self,
        runtime: FrameRuntime,
        *,
        max_batch: int,
        wait_ms: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        if not 1 <= max_batch <= runtime.max_batch:
            raise ValueError(
                f"max_batch: expected 1..{runtime.max_batch} (the runtime's limit), "
                f"got {max_batch}"
            )
        self.runtime = runtime
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.metrics = metrics
        self.attached = 0  # streams that may submit soon

        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

        # totals, for stats and tests
        self.batches = 0
        self.frames = 0

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the scheduler on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stop taking frames, finish the ones queued, stop the scheduler and its thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    def attach(self) -> None:
        """A stream started: the wait window may hold a batch open for it."""
        self.attached += 1

    def detach(self) -> None:
        self.attached = max(0, self.attached - 1)

    @property
    def pending(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------ submit

    def submit(
        self, pose: np.ndarray, texture: np.ndarray, params: np.ndarray
    ) -> asyncio.Future[RenderResult]:
        """Queue one frame; the future resolves to its RenderResult."""
        if self._closing:
            raise BatcherClosed("the frame batcher is shutting down")
        future: asyncio.Future[RenderResult] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(pose, texture, params, future, time.perf_counter()))
        self._wake.set()
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._jobs))
        return future

    async def render(
        self, pose: np.ndarray, texture: np.ndarray, params: np.ndarray
    ) -> RenderResult:
        """Render one frame through the shared batches."""
        return await self.submit(pose, texture, params)

    # ------------------------------------------------------------ scheduler

    def _take(self, batch: list[_Job]) -> None:
        while self._jobs and len(batch) < self.max_batch:
            job = self._jobs.popleft()
            if not job.future.cancelled():  # its session went away
                batch.append(job)

    async def _gather(self) -> list[_Job]:
        """The next batch: what is pending, plus what arrives within the wait window."""
        batch: list[_Job] = []
        while not batch:
            while not self._jobs:
                if self._closing:
                    return []
                self._wake.clear()
                await self._wake.wait()
            self._take(batch)

        target = min(self.max_batch, max(self.attached, 1))
        if len(batch) < target and self.wait_s > 0 and not self._closing:
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < target:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    pass
                self._take(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                return  # closing and nothing left
            if self.metrics is not None:
                self.metrics.queue_depth.set(len(self._jobs))

            started = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self._call, batch)
            except Exception as error:  # the runtime's failure belongs to its callers
                logger.error("frame batch of %d failed: %s", len(batch), error)
                failure = error if isinstance(error, RuntimeFailure) else RuntimeFailure(
                    f"{type(error).__name__}: {error}"
                )
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(failure)
                continue
            render_s = time.perf_counter() - started

            self.batches += 1
            self.frames += len(batch)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
                self.metrics.render_seconds.observe(render_s)
                self.metrics.frames_rendered.inc(len(batch))

            for index, job in enumerate(batch):
                if job.future.done():
                    continue
                job.future.set_result(RenderResult(
                    frame=result.frames[index],
                    mask=result.masks[index],
                    queue_ms=(started - job.submitted) * 1000.0,
                    render_ms=render_s * 1000.0,
                    batch=len(batch),
                ))

    def _call(self, batch: list[_Job]) -> FrameBatch:
        """One runtime call (worker thread). Batch 1 passes views, no copies."""
        if len(batch) == 1:
            job = batch[0]
            return self.runtime.render(job.pose[None], job.texture[None], job.params[None])
        poses = np.stack([job.pose for job in batch])  # [B, 136]
        textures = np.stack([job.texture for job in batch])  # [B, 3, H, W]
        params = np.stack([job.params for job in batch])  # [B, P]
        return self.runtime.render(poses, textures, params)


def warmup_inputs(runtime: FrameRuntime, batch: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Plausible inputs of the runtime's shapes: a mean-face-like pose, small random state."""
    rng = np.random.default_rng(seed)
    size = runtime.image_size
    poses = rng.uniform(-0.5, 0.5, (batch, 136)).astype(np.float32)  # [B, 136]
    textures = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)  # [B, 3, H, W]
    params = (rng.standard_normal((batch, runtime.param_count)) * 0.1).astype(np.float32)
    return poses, textures, params  # params: [B, P]


def choose_batch_size(
    runtime: FrameRuntime, limit: int, repeats: int = 3, tolerance: float = 0.10
) -> tuple[int, dict[int, float]]:
    """Measure ms per frame at batch 1, 2, 4, ... up to `limit`; keep the smallest batch
    whose time per frame is within `tolerance` of the best (smaller batches mean lower
    latency). Returns (batch, {batch: ms per frame})."""
    sizes = [1]
    while sizes[-1] * 2 <= min(limit, runtime.max_batch):
        sizes.append(sizes[-1] * 2)

    per_frame: dict[int, float] = {}
    for size in sizes:
        inputs = warmup_inputs(runtime, size)
        runtime.render(*inputs)  # first call of a shape allocates
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.render(*inputs)
            times.append(time.perf_counter() - started)
        per_frame[size] = statistics.median(times) * 1000.0 / size

    chosen = pick_batch_size(per_frame, tolerance)
    logger.info(
        "batch size %d chosen; ms per frame by batch: %s",
        chosen, ", ".join(f"{size}: {ms:.2f}" for size, ms in per_frame.items()),
    )
    return chosen, per_frame


def pick_batch_size(ms_per_frame: dict[int, float], tolerance: float = 0.10) -> int:
    """The smallest batch whose time per frame is within `tolerance` of the best."""
    best = min(ms_per_frame.values())
    return min(size for size, ms in ms_per_frame.items() if ms <= best * (1 + tolerance))
