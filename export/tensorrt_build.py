"""TensorRT engine for the per-frame graph: build, describe, and refuse stale engines.

An engine is tied to the TensorRT version, the GPU model and the exact ONNX file it came
from. Each engine file `NAME.engine` has `NAME.json` beside it with those facts; a runtime
compares them with what it finds and refuses a mismatch with a message that says what
differs and how to rebuild. TensorRT and the CUDA bindings are imported inside functions:
this module loads on machines without them.

FP16: TensorRT 11 dropped the builder's FP16 flag (networks are always strongly typed), so
the engine is built from an FP16 copy of the ONNX graph whose inputs and outputs stay as
they are (float32 in, uint8 out). The warp (GridSample and the grid it reads) stays in
FP32: a half-precision grid is off by up to a tenth of a pixel at 256 px.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

ENGINE_FORMAT = 1
Precision = Literal["fp16", "fp32"]


class StaleEngineError(RuntimeError):
    """An engine does not match this machine or its ONNX source; the message says why."""


@dataclass(frozen=True)
class EngineMetadata:
    """What an engine was built from and for; stored as JSON beside the engine."""

    format: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, int]  # {"min": 1, "opt": N, "max": M} over the batch axis
    source_onnx: str
    source_onnx_sha256: str
    image_size: int
    param_count: int
    created: str
    build_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path(engine_path: Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def default_engine_path(bundle_dir: Path, precision: Precision = "fp16") -> Path:
    """Where `avatar build-engine` puts the engine of a bundle unless told otherwise."""
    return Path(bundle_dir) / "engines" / f"frame-{precision}.engine"


def import_tensorrt() -> Any:
    """The tensorrt module, or ImportError with the install hint."""
    try:
        import tensorrt
    except ImportError as error:
        raise ImportError(
            "TensorRT is not installed: pip install 'bilayer-avatar-server[gpu]' "
            "(tensorrt-cu12 and cuda-python) on a machine with an NVIDIA GPU"
        ) from error
    return tensorrt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (new and old module layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as error:
            raise ImportError(
                "cuda-python is not installed: pip install 'bilayer-avatar-server[gpu]'"
            ) from error
    return cudart


def cuda_call(result: Any) -> Any:
    """Unwrap a cuda-python call `(error, value...)`; raise on a CUDA error."""
    cudart = import_cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        raise RuntimeError(f"CUDA error {int(error)}: {text.decode(errors='replace')}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of one CUDA device."""
    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


def engine_problems(
    metadata: dict[str, Any],
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str,
    max_batch: int,
    precision: str,
) -> list[str]:
    """Every way an engine's metadata differs from what is needed; empty when usable."""
    problems = []
    expected = {
        "format": ENGINE_FORMAT,
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "source_onnx_sha256": onnx_sha256,
        "precision": precision,
    }
    for key, value in expected.items():
        if metadata.get(key) != value:
            problems.append(f"{key}: engine has {metadata.get(key)!r}, need {value!r}")

    profile_max = int(metadata.get("profile", {}).get("max", 0))
    if profile_max < max_batch:
        problems.append(f"profile: engine serves batch up to {profile_max}, need {max_batch}")
    return problems


def check_engine(
    engine_path: Path, onnx_path: Path, *, max_batch: int, precision: str, device: int = 0
) -> dict[str, Any]:
    """The engine's metadata if it fits this machine and ONNX file; StaleEngineError if not."""
    engine_path = Path(engine_path)
    meta_path = metadata_path(engine_path)
    if not engine_path.exists() or not meta_path.exists():
        raise StaleEngineError(
            f"no engine at {engine_path} (with {meta_path.name} beside it): "
            "run `avatar build-engine`"
        )

    metadata = json.loads(meta_path.read_text())
    trt = import_tensorrt()
    gpu_name, capability = gpu_identity(device)
    problems = engine_problems(
        metadata,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        onnx_sha256=sha256_file(onnx_path),
        max_batch=max_batch,
        precision=precision,
    )
    if problems:
        raise StaleEngineError(
            f"engine {engine_path} does not match: " + "; ".join(problems)
            + ". Rebuild it with `avatar build-engine --rebuild`."
        )
    return metadata


def fp16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """An FP16 copy of the per-frame graph: float32 inputs, uint8 outputs, FP32 warp."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))

    # the grid (identity + offsets) and the sampling stay in float32
    keep = [node.name for node in model.graph.node if node.op_type == "GridSample"]
    keep += [node.name for node in model.graph.node if "warp" in node.name.lower()]
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep, disable_shape_infer=False
    )
    onnx.save(converted, str(out_path))
    return Path(out_path)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    max_batch: int = 16,
    opt_batch: int | None = None,
    precision: Precision = "fp16",
    workspace_gib: float = 4.0,
    device: int = 0,
) -> EngineMetadata:
    """Build a per-frame engine with one profile over batch 1..max_batch; write metadata.

    The timing cache `timing.cache` in the engine's folder makes rebuilds fast.
    """
    import onnx

    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # read the static sizes from the ONNX inputs
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = {
        tensor.name: [
            d.dim_value if d.HasField("dim_value") else -1
            for d in tensor.type.tensor_type.shape.dim
        ]
        for tensor in graph.input
    }
    image_size, param_count = dims["texture"][2], dims["params"][1]

    # FP16 engines are built from the FP16 copy of the graph (strongly typed network)
    source = onnx_path
    if precision == "fp16":
        source = fp16_onnx(onnx_path, engine_path.with_suffix(".fp16.onnx"))

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {source}: " + "; ".join(errors))

    # one optimisation profile over the batch axis
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt = opt_batch or max(1, max_batch // 2)
    profile = builder.create_optimization_profile()
    for name, shape in dims.items():
        rest = tuple(shape[1:])
        profile.set_shape(name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    # the timing cache survives rebuilds
    cache_path = engine_path.parent / "timing.cache"
    cache_bytes = cache_path.read_bytes() if cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    logger.info("building TensorRT %s engine from %s (batch 1..%d)", precision, source, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {source}")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    # metadata beside the engine
    gpu_name, capability = gpu_identity(device)
    metadata = EngineMetadata(
        format=ENGINE_FORMAT,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=precision,
        profile={"min": 1, "opt": opt, "max": max_batch},
        source_onnx=onnx_path.name,
        source_onnx_sha256=sha256_file(onnx_path),
        image_size=image_size,
        param_count=param_count,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.perf_counter() - started, 1),
    )
    metadata_path(engine_path).write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")
    logger.info("engine %s built in %.1f s", engine_path, metadata.build_seconds)
    return metadata


def ensure_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    max_batch: int,
    precision: Precision = "fp16",
    rebuild: bool = False,
    device: int = 0,
) -> dict[str, Any]:
    """Reuse a matching engine; build one when missing, or when stale and `rebuild` is set."""
    if not rebuild:
        try:
            return check_engine(
                engine_path, onnx_path, max_batch=max_batch, precision=precision, device=device
            )
        except StaleEngineError as error:
            if Path(engine_path).exists():
                raise
            logger.info("%s", error)
    return build_engine(
        onnx_path, engine_path, max_batch=max_batch, precision=precision, device=device
    ).to_dict()
