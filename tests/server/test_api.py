"""The REST API against a real uvicorn, the real ONNX bundle and real mediapipe."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from export.bundle import load_manifest
from server.client import AvatarClient, ClientError
from server.encode import decode_frame

from .conftest import BUNDLE, SAMPLE, RunningServer


def image_bytes(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def post_photo(server: RunningServer, data: bytes, name: str = "photo", mime: str = "image/jpeg"):
    return httpx.post(f"{server.url}/avatars", files={"image": (name, data, mime)}, timeout=60)


def test_health_and_readiness_name_the_weights(live_server: RunningServer) -> None:
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "ok"}

    ready = httpx.get(f"{live_server.url}/readyz").json()
    manifest = load_manifest(BUNDLE)
    assert ready["ready"] is True
    assert ready["weights"]["preset"] == manifest.preset == "small"
    assert ready["weights"]["checkpoint_sha256"] == manifest.checkpoint_sha256
    assert ready["weights"]["trained"] is manifest.trained
    assert ready["runtime"]["name"] == "onnxruntime-cpu"
    assert sorted(ready["runtime"]["ms_per_frame"]) == ["1", "2", "4"]  # measured at warm-up
    assert ready["store"]["kind"] == "local"


def test_register_read_preview_render(client: AvatarClient, astronaut: dict) -> None:
    # the registration answer
    assert len(astronaut["id"]) == 16
    assert astronaut["num_faces"] == 1
    assert astronaut["image_size"] == 128
    assert len(astronaut["source_pose"]) == 136
    assert max(abs(v) for v in astronaut["source_pose"]) <= 1.0
    assert astronaut["photo"] == {"width": 512, "height": 512}
    crop = astronaut["crop"]
    assert 0 < crop["cx"] < 512 and 0 < crop["cy"] < 512 and 40 < crop["side"] < 512
    assert {"decode", "landmarks", "register", "store", "total"} <= set(astronaut["timings_ms"])

    # read back and listed
    read = client.get_avatar(astronaut["id"])
    assert read["source_pose"] == astronaut["source_pose"]
    assert astronaut["id"] in [a["id"] for a in client.list_avatars()]

    # the preview: the avatar in its own pose
    preview = client.preview(astronaut["id"])
    image = simplejpeg.decode_jpeg(preview)
    assert image.shape == (128, 128, 3)
    assert image.std() > 1.0  # not a blank image

    # REST rendering: the source pose reproduces the preview; another pose differs
    source = np.asarray(astronaut["source_pose"], np.float32)
    moved = np.clip(source + np.tile([0.05, 0.0], 68), -1, 1)
    raw = client.render(astronaut["id"], [source, moved], format="raw")
    frames = [decode_frame(data, "raw", 128, 128) for data in raw]
    assert len(frames) == 2
    same_encoding = client.render(astronaut["id"], [source], format="jpeg", quality=90)[0]
    assert same_encoding == preview  # same pixels, same encoder
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 0.5

    # relative motion over REST: the first pose is the reference, so it renders the source
    relative = client.render(astronaut["id"], [moved, moved], format="raw", motion="relative")
    np.testing.assert_array_equal(decode_frame(relative[0], "raw", 128, 128), frames[0])


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: image_bytes(np.full((256, 256, 3), 128, np.uint8), "PNG"), 422, "no_face"),
        (lambda: SAMPLE.read_bytes()[:20000], 400, "bad_image"),
        (lambda: b"name,age\nada,36\n" * 20, 400, "not_an_image"),
        (lambda: image_bytes(np.zeros((64, 64, 3), np.uint8), "GIF"), 415, "unsupported_format"),
        (lambda: image_bytes(np.zeros((64, 64, 3), np.uint8), "BMP"), 415, "unsupported_format"),
        (lambda: b"", 400, "not_an_image"),
        (lambda: b"\xff\xd8\xff" + b"\0" * (2 * 1024 * 1024 + 10), 413, "image_too_large"),
    ],
    ids=["no-face", "truncated", "text", "gif", "bmp", "empty", "too-large"],
)
def test_bad_uploads_get_their_documented_error(
    live_server: RunningServer, make, status: int, code: str
) -> None:
    response = post_photo(live_server, make())
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert body["message"]


def test_a_webp_and_a_png_photo_register(live_server: RunningServer, client) -> None:
    photo = simplejpeg.decode_jpeg(SAMPLE.read_bytes())
    for fmt in ("WEBP", "PNG"):
        response = post_photo(live_server, image_bytes(photo, fmt), mime=f"image/{fmt.lower()}")
        assert response.status_code == 201, response.text
        client.delete_avatar(response.json()["id"])


def test_missing_field_and_unknown_routes(live_server: RunningServer) -> None:
    response = httpx.post(f"{live_server.url}/avatars", files={"photo": ("x", b"x")})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert "image" in response.json()["message"]

    response = httpx.get(f"{live_server.url}/nowhere")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    response = httpx.put(f"{live_server.url}/avatars")
    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")


def test_render_errors(live_server: RunningServer, astronaut: dict) -> None:
    url = f"{live_server.url}/avatars/{astronaut['id']}/frames"
    source = np.asarray(astronaut["source_pose"]).reshape(68, 2).tolist()

    def post(body: dict, target: str = url) -> httpx.Response:
        return httpx.post(
            target, content=json.dumps(body), headers={"content-type": "application/json"}
        )

    nan_pose = [list(p) for p in source]
    nan_pose[5][0] = float("nan")
    cases = [
        (post({"poses": [{"points": nan_pose}]}), 422, "bad_pose", "point 5"),
        (post({"poses": [{"points": [[2.0, 0.0]] * 68}]}), 422, "bad_pose", "[-1, 1]"),
        (post({"poses": [{"points": source[:67]}]}), 422, "invalid_request", "68"),
        (post({"poses": [{"points": source}] * 33}), 413, "too_many_poses", "at most 32"),
        (post({"poses": [{"points": source, "normalised": False}]}), 422, "bad_pose",
         "frame size"),
        (post({"poses": []}), 422, "invalid_request", "poses"),
        (post({"poses": [{"points": source}]}, f"{live_server.url}/avatars/nobody/frames"),
         404, "avatar_not_found", "nobody"),
    ]
    for response, status, code, words in cases:
        assert response.status_code == status, response.text
        assert response.json()["code"] == code
        assert words in response.json()["message"], response.json()

    # and the server still renders
    ok = post({"poses": [{"points": source}], "format": "webp"})
    frame = ok.json()["frames"][0]
    assert decode_frame(base64.b64decode(frame["data"]), "webp", 128, 128).shape == (128, 128, 3)


def test_delete_removes_every_byte(live_server: RunningServer, client: AvatarClient) -> None:
    avatar = client.register(SAMPLE)
    files = live_server.settings.data_dir / "avatars"
    stored = (files / f"{avatar['id']}.npz").read_bytes()
    assert stored

    assert client.delete_avatar(avatar["id"]) == {
        "id": avatar["id"], "deleted": True, "streams_closed": 0
    }
    for call in (client.get_avatar, client.delete_avatar, client.preview):
        with pytest.raises(ClientError) as caught:
            call(avatar["id"])
        assert (caught.value.status, caught.value.code) == (404, "avatar_not_found")

    # no file and no index row hold any of its bytes
    needle = stored[-4096:-2048]
    for path in live_server.settings.data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert needle not in content, path
            assert avatar["id"].encode() not in content, path


def test_metrics_count_what_happened(live_server: RunningServer, astronaut: dict) -> None:
    text = httpx.get(f"{live_server.url}/metrics").text
    for name in (
        "avatar_frame_latency_seconds_bucket", "avatar_frames_rendered_total",
        "avatar_batch_size_bucket", "avatar_queue_depth", "avatar_sessions_open",
        "avatar_registrations_total", "avatar_errors_total",
    ):
        assert name in text, name
    assert 'avatar_registrations_total{outcome="ok"}' in text


def test_openapi_documents_fields_and_errors(live_server: RunningServer) -> None:
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    register = spec["paths"]["/avatars"]["post"]
    assert {"201", "400", "413", "415", "422", "503"} <= set(register["responses"])
    for code in ("no_face", "bad_image", "not_an_image", "unsupported_format"):
        assert code in json.dumps(register["responses"])
    schemas = spec["components"]["schemas"]
    assert "ErrorBody" in schemas
    assert "HTTPValidationError" not in schemas  # every 422 is our ErrorBody

    # every field of every body is described
    undocumented = [
        f"{name}.{field}"
        for name, schema in schemas.items()
        for field, prop in schema.get("properties", {}).items()
        if "description" not in prop and "$ref" not in prop
    ]
    assert undocumented == []
    frames = spec["paths"]["/avatars/{avatar_id}/frames"]["post"]
    assert "bad_pose" in json.dumps(frames["responses"])
    assert "/readyz" in spec["paths"] and "/metrics" in spec["paths"]
