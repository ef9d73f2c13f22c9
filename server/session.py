"""The WebSocket stream session: an explicit state machine and the tasks that run it.

`StreamProtocol` is the pure part (no I/O): states, transitions, message validation.

    AWAITING_HELLO --hello--> STREAMING --(client close | error | delete | shutdown)--> CLOSED
                   --anything else: ProtocolError--------------------------------------^

`StreamSession` runs one connection with three tasks:

- reader: receives every message as it arrives, validates it (the state machine) and
  puts poses into the pending queue; a full queue drops its oldest pose (counted), so a
  client sending faster than the server renders never builds a backlog;
- worker: takes the oldest pending pose, finds landmarks (camera input), maps the motion,
  renders through the shared batcher, encodes off the event loop. It starts the next
  frame only once the previous one has been handed to the socket, so a client that stops
  reading holds at most one encoded frame in server memory;
- sender: sends the frame and the JSON events (stats every few seconds, warnings).

Any task's end ends the session: a protocol error closes with its close code and a reason
naming what was expected and what arrived; other sessions are not affected. The reader
also enforces the stream limits: message size, message rate (a token bucket) and the idle
timeout.

Shutdown drains instead: the reader stops, the worker renders the poses already accepted,
the sender sends their frames and a last stats event, then the session closes with 1012
and a reason. A client never sees a frame cut off, and always learns why it was closed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import simplejpeg
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from models.pose import FaceLandmarks, PoseError
from server.batcher import FrameBatcher
from server.encode import decode_jpeg, encode_frame
from server.limits import TokenBucket
from server.metrics import Metrics
from server.motion import MotionMapper
from server.protocol import (
    PROTOCOL_VERSION,
    FrameTimings,
    ProtocolError,
    StreamConfig,
    apply_config,
    close_reason,
    event,
    pack_frame,
    parse_camera,
    parse_pose,
    parse_text,
)
from server.store.base import Avatar

logger = logging.getLogger(__name__)

SEND_ERROR_TIMEOUT_S = 1.0  # a client that stops reading still gets closed promptly


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass
class PoseJob:
    """One driver input waiting to be rendered."""

    seq: int
    received: float  # perf_counter seconds
    points: np.ndarray | None = None  # [68, 2] pose input
    normalised: bool = False
    jpeg: bytes | None = None  # camera input


class StreamProtocol:
    """The session's state machine: what may arrive when, and what it means."""

    def __init__(self, defaults: StreamConfig, max_image_pixels: int) -> None:
        self.state = SessionState.AWAITING_HELLO
        self.config = defaults
        self.max_image_pixels = max_image_pixels

    def on_text(self, text: str) -> dict[str, Any]:
        """A JSON message; returns it parsed (type hello, config or reset)."""
        if self.state is SessionState.CLOSED:
            raise ProtocolError("unexpected_message", "the session is closed")
        message = parse_text(text)
        kind = message["type"]

        if self.state is SessionState.AWAITING_HELLO:
            if kind != "hello":
                raise ProtocolError(
                    "unexpected_message", f"expected a hello message first, got {kind!r}"
                )
            self.config = apply_config(self.config, message)
            self.state = SessionState.STREAMING
            return message

        if kind == "hello":
            raise ProtocolError(
                "unexpected_message", "expected config, reset or binary input, got a second "
                "hello"
            )
        if kind == "config":
            self.config = apply_config(self.config, message)
        return message

    def on_bytes(self, data: bytes, received: float) -> PoseJob:
        """A binary message: a pose or a camera frame, as the input mode says."""
        if self.state is SessionState.AWAITING_HELLO:
            raise ProtocolError(
                "unexpected_message", f"expected a JSON hello first, got a binary message "
                f"of {len(data)} bytes"
            )
        if self.state is SessionState.CLOSED:
            raise ProtocolError("unexpected_message", "the session is closed")

        if self.config.input == "pose":
            pose = parse_pose(data)
            return PoseJob(
                seq=pose.seq, received=received, points=pose.points, normalised=pose.normalised
            )

        camera = parse_camera(data)
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(camera.jpeg)
        except ValueError as error:
            raise ProtocolError(
                "bad_image", f"camera seq {camera.seq}: expected a JPEG, got unreadable "
                f"header ({error})"
            ) from error
        if width * height > self.max_image_pixels:
            raise ProtocolError(
                "bad_image", f"camera seq {camera.seq}: expected at most "
                f"{self.max_image_pixels} pixels, got {width}x{height}"
            )
        return PoseJob(seq=camera.seq, received=received, jpeg=camera.jpeg)

    def close(self) -> None:
        self.state = SessionState.CLOSED


