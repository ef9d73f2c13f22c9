"""Per-frame and registration benchmarks: several runtimes in one run, side by side.

On a machine shared with other work the raw milliseconds move from run to run; the
runtimes are therefore timed in interleaved rounds (each round times every runtime once),
so that their ratios stay meaningful. Reduced-precision rows state their fidelity as the
PSNR of their frames against the FP32 ONNX Runtime frames of the same poses and avatars.

Runtime names:
    onnxruntime                stateless per-frame graph, FP32 (the server's default)
    onnxruntime-specialised    one avatar's texture and params baked in as constants
    onnxruntime-int8           static INT8 (QDQ) quantisation of the stateless graph
    torch                      the same module in PyTorch eager, FP32
    torch-bf16                 PyTorch eager, BF16 weights and activations
    torch-compile              torch.compile (frozen weights, channels-last), FP32
    torch-compile-bf16         torch.compile, BF16
    onnxruntime-cuda, tensorrt GPU runtimes (measured where present)
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_RUNTIMES = (
    "onnxruntime",
    "onnxruntime-specialised",
    "onnxruntime-int8",
    "torch",
    "torch-compile",
    "torch-compile-bf16",
)
GPU_RUNTIMES = ("onnxruntime-cuda", "tensorrt")
PRECISION = {
    "onnxruntime": "fp32",
    "onnxruntime-specialised": "fp32",
    "onnxruntime-int8": "int8",
    "onnxruntime-cuda": "fp32",
    "torch": "fp32",
    "torch-bf16": "bf16",
    "torch-compile": "fp32",
    "torch-compile-bf16": "bf16",
    "tensorrt": "fp16",
}


def machine_conditions() -> dict[str, Any]:
    """What the figures depend on: CPU, its vector units, load, library versions."""
    import os
    import platform

    import onnxruntime

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    )
    flags = set(fields.get("flags", "").split())
    units = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return {
        "cpu": fields.get("model name", platform.processor()),
        "logical_cpus": os.cpu_count(),
        "vector_units": [unit for unit in units if unit in flags],
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def psnr(ours: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays (inf when identical)."""
    error = np.mean((ours.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * math.log10(255.0**2 / error))


def frame_gmac(graph: nn.Module, pose: torch.Tensor, texture: torch.Tensor,
               params: torch.Tensor) -> float:
    """Multiply-accumulates of one per-frame call, in GMAC per frame.

    Counts convolutions and linear layers (by forward hooks) and the adaptive 1x1 skip
    convs (matrix products with per-avatar weights), as the paper's cost figures do.
    """
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in graph.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    original_bmm = torch.bmm

    def counting_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return original_bmm(a, b)

    torch.bmm = counting_bmm  # type: ignore[assignment]
    try:
        with torch.no_grad():
            graph(pose, texture, params)
    finally:
        torch.bmm = original_bmm  # type: ignore[assignment]
        for handle in handles:
            handle.remove()
    return total / pose.shape[0] / 1e9


def conv_peak_gflops(threads: int, seconds: float = 1.5) -> float:
    """Sustained FP32 throughput of a large 3x3 convolution, the best of ORT and PyTorch."""
    import onnx
    from onnx import TensorProto, helper

    from server.runtime.onnx_runtime import OrtOptions, make_session

    channels, size = 128, 64
    macs = channels * channels * 9 * size * size
    x = np.random.default_rng(0).standard_normal((1, channels, size, size)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((channels, channels, 3, 3)).astype(np.float32)

    def best_rate(run: Callable[[], object]) -> float:
        run()
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return 2 * macs / min(times) / 1e9

    # ONNX Runtime: a one-node graph
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conv.onnx"
        onnx.save(model, str(path))
        session = make_session(path, OrtOptions(intra_op_threads=threads))
        ort_rate = best_rate(lambda: session.run(None, {"x": x}))

    # PyTorch
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    tx = torch.from_numpy(x)
    with torch.no_grad():
        torch_rate = best_rate(lambda: conv(tx))
    return max(ort_rate, torch_rate)


@dataclass
class Candidate:
    """One runtime under test: a name and a callable rendering the benchmark batch."""

    name: str
    precision: str
    render: Callable[[], tuple[np.ndarray, np.ndarray]]
    times: list[float]


def _real_or_random_sources(size: int, count: int, log: Callable[[str], None]) -> Any:
    from export.parity import astronaut_source, random_sources

    sources = random_sources(size, count, seed=1)
    try:
        photo = astronaut_source(size)
    except Exception as error:  # mediapipe missing or failing: random avatars only
        log(f"real photo unavailable ({error}); random avatars only")
        return sources
    return {key: np.concatenate([photo[key], sources[key][1:]]) for key in sources}


def run_frame_bench(
    *,
    preset: str = "paper",
    runtimes: list[str] | None = None,
    batch: int = 1,
    iterations: int = 50,
    threads: int | None = None,
    bundle: Path | None = None,
    rounds: int = 5,
    log: Callable[[str], None] = lambda message: logger.info("%s", message),
) -> dict[str, Any]:
    """Time each runtime on the same avatars and poses; returns the bench JSON."""
    from export.checkpoint import load_generator, random_generator
    from export.onnx_export import FrameGraph, RegisterGraph, export_frame_graph
    from export.parity import driving_poses
    from server.runtime.onnx_runtime import OnnxFrameRuntime, OrtOptions, physical_cores

    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    conditions = machine_conditions()
    names = list(runtimes or DEFAULT_RUNTIMES)
    unknown = [name for name in names if name not in PRECISION]
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; expected some of {sorted(PRECISION)}")

    # the model and a few avatars (the real photo first, when mediapipe can find it)
    if bundle is not None:
        from export.bundle import load_manifest

        manifest = load_manifest(bundle)
        model, cfg = load_generator(manifest.checkpoint_path)
        preset, trained = cfg.preset, manifest.trained
    else:
        model, cfg = random_generator(preset)
        trained = False
    size = cfg.image_size
    sources = _real_or_random_sources(size, max(2, batch), log)
    register = RegisterGraph(model).eval()
    with torch.no_grad():
        states = [
            register(*(torch.from_numpy(sources[k][i : i + 1])
                       for k in ("image", "stickman", "pose", "mask")))
            for i in range(sources["pose"].shape[0])
        ]
    textures = np.concatenate([s[0].numpy() for s in states])  # [A, 3, S, S]
    params = np.concatenate([s[1].numpy() for s in states])  # [A, P]

    # the timed batch: `batch` frames over the avatars; a fidelity set of 8 frames
    poses = driving_poses(sources["pose"][0], max(batch, 8), seed=3)
    rows = np.arange(max(batch, 8)) % textures.shape[0]
    timed = rows[:batch]
    feeds = {"pose": poses[:batch], "texture": textures[timed], "params": params[timed]}
    check = {"pose": poses, "texture": textures[rows], "params": params[rows]}

    graph = FrameGraph(model).eval()
    gmac = frame_gmac(graph, *(torch.from_numpy(feeds[k]) for k in ("pose", "texture", "params")))
    log(f"{preset}: {gmac:.2f} GMAC per frame, {graph.param_count} avatar params")

    with tempfile.TemporaryDirectory() as folder:
        frame_path = export_frame_graph(model, cfg, Path(folder) / "frame.onnx")
        candidates, skipped = [], []
        for name in names:
            try:
                render, check_render = _make_candidate(
                    name, graph, frame_path, feeds, check, textures, params, threads, folder, log
                )
            except Exception as error:  # a runtime that cannot load here is reported, not fatal
                log(f"{name}: skipped ({error})")
                skipped.append({"runtime": name, "reason": str(error)})
                continue
            candidates.append((Candidate(name, PRECISION[name], render, []), check_render))

        # fidelity against FP32 ONNX Runtime on the 8-frame set
        reference = OnnxFrameRuntime(
            frame_path, max_batch=len(rows), options=OrtOptions(intra_op_threads=threads)
        ).render(check["pose"], check["texture"], check["params"]).frames
        fidelity = {candidate.name: psnr(check_render()[0], reference)
                    for candidate, check_render in candidates}

        # interleaved rounds: every runtime once per round
        per_round = max(1, iterations // rounds)
        for _ in range(rounds):
            for candidate, _check in candidates:
                for _ in range(per_round):
                    started = time.perf_counter()
                    candidate.render()
                    candidate.times.append(time.perf_counter() - started)

    peak = conv_peak_gflops(threads)
    conditions["load_average_1min_after"] = machine_conditions()["load_average_1min"]
    results = []
    for candidate, _check in candidates:
        seconds = statistics.median(candidate.times)
        ms_per_frame = 1000 * seconds / batch
        results.append({
            "runtime": candidate.name,
            "precision": candidate.precision,
            "batch": batch,
            "ms_per_frame": round(ms_per_frame, 2),
            "fps": round(1000 / ms_per_frame, 1),
            "gflops": round(2 * gmac / (ms_per_frame / 1000), 1),
            "psnr_vs_fp32_db": round(fidelity.get(candidate.name, 0.0), 1),
            "ms_per_frame_p10": round(1000 * float(np.percentile(candidate.times, 10)) / batch, 2),
        })
        log(f"{candidate.name}: {ms_per_frame:.2f} ms/frame")
    return {
        "preset": preset,
        "weights": "trained" if trained else "random",
        "threads": threads,
        "frame_gmac": round(gmac, 3),
        "conv_peak_gflops": round(peak, 1),
        "results": results,
        "skipped": skipped,
        "conditions": conditions,
    }


def _make_candidate(
    name: str,
    graph: Any,
    frame_path: Path,
    feeds: dict[str, np.ndarray],
    check: dict[str, np.ndarray],
    textures: np.ndarray,
    params: np.ndarray,
    threads: int,
    folder: str,
    log: Callable[[str], None],
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(timed render, fidelity render) callables of one runtime."""
    from server.runtime.onnx_runtime import OnnxFrameRuntime, OrtOptions

    def runtime_pair(runtime: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
        def timed() -> Any:
            return runtime.render(feeds["pose"], feeds["texture"], feeds["params"])

        def fidelity() -> Any:
            batch = runtime.render(check["pose"], check["texture"], check["params"])
            return batch.frames, batch.masks

        return timed, fidelity

    batch = max(feeds["pose"].shape[0], check["pose"].shape[0])
    if name == "onnxruntime":
        options = OrtOptions(intra_op_threads=threads)
        return runtime_pair(OnnxFrameRuntime(frame_path, max_batch=batch, options=options))

    if name == "onnxruntime-int8":
        from export.quantize import quantize_frame_graph

        int8_path = Path(folder) / "frame.int8.onnx"
        calibration = [
            {k: check[k][i : i + 1] for k in ("pose", "texture", "params")}
            for i in range(check["pose"].shape[0])
        ]
        quantize_frame_graph(frame_path, int8_path, calibration)
        options = OrtOptions(intra_op_threads=threads)
        runtime = OnnxFrameRuntime(int8_path, max_batch=batch, options=options, precision="int8")
        return runtime_pair(runtime)

    if name == "onnxruntime-cuda":
        options = OrtOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
        return runtime_pair(OnnxFrameRuntime(frame_path, max_batch=batch, options=options))

    if name == "onnxruntime-specialised":
        return _specialised_candidate(graph, feeds, check, textures, params, threads, folder)

    if name == "tensorrt":
        from export.tensorrt_build import ensure_engine
        from server.runtime.tensorrt_runtime import TensorRTFrameRuntime

        engine = Path(folder) / "frame-fp16.engine"
        ensure_engine(frame_path, engine, max_batch=batch)
        return runtime_pair(TensorRTFrameRuntime(engine, frame_path, max_batch=batch))

    # PyTorch variants run the same FrameGraph module
    from server.runtime.torch_runtime import TorchFrameRuntime, TorchOptions

    options_t = TorchOptions(
        precision="bf16" if name.endswith("bf16") else "fp32",
        compile=name.startswith("torch-compile"),
        threads=threads,
    )
    torch_runtime = TorchFrameRuntime(copy.deepcopy(graph), max_batch=batch, options=options_t)
    if options_t.compile:
        started = time.perf_counter()
        torch_runtime.warm_up((feeds["pose"].shape[0], check["pose"].shape[0]))
        log(f"{name}: compiled in {time.perf_counter() - started:.0f} s")
    return runtime_pair(torch_runtime)


def _specialised_candidate(
    graph: Any,
    feeds: dict[str, np.ndarray],
    check: dict[str, np.ndarray],
    textures: np.ndarray,
    params: np.ndarray,
    threads: int,
    folder: str,
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """One specialised session per avatar; frames are grouped by avatar."""
    from export.onnx_export import export_specialised_frame_graph
    from server.runtime.onnx_runtime import OrtOptions, make_session

    sessions = []
    for a in range(textures.shape[0]):
        path = Path(folder) / f"frame.avatar{a}.onnx"
        export_specialised_frame_graph(
            graph, torch.from_numpy(textures[a : a + 1]), torch.from_numpy(params[a : a + 1]),
            path,
        )
        sessions.append(make_session(path, OrtOptions(intra_op_threads=threads)))

    def run(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # which avatar each row is: match its params against the avatars'
        owners = [int(np.argmin(np.abs(params - row).sum(1))) for row in batch["params"]]
        frames = np.empty((len(owners), *graph.identity_grid.shape[1:3], 3), np.uint8)
        masks = np.empty(frames.shape[:3], np.uint8)
        for a in sorted(set(owners)):
            rows = [i for i, owner in enumerate(owners) if owner == a]
            frame, mask = sessions[a].run(None, {"pose": batch["pose"][rows]})
            frames[rows], masks[rows] = frame, mask
        return frames, masks

    return (lambda: run(feeds)), (lambda: run(check))


def run_register_bench(
    *,
    preset: str = "paper",
    iterations: int = 3,
    threads: int | None = None,
    bundle: Path | None = None,
    log: Callable[[str], None] = lambda message: logger.info("%s", message),
) -> dict[str, Any]:
    """Seconds per registration in ONNX Runtime (CPU), with and without the Enhancer."""
    from export.checkpoint import load_generator, random_generator
    from export.onnx_export import export_register_graph
    from export.parity import random_sources
    from server.runtime.onnx_runtime import OnnxRegistrationRuntime, OrtOptions, physical_cores

    threads = threads or physical_cores()
    if bundle is not None:
        from export.bundle import load_manifest

        model, cfg = load_generator(load_manifest(bundle).checkpoint_path)
    else:
        model, cfg = random_generator(preset)
    sources = random_sources(cfg.image_size, 1, seed=0)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for enhance in (True, False):
            path = Path(folder) / f"register-{enhance}.onnx"
            log(f"exporting the registration graph (enhancer: {enhance})")
            export_register_graph(model, cfg, path, enhance=enhance)
            runtime = OnnxRegistrationRuntime(path, options=OrtOptions(intra_op_threads=threads))
            runtime.register(**sources)
            times = []
            for _ in range(iterations):
                started = time.perf_counter()
                runtime.register(**sources)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            log(f"registration (enhancer: {enhance}): {seconds:.3f} s")
            results.append({"runtime": "onnxruntime", "enhancer": enhance,
                            "seconds": round(seconds, 3)})
    return {"preset": preset, "threads": threads, "results": results}
