"""Settings: AVATAR_* variables, defaults, and unsafe values refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import PROJECT_ROOT, Settings


def test_defaults_bind_loopback_and_find_the_demo_weights(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.runtime == "auto"
    assert settings.weights_dir == PROJECT_ROOT / "weights" / "demo"
    assert settings.data_dir == tmp_path / "data"
    assert settings.store_dir == settings.data_dir


def test_environment_variables(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AVATAR_DATA_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("AVATAR_PORT", "9123")
    monkeypatch.setenv("AVATAR_MAX_BATCH", "4")
    monkeypatch.setenv("AVATAR_DEFAULT_FORMAT", "webp")
    monkeypatch.setenv("AVATAR_RUNTIME", "onnxruntime")
    settings = Settings()
    assert settings.data_dir == tmp_path / "store"
    assert (settings.port, settings.max_batch, settings.default_format) == (9123, 4, "webp")
    assert settings.runtime == "onnxruntime"

    # explicit arguments win over the environment
    assert Settings(port=8001).port == 8001


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("port", 0, "port"),
        ("max_batch", 1000, "max_batch"),
        ("batch_wait_ms", -1, "batch_wait_ms"),
        ("default_quality", 101, "default_quality"),
        ("runtime", "magic", "runtime"),
        ("store_url", "memcached://localhost:11211", "redis://HOST:PORT/DB"),
        ("host", "0.0.0.0", "AVATAR_API_KEYS=true"),
        ("trusted_hosts", "a*b", "trusted_hosts"),
        ("cors_origins", "example.com", "cors_origins"),
        ("max_streams", -1, "max_streams"),
        ("host", " ", "expected an address"),
        ("max_pending", 0, "max_pending"),
        ("ws_max_message_bytes", 10, "ws_max_message_bytes"),
        ("unknown_setting", 1, "unknown_setting"),
    ],
)
def test_unsafe_values_fail(field: str, value: object, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})
    assert words in str(caught.value)


def test_a_file_where_a_folder_belongs_fails(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValidationError, match="expected a folder"):
        Settings(data_dir=file)


def test_file_store_url(tmp_path: Path) -> None:
    settings = Settings(store_url=f"file://{tmp_path}/elsewhere")
    assert settings.store_dir == tmp_path / "elsewhere"
