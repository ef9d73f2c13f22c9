"""Command-line faces of the server: serve, register, drive, bench stream.

Plain typer-annotated functions; server/cli.py attaches them to the `avatar` command.
Heavy imports (uvicorn, mediapipe, OpenCV) happen inside the function bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from server.client import DEFAULT_URL

logger = logging.getLogger(__name__)

SAMPLE_PHOTO = Path(__file__).resolve().parent / "static" / "sample.jpg"

ServerOption = Annotated[str, typer.Option("--server", help="Base URL of the server.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="AVATAR_API_KEY", show_envvar=False,
        help="API key, when the server needs one [AVATAR_API_KEY].",
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def serve_command(
    host: Annotated[str | None, typer.Option(help="Address to bind [AVATAR_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [AVATAR_PORT].")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Frame runtime, or auto [AVATAR_RUNTIME].")
    ] = None,
    store_url: Annotated[
        str | None, typer.Option(help="Avatar store; empty: embedded [AVATAR_STORE_URL].")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded store folder [AVATAR_DATA_DIR].")
    ] = None,
    weights_dir: Annotated[
        Path | None, typer.Option(help="Weight bundle folder [AVATAR_WEIGHTS_DIR].")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch; 0 measures [AVATAR_MAX_BATCH].")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error [AVATAR_LOG_LEVEL].")
    ] = None,
    api_keys: Annotated[
        bool | None,
        typer.Option(
            "--api-keys/--no-api-keys",
            help="Require API keys (from `avatar keys create`) [AVATAR_API_KEYS].",
        ),
    ] = None,
    allow_unauthenticated_network: Annotated[
        bool | None,
        typer.Option(
            "--allow-unauthenticated-network",
            help="Serve a non-loopback address without keys (a front authenticates) "
            "[AVATAR_ALLOW_UNAUTHENTICATED_NETWORK].",
        ),
    ] = None,
) -> None:
    """Run the avatar server (uvicorn). Every setting is also an AVATAR_* variable."""
    from server.app import StartupError, check_startup
    from server.lifecycle import make_server

    settings = load_settings(
        host=host, port=port, runtime=runtime, store_url=store_url, data_dir=data_dir,
        weights_dir=weights_dir, max_batch=max_batch, log_level=log_level,
        api_keys=api_keys, allow_unauthenticated_network=allow_unauthenticated_network,
    )

    # weights and stores are checked before uvicorn starts: a clear message, no traceback
    try:
        check_startup(settings)
    except StartupError as error:
        raise _fail(str(error), code=2) from None

    make_server(settings).run()


def load_settings(**flags: Any) -> Any:
    """Settings from the environment and the flags given; exit 2 naming each bad value."""
    from pydantic import ValidationError

    from server.settings import Settings

    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "settings"
            message = str(item["msg"]).removeprefix("Value error, ")
            typer.echo(f"error: {where}: {message}", err=True)
        raise typer.Exit(2) from None


def register_command(
    photo: Annotated[Path, typer.Argument(help="Portrait photo: JPEG, PNG or WebP.")],
    server: ServerOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register an avatar from a photo; prints its id."""
    from server.client import AvatarClient, ClientError

    if not photo.is_file():
        raise _fail(f"no such file: {photo}")
    with AvatarClient(server, api_key=api_key) as client:
        try:
            avatar = client.register(photo)
        except ClientError as error:
            raise _fail(f"{error.code}: {error.message}") from None
    if json_out:
        typer.echo(json.dumps(avatar))
        return
    typer.echo(avatar["id"])
    timings = avatar["timings_ms"]
    typer.echo(
        f"registered {photo.name}: {avatar['num_faces']} face(s), "
        f"{timings['total']:.0f} ms ({avatar['preset']} weights)",
        err=True,
    )


