"""Server settings: one pydantic-settings class, every field also an AVATAR_* variable.

Built once by whoever starts the server (the `avatar serve` command, a test) and handed to
`create_app`; never imported as a global. Unsafe or inconsistent values fail here, at
start-up, with a message that names the setting, what it expects and what it got.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.runtime.select import RuntimeKind

logger = logging.getLogger(__name__)

# the folder that holds the `server` package: relative weight paths fall back to it
PROJECT_ROOT = Path(__file__).resolve().parent.parent

OutputFormat = Literal["jpeg", "webp", "raw"]

# list settings read from the environment as comma-separated text (or a JSON list)
NameList = Annotated[list[str], NoDecode]

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
STORE_SCHEMES = ("file://", "redis://", "rediss://", "unix://")


def is_loopback(host: str) -> bool:
    """True for an address (or name) that only this machine can reach."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """A store URL without its password, for logs and /readyz."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{location}"


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
    engine_dir: Path | None = Field(
        default=None,
        description="Folder of TensorRT engines, built for the GPU found and reused while "
        "they match it; empty: the weight bundle's engines/ folder.",
    )
    store_url: str = Field(
        default="",
        description="Avatar store: empty (or file://PATH) for the embedded files + SQLite "
        "store under data_dir; redis://HOST:PORT/DB (rediss:// for TLS) for a Redis "
        "server that every replica shares.",
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

    # access
    api_keys: bool = Field(
        default=False,
        description="Require an API key (Authorization: Bearer KEY; on the stream also "
        "?token=KEY) on every avatar route; keys come from `avatar keys create`.",
    )
    allow_unauthenticated_network: bool = Field(
        default=False,
        description="Serve without API keys on a non-loopback address (only behind a "
        "front that authenticates callers itself).",
    )
    trusted_hosts: NameList = Field(
        default_factory=lambda: ["*"],
        description="Host header values served (comma-separated; *.example.com matches "
        "subdomains; * anything). Others get 400 untrusted_host.",
    )
    cors_origins: NameList = Field(
        default_factory=list,
        description="Browser origins (https://app.example.com) allowed to call the API "
        "and open streams from another site; * for any. Empty: same origin only.",
    )

    # limits
    registrations_per_hour: int = Field(
        default=60, ge=0, le=1_000_000,
        description="Registrations one API key may make per hour (0: no limit; keys only).",
    )
    max_avatars_per_key: int = Field(
        default=100, ge=0, le=10_000_000,
        description="Avatars one API key may keep (0: no limit; keys only).",
    )
    max_streams: int = Field(
        default=256, ge=0, le=100_000,
        description="Streams open at once on this server (0: no limit).",
    )
    max_streams_per_key: int = Field(
        default=8, ge=0, le=100_000,
        description="Streams one API key may have open at once on this server (0: no "
        "limit; keys only).",
    )
    ws_max_messages_per_s: float = Field(
        default=120.0, ge=0.0, le=100_000.0,
        description="Sustained messages per second a stream may send (0: no limit).",
    )
    ws_burst_messages: int = Field(
        default=240, ge=1, le=1_000_000,
        description="Messages a stream may send in a burst above that rate.",
    )
    ws_idle_timeout_s: float = Field(
        default=60.0, ge=0.0, le=86_400.0,
        description="A stream that sends nothing for this long is closed (0: never).",
    )

    # life cycle
    shutdown_delay_s: float = Field(
        default=0.0, ge=0.0, le=600.0,
        description="On shutdown, seconds /readyz reports not ready (while still serving) "
        "before the listener closes, so a load balancer stops routing here first.",
    )
    drain_timeout_s: float = Field(
        default=5.0, ge=0.0, le=600.0,
        description="On shutdown, seconds open streams get to send the frames they "
        "accepted before they are closed.",
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server's loggers."
    )

    @field_validator("weights_dir", mode="after")
    @classmethod
    def _resolve_weights(cls, path: Path) -> Path:
        return resolve_project_path(path.expanduser())

    @field_validator("engine_dir", mode="before")
    @classmethod
    def _empty_engine_dir(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("engine_dir", mode="after")
    @classmethod
    def _resolve_engine_dir(cls, path: Path | None) -> Path | None:
        return None if path is None else (Path.cwd() / path.expanduser()).resolve()

    @field_validator("data_dir", mode="after")
    @classmethod
    def _resolve_data(cls, path: Path) -> Path:
        return (Path.cwd() / path.expanduser()).resolve()

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        url = url.strip()
        if url not in ("", "local") and not url.startswith(STORE_SCHEMES):
            raise ValueError(
                f"store_url: expected '' (embedded store), file://PATH or "
                f"redis://HOST:PORT/DB, got {redact_url(url)!r}"
            )
        return url

    @field_validator("trusted_hosts", "cors_origins", mode="before")
    @classmethod
    def _name_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("trusted_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("trusted_hosts: expected at least one name (or *), got none")
        for host in hosts:
            if "*" in host and host != "*" and not host.startswith("*."):
                raise ValueError(
                    f"trusted_hosts: expected a name, *.domain or *, got {host!r}"
                )
        return [host.lower() for host in hosts]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"cors_origins: expected scheme://host[:port] or *, got {origin!r}"
                )
        return [origin.rstrip("/") for origin in origins]

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
        if not self.api_keys and not is_loopback(self.host):
            if not self.allow_unauthenticated_network:
                raise ValueError(
                    f"host: {self.host} is reachable from other machines, and API keys are "
                    "off: anyone who reaches it could use the server. Turn keys on "
                    "(AVATAR_API_KEYS=true, keys from `avatar keys create`), or set "
                    "AVATAR_ALLOW_UNAUTHENTICATED_NETWORK=true when a front authenticates"
                )
        return self

    @property
    def store_kind(self) -> Literal["local", "redis"]:
        """Which store the URL names."""
        if self.store_url.startswith(("redis://", "rediss://", "unix://")):
            return "redis"
        return "local"

    @property
    def store_dir(self) -> Path:
        """Folder of the embedded store: data_dir, or the path of a file:// URL."""
        if self.store_url.startswith("file://"):
            return Path(self.store_url.removeprefix("file://")).resolve()
        return self.data_dir
