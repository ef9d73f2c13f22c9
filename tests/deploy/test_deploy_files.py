"""The deployment files agree with the server: every setting documented in .env.example,
no unknown AVATAR_ name in the images or the compose file, and image requirements that
keep PyTorch out. The stack itself runs in `make docker-smoke` (deploy/smoke.sh)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE = REPO / "docker-compose.yml"

# files that name server settings: a typo there is a setting silently ignored
FILES_NAMING_SETTINGS = [
    "Dockerfile",
    "docker-compose.yml",
    "deploy/docker/gpu-entrypoint.sh",
    "deploy/docker/healthcheck.py",
    "deploy/smoke.env",
    ".env.example",
]

SETTING = re.compile(r"\bAVATAR_[A-Z0-9_]+\b")
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}")
# a line of .env.example that sets or shows a variable: `NAME=value` or `# NAME=value`
EXAMPLE_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def setting_names() -> set[str]:
    return {f"AVATAR_{name.upper()}" for name in Settings.model_fields}


def compose_variables() -> set[str]:
    return set(COMPOSE_VARIABLE.findall(COMPOSE.read_text()))


def load_requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "deploy_requirements", REPO / "deploy" / "requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_env_example_shows_every_setting_and_compose_variable() -> None:
    shown = set(EXAMPLE_LINE.findall(ENV_EXAMPLE.read_text()))
    expected = setting_names() | compose_variables()
    assert sorted(expected - shown) == []


def test_env_example_names_nothing_unknown() -> None:
    shown = set(EXAMPLE_LINE.findall(ENV_EXAMPLE.read_text()))
    assert sorted(shown - setting_names() - compose_variables()) == []


@pytest.mark.parametrize("path", FILES_NAMING_SETTINGS)
def test_deploy_files_name_only_real_settings(path: str) -> None:
    named = set(SETTING.findall((REPO / path).read_text()))
    assert sorted(named - setting_names()) == []


def test_env_example_defaults_parse_as_settings() -> None:
    """The values shown for the server (fixed layout lines aside) are valid settings."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*(AVATAR_[A-Z0-9_]+)=(\S*)", line)
        if match:
            values[match.group(1).removeprefix("AVATAR_").lower()] = match.group(2)
    values.pop("engine_dir")  # a container path
    values.pop("data_dir")
    values.pop("weights_dir")
    settings = Settings(**values)
    assert settings.api_keys is True
    assert settings.store_url == "redis://redis:6379/0"


def test_compose_servers_share_the_front_alias_and_store() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in ("server", "server-gpu"):
        service = services[name]
        assert "backend" in service["networks"]["default"]["aliases"], name
        assert service["environment"]["AVATAR_STORE_URL"].startswith("${AVATAR_STORE_URL:-redis")
        assert service["environment"]["AVATAR_API_KEYS"] == "${AVATAR_API_KEYS:-true}"
    assert services["server"]["profiles"] == ["cpu"]
    assert services["server-gpu"]["profiles"] == ["gpu"]
    gpu = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]
    assert "http://backend:8000" in (REPO / "deploy" / "nginx" / "avatar.conf").read_text()


def test_cpu_requirements_have_no_torch_and_no_mediapipe_dependencies() -> None:
    requirements = load_requirements_module()
    lines = requirements.serving_requirements("cpu")
    names = {requirements.distribution(line) for line in lines}
    assert "torch" not in names
    assert "onnxruntime" in names
    # mediapipe comes in alone (--no-deps); its runtime imports are listed instead
    assert "mediapipe" not in names
    assert "opencv-contrib-python-headless" in names
    assert requirements.mediapipe_pin().startswith("mediapipe==")


def test_gpu_requirements_swap_onnxruntime_for_its_cuda_build() -> None:
    requirements = load_requirements_module()
    cpu = requirements.serving_requirements("cpu")
    gpu = requirements.serving_requirements("gpu")
    names = {requirements.distribution(line) for line in gpu}
    assert "onnxruntime" not in names and "torch" not in names
    assert {"onnxruntime-gpu", "onnx"} <= names
    assert any(name.startswith("tensorrt") for name in names)
    cpu_ort = next(line for line in cpu if requirements.distribution(line) == "onnxruntime")
    gpu_ort = next(line for line in gpu if requirements.distribution(line) == "onnxruntime-gpu")
    assert gpu_ort.endswith(cpu_ort.removeprefix("onnxruntime"))  # same version range

    with pytest.raises(ValueError, match="expected 'cpu' or 'gpu'"):
        requirements.serving_requirements("tpu")


@pytest.mark.parametrize(("value", "expected"), [("", None), ("/engines", Path("/engines"))])
def test_engine_dir_setting(value: str, expected: Path | None) -> None:
    assert Settings(engine_dir=value).engine_dir == expected
