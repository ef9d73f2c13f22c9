"""The serving commands against the live test server: register, drive, bench stream."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import typer
from typer.testing import CliRunner

from server.commands import bench_stream_command, drive_command, register_command

from .conftest import SAMPLE, RunningServer


def run(command, *args: str):
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def write_driver_video(path: Path, frames: int = 10) -> None:
    """The astronaut, turning her head a little: small shifts and rotations."""
    photo = simplejpeg.decode_jpeg(SAMPLE.read_bytes())
    photo = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (256, 256))
    for index in range(frames):
        matrix = cv2.getRotationMatrix2D((128, 110), 2.0 * np.sin(index / 2), 1.0)
        matrix[0, 2] += 3 * np.sin(index / 3)
        moved = cv2.warpAffine(photo, matrix, (256, 256), borderMode=cv2.BORDER_REFLECT)
        writer.write(cv2.cvtColor(moved, cv2.COLOR_RGB2BGR))
    writer.release()


def test_register_and_drive(live_server: RunningServer, tmp_path: Path) -> None:
    result = run(register_command, str(SAMPLE), "--server", live_server.url, "--json")
    avatar = json.loads(result.stdout)
    assert avatar["num_faces"] == 1

    driver = tmp_path / "driver.mp4"
    write_driver_video(driver)
    out = tmp_path / "out.mp4"
    result = run(
        drive_command, avatar["id"], "--video", str(driver), "--out", str(out),
        "--server", live_server.url, "--json",
    )
    summary = json.loads(result.stdout)
    assert summary["frames"] == 10 and summary["no_face"] == 0

    capture = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 10
    assert frames[0].shape == (128, 128, 3)


def test_bench_stream_prints_the_documented_json(live_server: RunningServer, astronaut) -> None:
    result = run(
        bench_stream_command, "--server", live_server.url, "--avatar", astronaut["id"],
        "--streams", "2", "--fps", "10", "--seconds", "1.5", "--json",
    )
    report = json.loads(result.stdout)
    assert {"streams", "fps_delivered", "frames", "dropped", "latency_ms"} <= set(report)
    assert report["streams"] == 2
    assert report["frames"] + report["dropped"] == 30
    assert report["frames"] > 0
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    # the server's resident set over the run (the soak's figures), nothing closed early
    memory = report["server_rss_mb"]
    assert memory["samples"] >= 2 and 10 < memory["start"] <= memory["max"]
    assert memory["end"] <= memory["max"]
    assert report["closed_early"] == []
