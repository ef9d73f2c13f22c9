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


def test_lists_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AVATAR_TRUSTED_HOSTS", "avatars.example.com, *.internal")
    monkeypatch.setenv("AVATAR_CORS_ORIGINS", '["https://app.example.com/"]')
    monkeypatch.setenv("AVATAR_API_KEYS", "true")
    monkeypatch.setenv("AVATAR_HOST", "0.0.0.0")
    settings = Settings(data_dir=tmp_path)
    assert settings.trusted_hosts == ["avatars.example.com", "*.internal"]
    assert settings.cors_origins == ["https://app.example.com"]
    assert settings.api_keys and settings.host == "0.0.0.0"


def test_store_urls(tmp_path: Path) -> None:
    redis = Settings(data_dir=tmp_path, store_url="redis://:secret@cache:6379/2")
    assert redis.store_kind == "redis"
    assert Settings(data_dir=tmp_path).store_kind == "local"
    from server.settings import redact_url

    assert redact_url("redis://:secret@cache:6379/2") == "redis://***@cache:6379/2"
    assert redact_url("redis://user:secret@cache:6379/0") == "redis://user:***@cache:6379/0"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_serve_names_the_unsafe_setting_and_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import _register_commands
    from server.cli import app as cli_app

    _register_commands()
    result = CliRunner().invoke(
        cli_app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "0.0.0.0 is reachable from other machines" in result.output
    assert "AVATAR_ALLOW_UNAUTHENTICATED_NETWORK" in result.output
    assert "Traceback" not in result.output


def test_stream_tokens_stay_out_of_the_logs() -> None:
    import logging

    from server.security import RedactTokens

    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" %s',
        ("127.0.0.1:5000", "/avatars/abc/stream?token=avk_0123456789ab_SECRET&x=1",
         "[accepted]"), None,
    )
    assert RedactTokens().filter(record)
    text = record.getMessage()
    assert "SECRET" not in text and "token=***&x=1" in text
