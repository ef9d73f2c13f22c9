"""Fixtures of the server tests: a real uvicorn on a free port (in a thread, or `avatar
serve` in a process of its own), the demo weight bundle, the astronaut registered once,
and a real redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
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


# ---------------------------------------------------------------- server processes, Redis


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """`avatar serve` in a process of its own (stopped with a real SIGTERM)."""

    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until /readyz answers 200; RuntimeError with the log if the process exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.terminate()
        raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the process to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop; its log:\n{self.output()}") from None


def launch_server(folder: Path, **settings: object) -> ServerProcess:
    """Start `avatar serve` on a free port with AVATAR_* settings; returns at once (see
    ServerProcess.wait_ready)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "AVATAR_PORT": str(port),
        "AVATAR_DATA_DIR": str(folder / "data"),
        "AVATAR_WEIGHTS_DIR": str(require_bundle()),
        "AVATAR_RUNTIME": "onnxruntime",
        "AVATAR_RUNTIME_THREADS": "1",
        "AVATAR_MAX_BATCH": "1",
        "AVATAR_WARMUP": "false",
        "AVATAR_LOG_LEVEL": "info",
        "OMP_NUM_THREADS": "1",
    }
    env.update({f"AVATAR_{name.upper()}": str(value) for name, value in settings.items()})
    log = folder / f"server-{port}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], env=env, stdout=handle,
            stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )
    return ServerProcess(f"http://127.0.0.1:{port}", process, log)


def spawn_server(folder: Path, **settings: object) -> ServerProcess:
    """Start `avatar serve` and wait until it is ready."""
    running = launch_server(folder, **settings)
    running.wait_ready()
    return running


def require_redis() -> str:
    """The redis-server binary; a skip with the reason when it is absent, a failure
    instead when AVATAR_REDIS_REQUIRED=1 (CI installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("AVATAR_REDIS_REQUIRED") == "1":
            pytest.fail(message + "; AVATAR_REDIS_REQUIRED=1 makes this a failure")
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the tests' own on a free port, without persistence."""
    binary = require_redis()
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)
