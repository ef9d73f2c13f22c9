"""The runtimes behind the one small interface, parametrised over those present here.

Each runtime renders the same mixed-avatar batch as the PyTorch reference module
(`FrameGraph`); GPU runtimes are skipped with the reason they are absent. Selection and
the engine metadata checks run everywhere.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.onnx_export import FrameGraph, RegisterGraph
from export.parity import driving_poses, level_figures, levels_pass, random_sources
from export.tensorrt_build import (
    ENGINE_FORMAT,
    StaleEngineError,
    check_engine,
    engine_problems,
    metadata_path,
)
from server.runtime.base import FrameRuntime, RegistrationRuntime, RuntimeFailure
from server.runtime.select import (
    FRAME_FALLBACK,
    build_frame_runtime,
    build_registration_runtime,
)

FRAME_KINDS = ["onnxruntime", "torch", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"]


def absent_reason(kind: str) -> str | None:
    """Why `kind` cannot run on this machine, or None when it can."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if kind == "onnxruntime-cuda" and "CUDAExecutionProvider" not in providers:
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider here"
    if kind == "onnxruntime-tensorrt" and "TensorrtExecutionProvider" not in providers:
        return f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider here"
    if kind == "tensorrt":
        from server.runtime.tensorrt_runtime import tensorrt_available

        return tensorrt_available()
    return None


def _mixed_batch(bundle, count: int) -> dict[str, np.ndarray]:
    """`count` frames, each of a different avatar, registered in PyTorch."""
    register = RegisterGraph(bundle.model).eval()
    sources = random_sources(bundle.cfg.image_size, count, seed=21)
    with torch.no_grad():
        states = [
            register(*(torch.from_numpy(sources[k][i : i + 1])
                       for k in ("image", "stickman", "pose", "mask")))
            for i in range(count)
        ]
    return {
        "pose": driving_poses(sources["pose"][0], count, seed=8),
        "texture": torch.cat([s[0] for s in states]).numpy(),
        "params": torch.cat([s[1] for s in states]).numpy(),
    }


@pytest.fixture(params=FRAME_KINDS)
def frame_runtime(request, small_bundle, tmp_path) -> FrameRuntime:
    kind = request.param
    reason = absent_reason(kind)
    if reason:
        pytest.skip(f"{kind} absent: {reason}")
    runtime = build_frame_runtime(
        kind, small_bundle.manifest.directory, max_batch=4, engine_dir=tmp_path / "engines"
    )
    yield runtime
    runtime.close()


def test_frame_runtime_matches_pytorch(frame_runtime, small_bundle) -> None:
    """Every runtime renders a mixed-avatar batch like the PyTorch module (FP32 bounds;
    the FP16 TensorRT engine is held to its own, looser ones)."""
    assert isinstance(frame_runtime, FrameRuntime)
    feeds = _mixed_batch(small_bundle, 3)
    with torch.no_grad():
        ref_frames, ref_masks = FrameGraph(small_bundle.model).eval()(
            *(torch.from_numpy(feeds[k]) for k in ("pose", "texture", "params"))
        )

    batch = frame_runtime.render(feeds["pose"], feeds["texture"], feeds["params"])
    size = small_bundle.cfg.image_size
    assert batch.frames.shape == (3, size, size, 3) and batch.frames.dtype == np.uint8
    assert batch.masks.shape == (3, size, size) and batch.masks.dtype == np.uint8

    figures = {
        **level_figures(batch.frames, ref_frames.numpy(), "frame"),
        **level_figures(batch.masks, ref_masks.numpy(), "mask"),
    }
    if frame_runtime.precision == "fp32":
        assert levels_pass(figures, "frame") and levels_pass(figures, "mask"), figures
    else:
        assert figures["frame_share_within_1"] >= 0.9, figures


def test_frame_runtime_rejects_bad_batches(frame_runtime, small_bundle) -> None:
    feeds = _mixed_batch(small_bundle, 1)
    with pytest.raises(ValueError, match=r"textures: expected shape \[1, 3"):
        frame_runtime.render(feeds["pose"], feeds["texture"][:, :, 1:], feeds["params"])
    with pytest.raises(ValueError, match=r"batch: expected 1\.\.4, got 5"):
        frame_runtime.render(
            np.repeat(feeds["pose"], 5, 0), np.repeat(feeds["texture"], 5, 0),
            np.repeat(feeds["params"], 5, 0),
        )


@pytest.mark.gpu
def test_onnxruntime_cuda_runs_every_node_on_the_gpu(small_bundle, tmp_path) -> None:
    """GridSample included: a compute node on the CPU provider is a failure."""
    reason = absent_reason("onnxruntime-cuda")
    if reason:
        pytest.skip(reason)
    from server.runtime.onnx_runtime import OrtOptions, gpu_placement, make_session

    options = OrtOptions(
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"), profile_dir=tmp_path
    )
    session = make_session(small_bundle.frame_path, options)
    feeds = _mixed_batch(small_bundle, 2)
    report = gpu_placement(session, feeds)
    assert report["cpu"] == [], report["cpu"]
    assert any("GridSample" in label for label in report["gpu"])


# ------------------------------------------------------------------------------------------
# Selection and fallback