class PendingQueue:
    """At most `capacity` jobs; putting into a full queue drops the oldest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[PoseJob] = deque()
        self._ready = asyncio.Event()

    def put(self, job: PoseJob) -> PoseJob | None:
        """Queue a job; returns the job it pushed out, if any."""
        dropped = self._items.popleft() if len(self._items) >= self.capacity else None
        self._items.append(job)
        self._ready.set()
        return dropped

    async def get(self) -> PoseJob:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class Tracker(Protocol):
    """Landmarks of a stream's frames (models.pose.FrameTracker)."""

    def detect(self, image_rgb: np.ndarray) -> FaceLandmarks: ...

    def close(self) -> None: ...


@dataclass
class StreamServices:
    """What every session shares."""

    batcher: FrameBatcher
    metrics: Metrics
    encode_executor: Executor
    landmark_executor: Executor
    tracker_factory: Callable[[], Tracker]
    defaults: StreamConfig
    max_pending: int
    stats_interval_s: float
    max_image_pixels: int
    max_message_bytes: int = 64 * 1024 * 1024
    max_messages_per_s: float = 0.0  # 0: no limit
    burst_messages: int = 1
    idle_timeout_s: float = 0.0  # 0: never
    drain_timeout_s: float = 5.0
    registry: SessionRegistry = field(default_factory=lambda: SessionRegistry())


class SessionClosed(Exception):
    """Asked from outside to close (avatar deleted, shutdown); `drain`: finish the frames
    of the poses already accepted first."""

    def __init__(self, code: str, message: str, drain: bool = False) -> None:
        super().__init__(message)
        self.error = ProtocolError(code, message)
        self.drain = drain


