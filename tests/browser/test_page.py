"""The try-it page in a real Chromium against a real server: register, drive, errors."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.browser

TRACK = Path(__file__).resolve().parents[2] / "server" / "static" / "web" / "poses.json"
FRAME_TIMEOUT_MS = 60_000  # first frames on a busy 2-core machine
API_KEY = "browser-test-key"


def frames_shown(page) -> int:
    return int(page.inner_text("#frames"))


def wait_frames(page, count: int) -> None:
    page.wait_for_function(
        "n => Number(document.getElementById('frames').textContent) >= n",
        arg=count, timeout=FRAME_TIMEOUT_MS,
    )


def canvas_pixels(page) -> np.ndarray:
    """The output canvas as [H, W, 4] uint8, read inside the page."""
    # base64 in one string: Playwright hands long arrays over item by item, slowly
    size, data = page.evaluate(
        """() => {
            const canvas = document.getElementById('output');
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let text = '';
            for (let i = 0; i < pixels.length; i += 8192) {
                text += String.fromCharCode(...pixels.subarray(i, i + 8192));
            }
            return [[canvas.height, canvas.width], btoa(text)];
        }"""
    )
    pixels = np.frombuffer(base64.b64decode(data), np.uint8)
    return pixels.reshape(size[0], size[1], 4)


def register_sample(server_url: str, photo: bytes) -> str:
    response = httpx.post(
        f"{server_url}/avatars", files={"image": ("sample.jpg", photo, "image/jpeg")},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def pick_avatar(page, avatar_id: str) -> None:
    """Choose an avatar from the page's list of avatars on the server."""
    page.wait_for_function(
        "id => [...document.getElementById('existing').options].some(o => o.value === id)",
        arg=avatar_id,
    )
    page.select_option("#existing", avatar_id)
    page.wait_for_selector("#avatar-figure:not([hidden])")


def script_errors(page) -> list[str]:
    return [p for p in page.problems if p.startswith("page error")]


def test_sample_photo_driven_by_recorded_track(page, server_url, artifacts):
    page.goto("/")
    page.wait_for_function(
        "() => document.getElementById('server-state').textContent.startsWith('Server ready')"
    )
    image_size = httpx.get(f"{server_url}/readyz").json()["weights"]["image_size"]

    # register the bundled sample, with the keyboard
    page.focus("#use-sample")
    page.keyboard.press("Enter")
    page.wait_for_selector("#avatar-figure:not([hidden])", timeout=FRAME_TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == image_size
    assert "is ready" in page.inner_text("#status")

    # play the recorded head motion
    assert page.is_checked("input[name=driver][value=track]")
    page.focus("#start")
    page.keyboard.press("Enter")
    wait_frames(page, 3)
    first = canvas_pixels(page)
    shown = frames_shown(page)
    wait_frames(page, shown + 10)
    second = canvas_pixels(page)

    # frames of the avatar's size, not blank, and moving with the track
    assert first.shape == (image_size, image_size, 4)
    assert first[..., :3].std() > 5.0, "the canvas holds no image"
    change = np.abs(first[..., :3].astype(np.int16) - second[..., :3]).mean()
    assert change > 0.5, f"the canvas did not change between frames ({change:.3f})"

    # live numbers
    page.wait_for_function("() => Number(document.getElementById('fps').textContent) > 0")
    assert int(page.inner_text("#fps")) > 0
    assert float(page.inner_text("#latency")) > 0
    assert page.is_visible("#driver-view")

    screenshot = artifacts / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    # switch motion and re-centre while streaming: the stream goes on
    page.select_option("#motion", "absolute")
    assert page.is_disabled("#recentre")
    page.select_option("#motion", "relative")
    page.click("#recentre")
    assert page.inner_text("#status").startswith("Re-centred")
    wait_frames(page, frames_shown(page) + 5)

    # stop: a normal close, no error shown
    page.click("#stop")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Stream stopped')"
    )
    assert page.is_hidden("#error")
    assert page.is_enabled("#start")
    assert page.problems == []


