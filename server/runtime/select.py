"""Choose and build a runtime from settings, with an explicit, logged fallback order.

`kind="auto"` tries, in order, native TensorRT, ONNX Runtime CUDA and ONNX Runtime CPU
for frames (ONNX Runtime CUDA, then CPU, for registration), logs why each candidate that
is skipped was skipped, and returns the first that loads. A named kind never falls back:
asking for "tensorrt" on a machine without it is an error that says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from export.bundle import load_manifest
from server.runtime.base import FrameRuntime, RegistrationRuntime, RuntimeFailure

if TYPE_CHECKING:
    from server.runtime.onnx_runtime import OrtOptions

logger = logging.getLogger(__name__)

RuntimeKind = Literal[
    "auto", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch"
]
FRAME_FALLBACK: tuple[RuntimeKind, ...] = ("tensorrt", "onnxruntime-cuda", "onnxruntime")
REGISTRATION_FALLBACK: tuple[RuntimeKind, ...] = ("onnxruntime-cuda", "onnxruntime")


def _check_kind(kind: str) -> None:
    if kind not in get_args(RuntimeKind):
        raise ValueError(f"runtime: expected one of {list(get_args(RuntimeKind))}, got {kind!r}")


def _ort_providers(kind: str, engine_dir: Path) -> list[str | tuple[str, dict[str, str]]]:
    """Provider list of an ONNX Runtime kind (GPU kinds keep the CPU for shape ops)."""
    if kind == "onnxruntime":
        return ["CPUExecutionProvider"]
    if kind == "onnxruntime-cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt_options = {
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir / "ort-trt"),
        "trt_timing_cache_enable": "True",
    }
    return [
        ("TensorrtExecutionProvider", trt_options),
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def _verify_placement(model_path: Path, kind: str, options: OrtOptions) -> None:
    """Profile one run of a GPU session; refuse it when compute nodes fell back to CPU."""
    import dataclasses
    import tempfile

    import numpy as np

    from server.runtime.onnx_runtime import gpu_placement, make_session

    with tempfile.TemporaryDirectory() as profile_dir:
        probe = make_session(
            model_path, dataclasses.replace(options, profile_dir=Path(profile_dir))
        )
        feeds = {
            i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in probe.get_inputs()
        }
        report = gpu_placement(probe, feeds)
    logger.info(
        "%s placement of %s: %d nodes on the GPU, %d shape nodes on the CPU",
        kind, model_path.name, len(report["gpu"]), len(report["cpu_shape_ops"]),
    )
    if report["cpu"]:
        raise RuntimeFailure(
            f"{kind}: {len(report['cpu'])} compute node(s) of {model_path.name} fell back to "
            f"the CPU: {', '.join(report['cpu'][:10])}"
        )


def _build_frame(
    kind: str,
    bundle_dir: Path,
    max_batch: int,
    precision: str,
    engine_dir: Path,
    threads: int | None,
    rebuild_engine: bool,
) -> FrameRuntime:
    manifest = load_manifest(bundle_dir)
    frame_path = manifest.graph_path("frame")

    if kind == "tensorrt":
        from export.tensorrt_build import ensure_engine
        from server.runtime.tensorrt_runtime import TensorRTFrameRuntime, tensorrt_available

        reason = tensorrt_available()
        if reason:
            raise RuntimeFailure(f"tensorrt unavailable: {reason}")
        trt_precision = "fp32" if precision == "fp32" else "fp16"
        engine_path = engine_dir / f"frame-{trt_precision}.engine"
        try:
            ensure_engine(
                frame_path, engine_path, max_batch=max_batch,
                precision=trt_precision, rebuild=rebuild_engine,  # type: ignore[arg-type]
            )
        except RuntimeError as error:
            raise RuntimeFailure(str(error)) from error
        return TensorRTFrameRuntime(
            engine_path, frame_path, max_batch=max_batch, precision=trt_precision
        )

    if kind.startswith("onnxruntime"):
        from server.runtime.onnx_runtime import OnnxFrameRuntime, OrtOptions

        options = OrtOptions(providers=_ort_providers(kind, engine_dir), intra_op_threads=threads)
        if kind != "onnxruntime":
            _verify_placement(frame_path, kind, options)
        return OnnxFrameRuntime(frame_path, max_batch=max_batch, options=options)

    from server.runtime.torch_runtime import TorchFrameRuntime, TorchOptions

    device = "cuda" if precision == "fp16" else "cpu"
    options_t = TorchOptions(
        device=device, precision=precision, compile=precision != "fp32", threads=threads
    )
    return TorchFrameRuntime.from_checkpoint(
        manifest.checkpoint_path, max_batch=max_batch, options=options_t
    )


def build_frame_runtime(
    kind: RuntimeKind,
    bundle_dir: Path,
    max_batch: int = 8,
    precision: str = "fp32",
    *,
    engine_dir: Path | None = None,
    threads: int | None = None,
    rebuild_engine: bool = False,
) -> FrameRuntime:
    """The per-frame runtime named by `kind` ("auto": the first that loads, in order).

    `precision` applies where the runtime offers it: TensorRT builds FP16 unless "fp32";
    the PyTorch runtime takes "fp32" or "bf16" (compiled) on the CPU, "fp16" on CUDA.
    ONNX Runtime runs the FP32 graph. `engine_dir` holds TensorRT engines (default: the
    bundle's `engines/`).
    """
    _check_kind(kind)
    bundle_dir = Path(bundle_dir)
    engine_dir = Path(engine_dir) if engine_dir else bundle_dir / "engines"
    candidates = FRAME_FALLBACK if kind == "auto" else (kind,)

    failures = []
    for candidate in candidates:
        try:
            runtime = _build_frame(
                candidate, bundle_dir, max_batch, precision, engine_dir, threads, rebuild_engine
            )
        except (RuntimeFailure, ImportError) as error:
            if kind != "auto":
                raise RuntimeFailure(f"runtime {candidate!r} failed to load: {error}") from error
            logger.info("frame runtime %s skipped: %s", candidate, error)
            failures.append(f"{candidate}: {error}")
            continue
        logger.info(
            "frame runtime: %s (%s, batch up to %d) from %s",
            runtime.name, runtime.precision, runtime.max_batch, bundle_dir,
        )
        return runtime
    raise RuntimeFailure("no frame runtime could be loaded: " + "; ".join(failures))


def build_registration_runtime(
    kind: RuntimeKind,
    bundle_dir: Path,
    *,
    threads: int | None = None,
) -> RegistrationRuntime:
    """The registration runtime named by `kind` ("auto": ONNX Runtime CUDA, then CPU).

    Native TensorRT has no registration engine (it runs once per avatar); "tensorrt"
    uses ONNX Runtime with the CUDA provider for registration.
    """
    _check_kind(kind)
    manifest = load_manifest(bundle_dir)
    register_path = manifest.graph_path("register")
    if kind == "auto":
        candidates: tuple[str, ...] = REGISTRATION_FALLBACK
    elif kind == "tensorrt":
        candidates = ("onnxruntime-cuda",)
    else:
        candidates = (kind,)

    failures = []
    for candidate in candidates:
        try:
            if candidate == "torch":
                from server.runtime.torch_runtime import TorchRegistrationRuntime

                runtime: RegistrationRuntime = TorchRegistrationRuntime(manifest.checkpoint_path)
            else:
                from server.runtime.onnx_runtime import OnnxRegistrationRuntime, OrtOptions

                providers = _ort_providers(candidate, Path(bundle_dir) / "engines")
                if candidate == "onnxruntime-tensorrt":
                    providers = providers[1:]  # registration runs once; CUDA is enough
                options = OrtOptions(providers=providers, intra_op_threads=threads)
                runtime = OnnxRegistrationRuntime(register_path, options=options)
        except (RuntimeFailure, ImportError) as error:
            if kind != "auto":
                raise RuntimeFailure(f"runtime {candidate!r} failed to load: {error}") from error
            logger.info("registration runtime %s skipped: %s", candidate, error)
            failures.append(f"{candidate}: {error}")
            continue
        logger.info("registration runtime: %s from %s", runtime.name, bundle_dir)
        return runtime
    raise RuntimeFailure("no registration runtime could be loaded: " + "; ".join(failures))