class StreamSession:
    """One WebSocket stream of one avatar."""

    def __init__(
        self,
        websocket: WebSocket,
        avatar_id: str,
        services: StreamServices,
        owner: str | None = None,
    ) -> None:
        self.websocket = websocket
        self.avatar_id = avatar_id
        self.owner = owner  # the API key id that opened it (None without keys)
        self.services = services
        self.protocol = StreamProtocol(services.defaults, services.max_image_pixels)
        self.avatar: Avatar | None = None
        self.motion: MotionMapper | None = None
        self.tracker: Tracker | None = None

        self._pending = PendingQueue(services.max_pending)
        self._outbox: bytes | None = None
        self._outbox_received = 0.0
        self._events: deque[str] = deque(maxlen=16)
        self._wake = asyncio.Event()
        self._frame_free = asyncio.Event()
        self._frame_free.set()
        self._busy = False  # the worker holds a pose whose frame is not handed over yet
        self._sending = False  # the sender is writing a message to the socket
        self._closing: asyncio.Future[SessionClosed] | None = None

        # counters, reported in stats events
        self.received = 0
        self.rendered = 0
        self.sent = 0
        self.dropped = 0
        self.no_face = 0
        self._window_latency: list[float] = []
        self._window_sent = 0
        self._window_start = time.perf_counter()

    # ------------------------------------------------------------ outside control

    def request_close(self, code: str, message: str, drain: bool = False) -> None:
        """Close this session soon with a protocol error code (delete, shutdown); with
        `drain`, after the frames of the poses already accepted are sent."""
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(SessionClosed(code, message, drain))

    # ------------------------------------------------------------ run

    async def refuse(self, error: ProtocolError) -> None:
        """Accept the connection only to close it with `error` (unknown avatar, ...)."""
        await self.websocket.accept()
        self.protocol.close()
        await self._close_with(error)
        logger.info("stream %s refused: %s", self.avatar_id, error.code)

    async def run(self, avatar: Avatar) -> None:
        """Serve the connection until it ends; never raises."""
        registry = self.services.registry
        registry.add(self)  # the route admitted it already; adding again changes nothing
        self._closing = asyncio.get_running_loop().create_future()
        self.services.metrics.sessions_open.inc()
        try:
            await self.websocket.accept()
        except BaseException:
            registry.remove(self)
            self.services.metrics.sessions_open.dec()
            raise
        self.avatar = avatar
        self.motion = MotionMapper(self.protocol.config.motion, avatar.source_pose)

        reader = asyncio.ensure_future(self._read())
        worker = asyncio.ensure_future(self._work())
        sender = asyncio.ensure_future(self._send())
        tasks: list[asyncio.Future[Any]] = [reader, worker, sender, self._closing]
        error: ProtocolError | None = None
        try:
            # the worker and the sender idle until hello; attach to the batcher then
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = next((e for e in map(self._outcome, done) if e is not None), None)
            closing = self._closing
            if closing in done and not closing.cancelled() and closing.result().drain:
                reader.cancel()
                await self._finish(worker, sender)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            attached = self.protocol.state is SessionState.STREAMING
            self.protocol.close()
            registry.remove(self)
            self.services.metrics.sessions_open.dec()
            if attached:
                self.services.batcher.detach()
            await self._release_tracker()

        if error is not None:
            await self._close_with(error)
        logger.info(
            "stream %s closed: %d received, %d sent, %d dropped%s",
            self.avatar_id, self.received, self.sent, self.dropped,
            f", {error.code}" if error else "",
        )

    async def _finish(self, worker: asyncio.Future[Any], sender: asyncio.Future[Any]) -> None:
        """Drain: the poses already accepted are rendered and their frames sent, then a
        last stats event; bounded by drain_timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.services.drain_timeout_s

        def running() -> bool:
            return not worker.done() and not sender.done() and loop.time() < deadline

        def pending_frames() -> bool:
            return bool(self._busy or len(self._pending) or self._outbox is not None)

        while running() and (pending_frames() or self._sending):
            await asyncio.sleep(0.005)
        if self.protocol.state is SessionState.STREAMING:
            self._push_event(self._stats_event(time.perf_counter()))
        while running() and (self._events or self._sending):
            await asyncio.sleep(0.005)

    def _outcome(self, finished: asyncio.Future[Any]) -> ProtocolError | None:
        """The close to send, from whichever task ended first (None: the client left)."""
        if finished.cancelled():
            return None
        failure = finished.exception()
        if finished is self._closing:
            return finished.result().error
        if failure is None or isinstance(failure, CLIENT_GONE):
            return None
        if isinstance(failure, ProtocolError):
            return failure
        logger.error("stream %s failed: %r", self.avatar_id, failure, exc_info=failure)
        return ProtocolError("internal", f"server error: {type(failure).__name__}")

    async def _close_with(self, error: ProtocolError) -> None:
        """Tell the client (error event, then close frame), within a bounded time."""
        self.services.metrics.count_error(error.code)
        socket = self.websocket
        if socket.application_state != WebSocketState.CONNECTED:
            return
        try:
            async with asyncio.timeout(SEND_ERROR_TIMEOUT_S):
                await socket.send_text(event("error", code=error.code, message=error.message))
        except (TimeoutError, OSError, RuntimeError):
            pass
        except Exception as failure:  # the socket may be gone in framework-specific ways
            logger.debug("error event not sent: %r", failure)
        try:
            async with asyncio.timeout(SEND_ERROR_TIMEOUT_S):
                await socket.close(error.close_code, close_reason(error.message))
        except Exception as failure:
            logger.debug("close frame not sent: %r", failure)

    # ------------------------------------------------------------ reader

    async def _read(self) -> None:
        services = self.services
        idle = services.idle_timeout_s or None
        bucket = TokenBucket(services.max_messages_per_s, services.burst_messages)
        while True:
            try:
                async with asyncio.timeout(idle):
                    message = await self.websocket.receive()
            except TimeoutError:
                raise ProtocolError(
                    "idle_timeout", f"expected a message at least every {idle:g} s, got none "
                    f"for {idle:g} s"
                ) from None
            kind = message["type"]
            if kind == "websocket.disconnect":
                raise ConnectionClosed(message.get("code", 1005))
            received = time.perf_counter()

            text, data = message.get("text"), message.get("bytes")
            size = len(text.encode()) if text is not None else len(data or b"")
            if size > services.max_message_bytes:
                raise ProtocolError(
                    "message_too_big", f"expected messages of at most "
                    f"{services.max_message_bytes} bytes, got {size}"
                )
            if not bucket.take(received):
                raise ProtocolError(
                    "rate_limited", f"expected at most {services.max_messages_per_s:g} "
                    f"messages per second (bursts of {services.burst_messages}), got more"
                )

            if text is not None:
                self._on_text(text)
                continue
            if data is None:
                continue
            job = self.protocol.on_bytes(data, received)
            self.received += 1
            dropped = self._pending.put(job)
            if dropped is not None:
                self.dropped += 1
                self.services.metrics.frames_dropped.inc()

    def _on_text(self, text: str) -> None:
        was = self.protocol.state
        previous = self.protocol.config
        message = self.protocol.on_text(text)
        config = self.protocol.config

        if was is SessionState.AWAITING_HELLO:
            self.services.batcher.attach()
        changed = config.motion != previous.motion or config.input != previous.input
        if message["type"] == "reset" or changed:
            assert self.avatar is not None  # set before the reader starts
            self.motion = MotionMapper(config.motion, self.avatar.source_pose)
        if message["type"] in ("hello", "config"):
            self._push_event(self._ready_event())
        self._wake.set()

    def _ready_event(self) -> str:
        assert self.avatar is not None
        size = self.avatar.meta.image_size
        return event(
            "ready", protocol=PROTOCOL_VERSION, avatar=self.avatar_id, width=size,
            height=size, max_pending=self._pending.capacity, **self.protocol.config.to_dict(),
        )

    # ------------------------------------------------------------ worker

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        services = self.services
        assert self.avatar is not None
        avatar = self.avatar

        while True:
            await self._frame_free.wait()  # never render ahead of an unsent frame
            job = await self._pending.get()
            self._busy = True
            config = self.protocol.config

            # camera input: landmarks first (worker thread)
            landmarks_ms = 0.0
            if job.jpeg is not None:
                started = time.perf_counter()
                try:
                    points = await loop.run_in_executor(
                        services.landmark_executor, self._landmarks, job.jpeg, job.seq
                    )
                except PoseError as error:
                    self.no_face += 1
                    self._push_event(event(
                        "warning", code=error.code, seq=job.seq, message=error.message
                    ))
                    self._busy = False
                    continue
                landmarks_ms = (time.perf_counter() - started) * 1000.0
                normalised = False
            else:
                assert job.points is not None
                points, normalised = job.points, job.normalised

            assert self.motion is not None
            pose = self.motion(points, normalised)  # [136]
            result = await services.batcher.render(pose, avatar.texture, avatar.params)

            started = time.perf_counter()
            payload = await loop.run_in_executor(
                services.encode_executor, encode_frame, result.frame, config.format,
                config.quality,
            )
            done = time.perf_counter()
            height, width = result.frame.shape[:2]
            timings = FrameTimings(
                landmarks_ms=landmarks_ms,
                queue_ms=result.queue_ms,
                render_ms=result.render_ms,
                encode_ms=(done - started) * 1000.0,
                total_ms=(done - job.received) * 1000.0,
            )
            self.rendered += 1

            # hand over to the sender; the next frame waits until this one is out
            self._frame_free.clear()
            self._outbox = pack_frame(
                job.seq, config.format, width, height, result.batch, timings, payload
            )
            self._outbox_received = job.received
            self._busy = False
            self._wake.set()

    def _landmarks(self, jpeg: bytes, seq: int) -> np.ndarray:
        """Landmarks [68, 2] (pixels) of a camera frame (worker thread)."""
        try:
            image = decode_jpeg(jpeg)  # [H, W, 3]
        except ValueError as error:
            raise ProtocolError(
                "bad_image", f"camera seq {seq}: expected a decodable JPEG, got {error}"
            ) from error
        if self.tracker is None:
            self.tracker = self.services.tracker_factory()
        return self.tracker.detect(image).points

    async def _release_tracker(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            await asyncio.get_running_loop().run_in_executor(
                self.services.landmark_executor, tracker.close
            )

    # ------------------------------------------------------------ sender

    def _push_event(self, text: str) -> None:
        self._events.append(text)
        self._wake.set()

    async def _send(self) -> None:
        interval = self.services.stats_interval_s
        next_stats = time.perf_counter() + interval
        socket = self.websocket
        latency = self.services.metrics.frame_latency.labels(source="stream")

        while True:
            timeout = max(0.0, next_stats - time.perf_counter())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()

            now = time.perf_counter()
            if now >= next_stats:
                next_stats = now + interval
                if self.protocol.state is SessionState.STREAMING:
                    self._events.append(self._stats_event(now))

            while self._events:
                self._sending = True
                await socket.send_text(self._events.popleft())
                self._sending = False

            if self._outbox is not None:
                data, received = self._outbox, self._outbox_received
                self._outbox = None
                self._sending = True
                await socket.send_bytes(data)
                self._sending = False
                elapsed = time.perf_counter() - received
                latency.observe(elapsed)
                self._window_latency.append(elapsed * 1000.0)
                self._window_sent += 1
                self.sent += 1
                self._frame_free.set()

    def _stats_event(self, now: float) -> str:
        window = max(now - self._window_start, 1e-6)
        latencies = self._window_latency
        quantiles: dict[str, float | None] = {"p50": None, "p95": None, "max": None}
        if latencies:
            values = np.asarray(latencies)
            quantiles = {
                "p50": round(float(np.percentile(values, 50)), 2),
                "p95": round(float(np.percentile(values, 95)), 2),
                "max": round(float(values.max()), 2),
            }
        text = event(
            "stats",
            received=self.received,
            rendered=self.rendered,
            sent=self.sent,
            dropped=self.dropped,
            no_face=self.no_face,
            pending=len(self._pending),
            fps=round(self._window_sent / window, 2),
            latency_ms=quantiles,
        )
        self._window_latency = []
        self._window_sent = 0
        self._window_start = now
        return text


class ConnectionClosed(Exception):
    """The client closed the connection (or it dropped)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"connection closed with code {code}")
        self.code = code


