"""Server settings: one pydantic-settings class, every field also an AVATAR_* variable.

Built once by whoever starts the server (the `avatar serve` command, a test) and handed to
`create_app`; never imported as a global. Unsafe or inconsistent values fail here, at
start-up, with a message that names the setting, what it expects and what it got.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.runtime.select import RuntimeKind

logger = logging.getLogger(__name__)

# the folder that holds the `server` package: relative weight paths fall back to it
PROJECT_ROOT = Path(__file__).resolve().parent.parent

OutputFormat = Literal["jpeg", "webp", "raw"]


def resolve_project_path(path: Path) -> Path:
    """An absolute path as is; a relative one from the working directory when it exists
    there, otherwise from the project root (so `weights/demo` works from anywhere)."""
    if path.is_absolute():
        return path
    from_cwd = Path.cwd() / path
    if from_cwd.exists():
        return from_cwd.resolve()
    return (PROJECT_ROOT / path).resolve()


class Settings(BaseSettings):
    """Everything the server can be told; each field is also `AVATAR_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="AVATAR_", extra="forbid")

    # where things live
    data_dir: Path = Field(
        default=Path("data"), description="Folder of the embedded avatar store (files + SQLite)."
    )
    weights_dir: Path = Field(
        default=Path("weights/demo"),
        description="Weight bundle folder (manifest.json, register.onnx, frame.onnx).",
    )
    store_url: str = Field(
        default="",
        description="Avatar store; empty for the embedded store under data_dir.",
    )

    # network
    host: str = Field(default="127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port.")

    # runtime and batching
    runtime: RuntimeKind = Field(
        default="auto",
        description="Frame runtime: auto (TensorRT, then ONNX Runtime CUDA, then ONNX "
        "Runtime CPU: the first that loads), or one of them by name (no fallback).",
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="Where the runtime offers it: TensorRT fp16, PyTorch bf16."
    )
    runtime_threads: int = Field(
        default=0, ge=0, le=256, description="Intra-op threads of the runtime; 0 = physical cores."
    )
    max_batch: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Largest per-frame batch; 0 measures batch sizes at warm-up and "
        "keeps the smallest one within 10% of the best time per frame.",
    )
    batch_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=50.0,
        description="Longest wait for more streams' poses before a batch runs; only "
        "spent when more streams are open than the batch holds.",
    )
    batch_search_limit: int = Field(
        default=16, ge=1, le=256, description="Largest batch tried when max_batch is 0."
    )
    warmup: bool = Field(default=True, description="Run the graphs once before reporting ready.")

    # streams
    max_pending: int = Field(
        default=2, ge=1, le=8,
        description="Poses a stream may have waiting; newer ones replace them.",
    )
    default_format: OutputFormat = Field(
        default="jpeg", description="Frame format if hello omits it."
    )
    default_quality: int = Field(default=85, ge=1, le=100, description="JPEG/WebP quality default.")
    stats_interval_s: float = Field(
        default=1.0, ge=0.1, le=3600.0, description="Seconds between stats events on a stream."
    )
    ws_max_message_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Largest WebSocket message accepted (camera JPEGs are the big ones).",
    )

    # registration and REST
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024, description="Largest photo upload."
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=64 * 64, le=400_000_000, description="Largest photo, width x height."
    )
    max_poses_per_request: int = Field(
        default=32, ge=1, le=1024, description="Most poses one POST /avatars/{id}/frames may carry."
    )

    # capacity
    cache_avatars: int = Field(
        default=64, ge=1, le=1_000_000, description="Avatars kept in the in-memory hot cache."
    )
    registration_workers: int = Field(
        default=1, ge=1, le=64, description="Registrations that run at the same time."
    )
    encode_workers: int = Field(default=2, ge=1, le=64, description="Threads encoding frames.")
    landmark_workers: int = Field(
        default=2, ge=1, le=64, description="Threads finding landmarks in camera frames."
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server's loggers."
    )

    @field_validator("weights_dir", mode="after")
    @classmethod
    def _resolve_weights(cls, path: Path) -> Path:
        return resolve_project_path(path.expanduser())

    @field_validator("data_dir", mode="after")
    @classmethod
    def _resolve_data(cls, path: Path) -> Path:
        return (Path.cwd() / path.expanduser()).resolve()

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        if url not in ("", "local") and not url.startswith("file://"):
            raise ValueError(
                f"store_url: expected '' (embedded store) or file://PATH, got {url!r}; "
                "no other store is part of this build"
            )
        return url

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, host: str) -> str:
        if not host.strip():
            raise ValueError("host: expected an address such as 127.0.0.1, got ''")
        return host

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.weights_dir.exists() and not self.weights_dir.is_dir():
            raise ValueError(f"weights_dir: expected a folder, got the file {self.weights_dir}")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ValueError(f"data_dir: expected a folder, got the file {self.data_dir}")
        return self

    @property
    def store_dir(self) -> Path:
        """Folder of the embedded store: data_dir, or the path of a file:// URL."""
        if self.store_url.startswith("file://"):
            return Path(self.store_url.removeprefix("file://")).resolve()
        return self.data_dir