def test_webcam_drives_the_avatar(page, server_url, sample_photo, artifacts):
    avatar_id = register_sample(server_url, sample_photo)
    requests: list[dict[str, str]] = []
    sockets: list[str] = []
    page.on("request", lambda request: requests.append(request.headers))
    page.on("websocket", lambda socket: sockets.append(socket.url))

    # the key is sent along (a server without keys ignores it)
    page.goto("/")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")

    # pick the avatar registered over REST
    pick_avatar(page, avatar_id)

    # the fake camera plays the astronaut: the server finds the face and renders
    page.check("input[name=driver][value=webcam]")
    page.click("#start")
    page.wait_for_function(
        "() => document.getElementById('camera').videoWidth === 640", timeout=FRAME_TIMEOUT_MS
    )
    wait_frames(page, 5)
    assert page.is_hidden("#error"), page.inner_text("#error")
    assert canvas_pixels(page)[..., :3].std() > 5.0
    screenshot = artifacts / "webcam.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    assert sockets == [f"{server_url.replace('http', 'ws')}/avatars/{avatar_id}/stream"
                       f"?token={API_KEY}"]
    assert any(h.get("authorization") == f"Bearer {API_KEY}" for h in requests)

    page.click("#stop")
    page.wait_for_selector("#camera-figure[hidden]", state="attached")
    assert script_errors(page) == []


def test_webcam_without_a_face_warns_in_plain_words(faceless_page, server_url, sample_photo):
    page = faceless_page
    avatar_id = register_sample(server_url, sample_photo)
    page.goto("/")
    pick_avatar(page, avatar_id)

    # Chromium's own fake camera shows a moving pattern: the server finds no face
    page.check("input[name=driver][value=webcam]")
    page.click("#start")
    page.wait_for_function(
        "() => document.getElementById('status').textContent"
        ".startsWith('No face found in the webcam picture')",
        timeout=FRAME_TIMEOUT_MS,
    )
    assert frames_shown(page) == 0
    assert page.is_hidden("#error")
    assert page.is_enabled("#stop")

    # the stream goes on: the socket stays open and pictures keep going out
    sent = page.evaluate("() => page.seq")
    page.wait_for_function("n => page.seq > n + 5", arg=sent, timeout=FRAME_TIMEOUT_MS)
    assert page.evaluate("() => page.socket.readyState === WebSocket.OPEN")
    assert frames_shown(page) == 0
    page.click("#stop")
    assert script_errors(page) == []


def test_deleted_avatar_closes_the_stream_in_plain_words(page, server_url, sample_photo):
    avatar_id = register_sample(server_url, sample_photo)
    page.goto("/")
    pick_avatar(page, avatar_id)
    page.click("#start")
    wait_frames(page, 2)

    # deleting the avatar elsewhere ends its stream; the page says why
    assert httpx.delete(f"{server_url}/avatars/{avatar_id}").status_code == 200
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    error = page.inner_text("#error")
    assert "the avatar does not exist on the server" in error
    assert "code 4404" in error
    assert page.is_enabled("#start") and page.is_disabled("#stop")
    assert script_errors(page) == []


def test_a_file_that_is_not_an_image_is_refused_in_plain_words(page):
    page.goto("/")
    page.set_input_files(
        "#photo", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}
    )
    page.click("#register")
    page.wait_for_selector("#error:not([hidden])", timeout=FRAME_TIMEOUT_MS)
    assert re.search(r"^Registration failed: .+\(not_an_image\)$", page.inner_text("#error"))
    assert page.is_hidden("#avatar-figure")
    assert page.is_disabled("#start")
    assert script_errors(page) == []


def test_every_control_has_a_label(page):
    page.goto("/")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, canvas, video')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.textContent.trim())
            .map(el => el.id || el.outerHTML.slice(0, 60))"""
    )
    assert unlabelled == []
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert page.get_attribute("#error", "role") == "alert"


def test_bundled_pose_track_is_a_moving_face():
    track = json.loads(TRACK.read_text())
    poses = np.array(track["frames"], np.float32)  # [T, 136]

    assert track["fps"] == 30 and track["points"] == 68
    assert poses.shape[0] >= 60 and poses.shape[1] == 136
    assert np.isfinite(poses).all() and np.abs(poses).max() <= 1.0

    # the head moves: the nose tip (point 30) travels, and no two neighbours jump
    nose = poses.reshape(-1, 68, 2)[:, 30]
    assert np.ptp(nose[:, 0]) > 0.05
    assert np.abs(np.diff(poses, axis=0)).max() < 0.1
