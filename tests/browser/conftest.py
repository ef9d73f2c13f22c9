"""Browser-test fixtures: a real server on a free port, Debian's Chromium driven by
Playwright, and a fake webcam that plays a short y4m video of a real face.

Chromium comes from Debian (`apt-get install -y chromium`), never from Playwright's own
download. Without /usr/bin/chromium the tests skip with that instruction, unless
AVATAR_BROWSER_REQUIRED=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = Path(os.environ.get("AVATAR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_TIMEOUT_S = 180.0

# the fake webcam: the astronaut in a 640x480 frame, turning a little, looping
CAMERA_SIZE = (640, 480)
CAMERA_FRAMES = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _weights_dir() -> Path:
    path = Path(os.environ.get("AVATAR_TEST_WEIGHTS_DIR", ROOT / "weights" / "demo"))
    if not (path / "manifest.json").is_file():
        pytest.fail(
            f"browser tests need a weight bundle: expected {path}/manifest.json, found none "
            "(set AVATAR_TEST_WEIGHTS_DIR to a folder made by `avatar export`)"
        )
    return path


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn serving the app on a free port, with an empty avatar store."""
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("avatar-data")
    log_path = data_dir.parent / "server.log"
    env = {
        **os.environ,
        "AVATAR_DATA_DIR": str(data_dir),
        "AVATAR_WEIGHTS_DIR": str(_weights_dir()),
        "AVATAR_MAX_BATCH": "1",  # skip the batch-size search at start-up
        "AVATAR_STATS_INTERVAL_S": "0.5",
    }
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "server.app:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        _wait_ready(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"the server exited with {process.returncode} at start-up:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).json().get("ready"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    pytest.fail(f"the server was not ready within {SERVER_START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="session")
def camera_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A y4m video of the astronaut's face (I420), for Chromium's fake camera."""
    import cv2
    from skimage.data import astronaut

    width, height = CAMERA_SIZE
    face = cv2.resize(astronaut(), (height, height), interpolation=cv2.INTER_AREA)
    canvas = np.full((height, width, 3), 96, np.uint8)
    left = (width - height) // 2
    canvas[:, left:left + height] = face  # [H, W, 3] RGB

    path = tmp_path_factory.mktemp("camera") / "astronaut.y4m"
    with path.open("wb") as video:
        video.write(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(CAMERA_FRAMES):
            # the head turns a little in the image plane and drifts sideways
            phase = 2 * math.pi * index / CAMERA_FRAMES
            turn = cv2.getRotationMatrix2D((width / 2, height / 2), 6 * math.sin(phase), 1.0)
            turn[0, 2] += 12 * math.sin(phase)
            frame = cv2.warpAffine(canvas, turn, (width, height), borderValue=(96, 96, 96))
            planes = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)  # [H * 3 / 2, W]
            video.write(b"FRAME\n" + planes.tobytes())
    return path


@pytest.fixture(scope="session")
def playwright() -> Iterator:
    """Playwright, once Debian's Chromium is known to be there."""
    if not CHROMIUM.is_file():
        message = f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium`"
        if os.environ.get("AVATAR_BROWSER_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as instance:
        yield instance


def _launch(playwright, camera_flags: list[str]):
    flags = CHROMIUM_FLAGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", *camera_flags
    ]
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=flags)


@pytest.fixture(scope="session")
def browser(playwright, camera_video: Path) -> Iterator:
    """Headless Chromium whose fake camera plays `camera_video` (a real face)."""
    chromium = _launch(playwright, [f"--use-file-for-fake-video-capture={camera_video}"])
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def faceless_browser(playwright) -> Iterator:
    """Headless Chromium with Chromium's own fake camera picture: a pattern, no face."""
    chromium = _launch(playwright, [])
    try:
        yield chromium
    finally:
        chromium.close()


def open_page(browser, server_url: str):
    """A fresh page of the site; `page.problems` collects script and console errors."""
    context = browser.new_context(
        base_url=server_url, viewport={"width": 1200, "height": 900}, permissions=["camera"]
    )
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(f"console {message.type}: {message.text}")
        if message.type == "error" else None,
    )
    page.problems = problems  # type: ignore[attr-defined]
    return page


@pytest.fixture
def page(browser, server_url: str) -> Iterator:
    """A page of the site in the browser with the astronaut camera."""
    page = open_page(browser, server_url)
    try:
        yield page
    finally:
        page.context.close()


@pytest.fixture
def faceless_page(faceless_browser, server_url: str) -> Iterator:
    """A page of the site in the browser whose camera shows no face."""
    page = open_page(faceless_browser, server_url)
    try:
        yield page
    finally:
        page.context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Folder for screenshots (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def sample_photo() -> bytes:
    return (ROOT / "server" / "static" / "sample.jpg").read_bytes()
