"""Fixtures of the server tests: a real uvicorn on a free port, the demo weight bundle,
the astronaut registered once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from server.client import AvatarClient
from server.lifecycle import make_server
from server.settings import PROJECT_ROOT, Settings

BUNDLE = PROJECT_ROOT / "weights" / "demo"
SAMPLE = PROJECT_ROOT / "server" / "static" / "sample.jpg"
START_TIMEOUT_S = 180.0
SEND_BUFFER_BYTES = 64 * 1024  # small socket buffers make backpressure show quickly


@dataclass
class RunningServer:
    """A uvicorn server running an app in a thread of the test process."""

    url: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def app(self):
        return self.server.config.app

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop within 60 s")


def require_bundle() -> Path:
    """The demo bundle; the end-to-end tests need the real graphs."""
    if not (BUNDLE / "manifest.json").exists():
        pytest.fail(f"weight bundle missing at {BUNDLE}: run `avatar export` to make it")
    return BUNDLE


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for tests: the demo bundle, a private data folder, a quick warm-up."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "weights_dir": require_bundle(),
        "runtime": "onnxruntime",
        "batch_search_limit": 4,
        "stats_interval_s": 0.5,
        "ws_max_message_bytes": 512 * 1024,
        "max_upload_bytes": 2 * 1024 * 1024,
        "ws_burst_messages": 1000,  # the backpressure test floods 300 poses at once
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def start_server(settings: Settings) -> RunningServer:
    """Start uvicorn on a free loopback port (socket bound here: no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    server = make_server(settings, log_level="warning")  # as `avatar serve` runs it
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn"
    )
    thread.start()

    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the test server did not start within {START_TIMEOUT_S} s")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", settings, server, thread)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server shared by the REST and stream tests."""
    running = start_server(make_settings(tmp_path_factory.mktemp("data")))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(live_server: RunningServer) -> Iterator[AvatarClient]:
    with AvatarClient(live_server.url) as avatar_client:
        yield avatar_client


@pytest.fixture(scope="session")
def astronaut(client: AvatarClient) -> dict:
    """The astronaut photo, registered once."""
    return client.register(SAMPLE)
