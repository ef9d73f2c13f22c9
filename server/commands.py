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
) -> None:
    """Run the avatar server (uvicorn). Every setting is also an AVATAR_* variable."""
    import uvicorn
    from pydantic import ValidationError

    from server.app import StartupError, create_app, load_weights
    from server.settings import Settings

    flags: dict[str, Any] = {
        "host": host, "port": port, "runtime": runtime, "store_url": store_url,
        "data_dir": data_dir, "weights_dir": weights_dir, "max_batch": max_batch,
        "log_level": log_level,
    }
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "settings"
            typer.echo(f"error: {where}: {item['msg']}", err=True)
        raise typer.Exit(2) from None

    # the weights are checked before uvicorn starts: a clear message, no traceback
    try:
        load_weights(settings)
    except StartupError as error:
        raise _fail(str(error), code=2) from None

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,  # frames are compressed already
        timeout_graceful_shutdown=10,
    )


def register_command(
    photo: Annotated[Path, typer.Argument(help="Portrait photo: JPEG, PNG or WebP.")],
    server: ServerOption = DEFAULT_URL,
    json_out: JsonOption = False,
) -> None:
    """Register an avatar from a photo; prints its id."""
    from server.client import AvatarClient, ClientError

    if not photo.is_file():
        raise _fail(f"no such file: {photo}")
    with AvatarClient(server) as client:
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

    with AvatarClient(server) as client:
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


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    array = np.asarray(values)
    return {name: round(float(np.percentile(array, q)), 2)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}


async def _bench_stream(
    server: str, avatar: dict, index: int, fps: float, seconds: float, fmt: str
) -> dict[str, Any]:
    """One paced stream: poses at `fps` for `seconds`, latency from send to frame."""
    from server.client import AsyncAvatarClient, StreamClosed
    from server.protocol import FrameMessage

    pose = np.asarray(avatar["source_pose"], np.float32)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    received = 0
    stats: dict[str, Any] = {}

    async with AsyncAvatarClient(server) as client:
        stream = await client.stream(avatar["id"], format=fmt)

        async def receive() -> None:
            nonlocal received, stats
            while True:
                try:
                    message = await stream.receive()
                except StreamClosed:
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
        for seq in range(count):
            delay = start + seq * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            nod = np.tile([0.0, 0.03 * np.sin(seq / 6 + index)], 68).astype(np.float32)
            sent_at[seq] = time.perf_counter()
            await stream.send_pose(seq, np.clip(pose + nod, -1, 1), normalised=True)

        # let the frames in flight arrive (the newest pose is never dropped)
        deadline = time.perf_counter() + 2.0
        while count - 1 in sent_at and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await stream.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    return {"sent": count, "received": received, "latencies": latencies, "stats": stats}


def bench_stream_command(
    server: ServerOption = DEFAULT_URL,
    streams: Annotated[int, typer.Option(min=1, help="Concurrent streams.")] = 1,
    fps: Annotated[float, typer.Option(min=0.1, help="Poses per second per stream.")] = 30.0,
    seconds: Annotated[float, typer.Option(min=0.5, help="Duration of the run.")] = 10.0,
    avatar: Annotated[
        str | None, typer.Option(help="Avatar id; default: register the sample photo.")
    ] = None,
    format: Annotated[str, typer.Option(help="jpeg, webp or raw.")] = "jpeg",
    json_out: JsonOption = False,
) -> None:
    """Drive real WebSocket streams at a fixed pose rate; report fps and latency."""
    from server.client import AvatarClient, ClientError

    with AvatarClient(server) as client:
        try:
            info = client.get_avatar(avatar) if avatar else client.register(SAMPLE_PHOTO)
        except ClientError as error:
            raise _fail(f"{error.code}: {error.message}") from None

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.gather(*(
            _bench_stream(server, info, index, fps, seconds, format) for index in range(streams)
        ))

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
    }
    if json_out:
        typer.echo(json.dumps(report))
        return
    lat = report["latency_ms"]
    typer.echo(
        f"{streams} stream(s) at {fps:g} fps for {seconds:g} s: "
        f"{report['fps_delivered']} fps delivered per stream, {frames} frames, "
        f"{report['dropped']} dropped; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
        f"p99 {lat['p99']} ms"
    )
