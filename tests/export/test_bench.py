"""`avatar bench frame`: the JSON other tools read, from a real run (small preset)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from export.bench import psnr
from export.parity import driving_poses, random_sources
from export.quantize import head_and_tail, quantize_frame_graph


def test_bench_frame_prints_the_documented_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "frame", "--preset", "small",
         "--runtime", "onnxruntime", "--runtime", "torch", "--batch", "2",
         "--iterations", "4", "--threads", "2", "--json-out", str(out), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())

    assert printed["conv_peak_gflops"] > 1.0
    assert printed["preset"] == "small" and printed["frame_gmac"] > 0
    rows = {row["runtime"]: row for row in printed["results"]}
    assert set(rows) == {"onnxruntime", "torch"}
    for row in rows.values():
        assert {"runtime", "precision", "batch", "ms_per_frame", "fps", "gflops"} <= set(row)
        assert row["batch"] == 2 and row["precision"] == "fp32"
        assert row["ms_per_frame"] > 0
        assert row["fps"] == pytest.approx(1000 / row["ms_per_frame"], rel=0.01)
    # FP32 runtimes render the same frames
    assert rows["torch"]["psnr_vs_fp32_db"] > 45


def test_bench_frame_rejects_unknown_runtime() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "frame", "--preset", "small",
         "--runtime", "vulkan"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "unknown ['vulkan']" in result.stderr


def test_int8_graph_keeps_the_head_in_fp32(small_bundle, tmp_path) -> None:
    """Static INT8: convs quantised, the head and the composition untouched, frames close."""
    from server.runtime.onnx_runtime import OnnxFrameRuntime

    sources = random_sources(small_bundle.cfg.image_size, 1, seed=2)
    reference = OnnxFrameRuntime(small_bundle.frame_path)
    # avatar state from the registration graph, poses around the source pose
    from server.runtime.onnx_runtime import OnnxRegistrationRuntime

    avatar = OnnxRegistrationRuntime(small_bundle.register_path).register(**sources)
    poses = driving_poses(sources["pose"][0], 4, seed=6)
    textures = np.repeat(avatar.texture[None], 4, 0)
    params = np.repeat(avatar.params[None], 4, 0)
    calibration = [
        {"pose": poses[i : i + 1], "texture": textures[:1], "params": params[:1]}
        for i in range(4)
    ]

    path = quantize_frame_graph(small_bundle.frame_path, tmp_path / "int8.onnx", calibration)
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    kept = set(head_and_tail(model))
    assert any(node.op_type == "GridSample" for node in model.graph.node if node.name in kept)

    int8 = OnnxFrameRuntime(path, precision="int8").render(poses, textures, params)
    fp32 = reference.render(poses, textures, params)
    assert int8.frames.shape == fp32.frames.shape
    assert 15.0 < psnr(int8.frames, fp32.frames) < float("inf")