def drive_command(
    avatar_id: Annotated[str, typer.Argument(help="Avatar id (from `avatar register`).")],
    video: Annotated[Path, typer.Option("--video", help="Driver video (any OpenCV format).")],
    out: Annotated[Path, typer.Option("--out", help="Output video (.mp4).")],
    server: ServerOption = DEFAULT_URL,
    motion: Annotated[str, typer.Option(help="relative or absolute.")] = "relative",
    max_frames: Annotated[int, typer.Option(help="Stop after this many frames; 0: all.")] = 0,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Animate an avatar with the head motion of a driver video; writes an mp4."""
    import cv2

    from models.pose import FrameTracker, PoseError
    from server.client import AvatarClient, ClientError, StreamClosed

    if not video.is_file():
        raise _fail(f"no such file: {video}")
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise _fail(f"OpenCV cannot open {video}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))

    with AvatarClient(server, api_key=api_key) as client:
        try:
            avatar = client.get_avatar(avatar_id)
        except ClientError as error:
            raise _fail(f"{error.code}: {error.message}") from None
        size = avatar["image_size"]
        writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
        tracker = FrameTracker(size)
        started = time.perf_counter()
        written = no_face = 0
        last_points: np.ndarray | None = None
        try:
            with client.stream(avatar_id, format="jpeg", quality=92, motion=motion) as stream:
                seq = 0
                while not max_frames or seq < max_frames:
                    ok, bgr = capture.read()
                    if not ok:
                        break

                    # the driver's landmarks; a frame without a face repeats the last pose
                    try:
                        points = tracker.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).points
                        last_points = points
                    except PoseError:
                        no_face += 1
                        if last_points is None:
                            continue
                        points = last_points

                    stream.send_pose(seq, points, normalised=False, width=width, height=height)
                    frame = stream.receive_frame()
                    writer.write(cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
                    written += 1
                    seq += 1
        except StreamClosed as closed:
            raise _fail(f"the server closed the stream ({closed.code}): {closed.reason}") from None
        finally:
            writer.release()
            capture.release()
            tracker.close()

    summary = {
        "frames": written,
        "no_face": no_face,
        "seconds": round(time.perf_counter() - started, 2),
        "out": str(out),
    }
    typer.echo(json.dumps(summary) if json_out else
               f"wrote {written} frames to {out} ({no_face} driver frames without a face)")


def _resident_mb(metrics_text: str) -> float | None:
    """process_resident_memory_bytes of a Prometheus text, in MB."""
    for line in metrics_text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return round(float(line.split()[1]) / 1e6, 1)
    return None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    array = np.asarray(values)
    return {name: round(float(np.percentile(array, q)), 2)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}


async def _bench_stream(
    server: str, avatar: dict, index: int, fps: float, seconds: float, fmt: str,
    api_key: str | None,
) -> dict[str, Any]:
    """One paced stream: poses at `fps` for `seconds`, latency from send to frame."""
    from server.client import AsyncAvatarClient, StreamClosed
    from server.protocol import FrameMessage

    pose = np.asarray(avatar["source_pose"], np.float32)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    received = 0
    stats: dict[str, Any] = {}
    closed: dict[str, Any] | None = None  # how the server closed the stream, if it did

    async with AsyncAvatarClient(server, api_key=api_key) as client:
        stream = await client.stream(avatar["id"], format=fmt)

        async def receive() -> None:
            nonlocal received, stats, closed
            while True:
                try:
                    message = await stream.receive()
                except StreamClosed as error:
                    closed = {"code": error.code, "reason": error.reason}
                    return
                now = time.perf_counter()
                if isinstance(message, FrameMessage):
                    received += 1
                    sent = sent_at.pop(message.seq, None)
                    if sent is not None:
                        latencies.append((now - sent) * 1000.0)
                elif message.get("type") == "stats":
                    stats = message

        reader = asyncio.create_task(receive())
        period = 1.0 / fps
        start = time.perf_counter() + index * period / 7  # streams out of phase
        count = int(seconds * fps)
        sent = 0
        for seq in range(count):
            delay = start + seq * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if reader.done():
                break  # the server closed the stream
            nod = np.tile([0.0, 0.03 * np.sin(seq / 6 + index)], 68).astype(np.float32)
            sent_at[seq] = time.perf_counter()
            try:
                await stream.send_pose(seq, np.clip(pose + nod, -1, 1), normalised=True)
            except StreamClosed:
                break
            sent += 1

        # let the frames in flight arrive (the newest pose is never dropped)
        deadline = time.perf_counter() + 2.0
        while sent - 1 in sent_at and not reader.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await stream.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    return {"sent": sent, "received": received, "latencies": latencies, "stats": stats,
            "closed": closed if sent < count else None}


def bench_stream_command(
    server: ServerOption = DEFAULT_URL,
    streams: Annotated[int, typer.Option(min=1, help="Concurrent streams.")] = 1,
    fps: Annotated[float, typer.Option(min=0.1, help="Poses per second per stream.")] = 30.0,
    seconds: Annotated[float, typer.Option(min=0.5, help="Duration of the run.")] = 10.0,
    avatar: Annotated[
        str | None, typer.Option(help="Avatar id; default: register the sample photo.")
    ] = None,
    format: Annotated[str, typer.Option(help="jpeg, webp or raw.")] = "jpeg",
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
) -> None:
    """Drive real WebSocket streams at a fixed pose rate; report fps, latency and the
    server's resident memory over the run (a soak with --seconds 600)."""
    from server.client import AvatarClient, ClientError

    with AvatarClient(server, api_key=api_key) as client:
        try:
            info = client.get_avatar(avatar) if avatar else client.register(SAMPLE_PHOTO)
        except ClientError as error:
            raise _fail(f"{error.code}: {error.message}") from None

    rss: list[float] = []

    async def sample_memory(done: asyncio.Event) -> None:
        """The server's resident set every few seconds (from its /metrics)."""
        from server.client import AsyncAvatarClient

        interval = min(max(seconds / 30.0, 1.0), 20.0)
        async with AsyncAvatarClient(server, api_key=api_key) as client:
            while True:
                value = _resident_mb(await client.metrics())
                if value is not None:
                    rss.append(value)
                try:
                    await asyncio.wait_for(done.wait(), interval)
                except TimeoutError:
                    continue
                value = _resident_mb(await client.metrics())
                if value is not None:
                    rss.append(value)
                return

    async def run_all() -> list[dict[str, Any]]:
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(done))
        try:
            return await asyncio.gather(*(
                _bench_stream(server, info, index, fps, seconds, format, api_key)
                for index in range(streams)
            ))
        finally:
            done.set()
            await asyncio.gather(sampler, return_exceptions=True)

    started = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed = time.perf_counter() - started

    frames = sum(r["received"] for r in results)
    sent = sum(r["sent"] for r in results)
    latencies = [ms for r in results for ms in r["latencies"]]
    report = {
        "streams": streams,
        "fps_delivered": round(frames / seconds / streams, 2),
        "frames": frames,
        "dropped": sent - frames,
        "latency_ms": _percentiles(latencies),
        "fps_target": fps,
        "fps_total": round(frames / seconds, 2),
        "seconds": round(elapsed, 2),
        "avatar": info["id"],
        "closed_early": [r["closed"] for r in results if r["closed"] is not None],
        "server_rss_mb": {
            "start": rss[0] if rss else None,
            "end": rss[-1] if rss else None,
            "max": max(rss) if rss else None,
            "samples": len(rss),
        },
    }
    early = report["closed_early"]
    if json_out:
        typer.echo(json.dumps(report))
        if early:
            raise typer.Exit(1)
        return
    lat = report["latency_ms"]
    typer.echo(
        f"{streams} stream(s) at {fps:g} fps for {seconds:g} s: "
        f"{report['fps_delivered']} fps delivered per stream, {frames} frames, "
        f"{report['dropped']} dropped; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms"
    )
    memory = report["server_rss_mb"]
    if memory["samples"]:
        typer.echo(
            f"server resident memory: {memory['start']} MB at the start, {memory['end']} MB "
            f"at the end, {memory['max']} MB at most ({memory['samples']} samples)"
        )
    if early:
        raise _fail(f"{len(early)} stream(s) closed by the server before the end: {early[0]}")