def test_auto_falls_back_to_onnxruntime_cpu_with_reasons(small_bundle, caplog) -> None:
    absent = [kind for kind in FRAME_FALLBACK[:-1] if absent_reason(kind)]
    if len(absent) < len(FRAME_FALLBACK) - 1:
        pytest.skip("a GPU runtime is present: auto picks it")
    with caplog.at_level(logging.INFO, logger="server.runtime.select"):
        runtime = build_frame_runtime("auto", small_bundle.manifest.directory, max_batch=2)
    assert runtime.name == "onnxruntime-cpu"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [message.split()[2] for message in skipped] == list(FRAME_FALLBACK[:-1])
    runtime.close()


def test_named_runtime_never_falls_back(small_bundle) -> None:
    reason = absent_reason("tensorrt")
    if reason is None:
        pytest.skip("TensorRT is present here")
    with pytest.raises(RuntimeFailure, match="runtime 'tensorrt' failed to load"):
        build_frame_runtime("tensorrt", small_bundle.manifest.directory)
    with pytest.raises(ValueError, match="runtime: expected one of"):
        build_frame_runtime("vulkan", small_bundle.manifest.directory)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_registration_runtimes_agree(kind, small_bundle) -> None:
    runtime = build_registration_runtime(kind, small_bundle.manifest.directory)
    assert isinstance(runtime, RegistrationRuntime)
    sources = random_sources(small_bundle.cfg.image_size, 1, seed=4)
    avatar = runtime.register(**sources)
    with torch.no_grad():
        texture, params = RegisterGraph(small_bundle.model).eval()(
            *(torch.from_numpy(sources[k]) for k in ("image", "stickman", "pose", "mask"))
        )
    np.testing.assert_allclose(avatar.texture, texture[0].numpy(), atol=2e-3)
    np.testing.assert_allclose(avatar.params, params[0].numpy(), atol=1e-3)
    runtime.close()


# ------------------------------------------------------------------------------------------
# TensorRT engine metadata (no GPU needed)


def _metadata(**changes: object) -> dict[str, object]:
    metadata: dict[str, object] = {
        "format": ENGINE_FORMAT,
        "tensorrt_version": "11.4.0",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "precision": "fp16",
        "profile": {"min": 1, "opt": 8, "max": 16},
        "source_onnx_sha256": "ab" * 32,
    }
    metadata.update(changes)
    return metadata


def _problems(metadata: dict[str, object], max_batch: int = 16) -> list[str]:
    return engine_problems(
        metadata,
        tensorrt_version="11.4.0",
        gpu_name="NVIDIA H200",
        compute_capability="9.0",
        onnx_sha256="ab" * 32,
        max_batch=max_batch,
        precision="fp16",
    )


def test_matching_engine_has_no_problems() -> None:
    assert _problems(_metadata()) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tensorrt_version": "10.3.0"}, "tensorrt_version: engine has '10.3.0', need '11.4.0'"),
        ({"gpu_name": "NVIDIA L4"}, "gpu_name: engine has 'NVIDIA L4', need 'NVIDIA H200'"),
        ({"source_onnx_sha256": "cd" * 32}, "source_onnx_sha256: engine has"),
        ({"precision": "fp32"}, "precision: engine has 'fp32', need 'fp16'"),
        ({"profile": {"min": 1, "opt": 2, "max": 4}}, "serves batch up to 4, need 16"),
    ],
)
def test_stale_engine_problems_say_what_differs(change, expected) -> None:
    problems = _problems(_metadata(**change))
    assert len(problems) == 1 and expected in problems[0]


def test_missing_engine_is_refused(small_bundle, tmp_path) -> None:
    engine = tmp_path / "frame-fp16.engine"
    with pytest.raises(StaleEngineError, match="run `avatar build-engine`"):
        check_engine(engine, small_bundle.frame_path, max_batch=4, precision="fp16")
    assert metadata_path(engine) == tmp_path / "frame-fp16.json"


def test_build_engine_without_tensorrt_says_why(small_bundle, tmp_path) -> None:
    if absent_reason("tensorrt") is None:
        pytest.skip("TensorRT is present here")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "build-engine", "--bundle",
         str(small_bundle.manifest.directory), "--out", str(tmp_path / "e.engine")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot build an engine here: TensorRT is not installed" in result.stderr


@pytest.mark.gpu
def test_build_engine_writes_metadata_and_reuses_it(small_bundle, tmp_path) -> None:
    reason = absent_reason("tensorrt")
    if reason:
        pytest.skip(reason)
    from export.tensorrt_build import build_engine, sha256_file

    engine = tmp_path / "frame-fp16.engine"
    metadata = build_engine(small_bundle.frame_path, engine, max_batch=4)
    stored = json.loads(metadata_path(engine).read_text())
    assert stored == metadata.to_dict()
    assert stored["source_onnx_sha256"] == sha256_file(small_bundle.frame_path)
    assert stored["profile"] == {"min": 1, "opt": 2, "max": 4}
    assert (tmp_path / "timing.cache").exists()
    check_engine(engine, small_bundle.frame_path, max_batch=4, precision="fp16")
    with pytest.raises(StaleEngineError, match="serves batch up to 4, need 8"):
        check_engine(engine, small_bundle.frame_path, max_batch=8, precision="fp16")