# what a task raises when the client has gone: nothing left to tell it
CLIENT_GONE = (ConnectionClosed, WebSocketDisconnect, OSError)


class SessionRegistry:
    """Open sessions, by avatar: deletes and shutdown reach every stream they concern; by
    owner: the per-key stream limit."""

    def __init__(self) -> None:
        self._sessions: set[StreamSession] = set()

    def add(self, session: StreamSession) -> None:
        self._sessions.add(session)

    def admit(
        self, session: StreamSession, max_total: int, max_per_owner: int
    ) -> ProtocolError | None:
        """Register a new session unless a limit is reached (0: no limit); the error to
        refuse it with otherwise. Checks and adds in one step, so two connections racing
        for the last place cannot both get it."""
        if max_total and len(self._sessions) >= max_total:
            return ProtocolError(
                "too_many_streams", f"expected fewer than {max_total} open streams on this "
                f"server, got {len(self._sessions)}; retry later or on another replica"
            )
        if session.owner is not None and max_per_owner:
            mine = self.of_owner(session.owner)
            if mine >= max_per_owner:
                return ProtocolError(
                    "stream_quota_exceeded", f"expected at most {max_per_owner} open "
                    f"streams per API key, this key has {mine}; close one first"
                )
        self._sessions.add(session)
        return None

    def of_owner(self, owner: str) -> int:
        return sum(1 for s in self._sessions if s.owner == owner)

    def remove(self, session: StreamSession) -> None:
        self._sessions.discard(session)

    def __len__(self) -> int:
        return len(self._sessions)

    def of_avatar(self, avatar_id: str) -> list[StreamSession]:
        return [s for s in self._sessions if s.avatar_id == avatar_id]

    def close_avatar(self, avatar_id: str) -> int:
        """Close the streams of a deleted avatar; returns how many."""
        sessions = self.of_avatar(avatar_id)
        for session in sessions:
            session.request_close("avatar_deleted", f"avatar {avatar_id} was deleted")
        return len(sessions)

    def close_all(self, code: str, message: str, drain: bool = False) -> int:
        """Close every stream (shutdown: with `drain`); returns how many."""
        sessions = list(self._sessions)
        for session in sessions:
            session.request_close(code, message, drain)
        return len(sessions)
