"""ONNX Runtime runtimes: the per-frame graph and the registration graph.

The CPU provider is the default runtime of the server. The CUDA and TensorRT execution
providers use the same classes with another provider list; `gpu_placement` checks, by
profiling one run, that every compute node (GridSample included) really ran on the GPU.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.runtime.base import AvatarTensors, FrameBatch, RuntimeFailure

logger = logging.getLogger(__name__)

FRAME_INPUTS = ("pose", "texture", "params")
FRAME_OUTPUTS = ("frame", "mask")
REGISTER_INPUTS = ("image", "stickman", "pose", "mask")
REGISTER_OUTPUTS = ("texture", "params")
POSE_SIZE = 136

# ONNX Runtime keeps shape arithmetic on the CPU next to a GPU provider on purpose: such
# nodes output a few integers. A CPU node with a larger floating-point output is a fallback.
SMALL_OUTPUT_BYTES = 1024

def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores: set[tuple[str, str]] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""

    # /proc/cpuinfo lists one paragraph per logical CPU
    for paragraph in text.strip().split("\n\n"):
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in paragraph.splitlines())
        )
        if "processor" not in fields:
            continue
        if allowed is not None and int(fields["processor"]) not in allowed:
            continue
        cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))

    if cores:
        return len(cores)
    return len(allowed) if allowed else (os.cpu_count() or 1)


@dataclass(frozen=True)
class OrtOptions:
    """How an ONNX Runtime session is built."""

    providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",)
    intra_op_threads: int | None = None  # None: physical cores
    optimized_model_path: Path | None = None  # write the optimised graph here (debugging)
    profile_dir: Path | None = None  # profile every run into this folder
    extra_config: dict[str, str] = field(default_factory=dict)


def provider_kind(providers: Sequence[str | tuple[str, dict[str, Any]]]) -> str:
    """Short name of the first provider: cpu, cuda or tensorrt."""
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return {
        "CPUExecutionProvider": "cpu",
        "CUDAExecutionProvider": "cuda",
        "TensorrtExecutionProvider": "tensorrt",
    }.get(first, first)


def make_session(model_path: Path, options: OrtOptions) -> Any:
    """One tuned inference session; fails with RuntimeFailure naming the file and reason."""
    import onnxruntime as ort

    # tuned for one process that owns the machine: all physical cores in one operator,
    # every graph rewrite, the arena and memory patterns (shapes repeat frame after frame)
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads or physical_cores()
    session_options.inter_op_num_threads = 1
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.enable_cpu_mem_arena = True
    session_options.enable_mem_pattern = True
    session_options.log_severity_level = 3
    if options.optimized_model_path is not None:
        session_options.optimized_model_filepath = str(options.optimized_model_path)
    if options.profile_dir is not None:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = str(Path(options.profile_dir) / "ort")
    for key, value in options.extra_config.items():
        session_options.add_session_config_entry(key, value)

    # a provider that this onnxruntime build lacks is an error, not a silent CPU run
    available = set(ort.get_available_providers())
    wanted = [p if isinstance(p, str) else p[0] for p in options.providers]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise RuntimeFailure(
            f"onnxruntime {ort.__version__} lacks provider(s) {missing}; "
            f"available: {sorted(available)}"
        )

    try:
        session = ort.InferenceSession(
            str(model_path), sess_options=session_options, providers=list(options.providers)
        )
    except Exception as error:  # onnxruntime raises its own exception types
        raise RuntimeFailure(f"cannot load {model_path}: {error}") from error

    logger.info(
        "onnxruntime session %s: providers %s, %d intra-op threads",
        Path(model_path).name,
        session.get_providers(),
        session_options.intra_op_num_threads,
    )
    return session


def _check_names(session: Any, path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    got_inputs = [i.name for i in session.get_inputs()]
    got_outputs = [o.name for o in session.get_outputs()]
    if sorted(got_inputs) != sorted(inputs) or sorted(got_outputs) != sorted(outputs):
        raise RuntimeFailure(
            f"{path}: expected inputs {list(inputs)} and outputs {list(outputs)}, "
            f"got inputs {got_inputs} and outputs {got_outputs}"
        )


def _static_dim(session: Any, name: str, axis: int, path: Path) -> int:
    shape = next(i.shape for i in session.get_inputs() if i.name == name)
    value = shape[axis]
    if not isinstance(value, int):
        raise RuntimeFailure(f"{path}: input {name} axis {axis} must be static, got {value!r}")
    return value


def check_frame_inputs(
    poses: np.ndarray,
    textures: np.ndarray,
    params: np.ndarray,
    image_size: int,
    param_count: int,
    max_batch: int,
) -> int:
    """Validate one per-frame batch; returns the batch size."""
    batch = poses.shape[0] if poses.ndim == 2 else -1
    expected = {
        "poses": (poses, (batch, POSE_SIZE)),
        "textures": (textures, (batch, 3, image_size, image_size)),
        "params": (params, (batch, param_count)),
    }
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(array.shape)}")
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch: expected 1..{max_batch}, got {batch}")
    return batch


class OnnxFrameRuntime:
    """The stateless per-frame graph in ONNX Runtime (CPU, CUDA or TensorRT provider)."""

    def __init__(
        self,
        model_path: Path,
        *,
        max_batch: int = 8,
        options: OrtOptions | None = None,
        precision: str = "fp32",
    ) -> None:
        self.options = options or OrtOptions()
        self.model_path = Path(model_path)
        self.session = make_session(self.model_path, self.options)
        _check_names(self.session, self.model_path, FRAME_INPUTS, FRAME_OUTPUTS)

        self.kind = provider_kind(self.options.providers)
        self.name = f"onnxruntime-{self.kind}"
        self.precision = precision
        self.image_size = _static_dim(self.session, "texture", 2, self.model_path)
        self.param_count = _static_dim(self.session, "params", 1, self.model_path)
        self.max_batch = max_batch

    def render(self, poses: np.ndarray, textures: np.ndarray, params: np.ndarray) -> FrameBatch:
        """Render one batch: rows may belong to different avatars."""
        poses = np.ascontiguousarray(poses, dtype=np.float32)  # [B, 136]
        textures = np.ascontiguousarray(textures, dtype=np.float32)  # [B, 3, H, W]
        params = np.ascontiguousarray(params, dtype=np.float32)  # [B, P]
        batch = check_frame_inputs(
            poses, textures, params, self.image_size, self.param_count, self.max_batch
        )
        size = self.image_size

        # the outputs are written straight into fresh numpy arrays (the caller keeps them)
        frames = np.empty((batch, size, size, 3), dtype=np.uint8)  # [B, H, W, 3]
        masks = np.empty((batch, size, size), dtype=np.uint8)  # [B, H, W]
        binding = self.session.io_binding()
        binding.bind_cpu_input("pose", poses)
        binding.bind_cpu_input("texture", textures)
        binding.bind_cpu_input("params", params)
        binding.bind_output("frame", "cpu", 0, np.uint8, frames.shape, frames.ctypes.data)
        binding.bind_output("mask", "cpu", 0, np.uint8, masks.shape, masks.ctypes.data)

        try:
            self.session.run_with_iobinding(binding)
        except Exception as error:
            raise RuntimeFailure(f"{self.name} failed on a batch of {batch}: {error}") from error
        return FrameBatch(frames=frames, masks=masks)

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees its memory with it)."""
        self.session = None


class OnnxRegistrationRuntime:
    """The registration graph (Embedder, Texture Generator, projectors, Enhancer)."""

    def __init__(self, model_path: Path, *, options: OrtOptions | None = None) -> None:
        self.options = options or OrtOptions()
        self.model_path = Path(model_path)
        self.session = make_session(self.model_path, self.options)
        _check_names(self.session, self.model_path, REGISTER_INPUTS, REGISTER_OUTPUTS)

        self.name = f"onnxruntime-{provider_kind(self.options.providers)}"
        self.image_size = _static_dim(self.session, "image", 2, self.model_path)

    def register(
        self, image: np.ndarray, stickman: np.ndarray, pose: np.ndarray, mask: np.ndarray
    ) -> AvatarTensors:
        """Texture [3, H, W] and Inference Generator params [P] of one avatar."""
        size = self.image_size
        feeds = {
            "image": np.ascontiguousarray(image, dtype=np.float32),  # [1, 3, H, W]
            "stickman": np.ascontiguousarray(stickman, dtype=np.float32),  # [1, 3, H, W]
            "pose": np.ascontiguousarray(pose, dtype=np.float32),  # [1, 136]
            "mask": np.ascontiguousarray(mask, dtype=np.float32),  # [1, 1, H, W]
        }
        expected = {
            "image": (1, 3, size, size),
            "stickman": (1, 3, size, size),
            "pose": (1, POSE_SIZE),
            "mask": (1, 1, size, size),
        }
        for name, shape in expected.items():
            if feeds[name].shape != shape:
                raise ValueError(
                    f"{name}: expected shape {list(shape)}, got {list(feeds[name].shape)}"
                )

        try:
            texture, params = self.session.run(list(REGISTER_OUTPUTS), feeds)
        except Exception as error:
            raise RuntimeFailure(f"{self.name} registration failed: {error}") from error
        return AvatarTensors(texture=texture[0], params=params[0])

    def close(self) -> None:
        """Drop the session."""
        self.session = None


@dataclass(frozen=True)
class NodeRun:
    """One node of a profiled run: where it ran and what it wrote."""

    name: str
    op_type: str
    provider: str
    output_bytes: int
    output_types: tuple[str, ...]

    @property
    def on_cpu(self) -> bool:
        return self.provider == "CPUExecutionProvider"

    @property
    def is_shape_op(self) -> bool:
        """Integer or tiny outputs: shape bookkeeping that may stay on the CPU."""
        floating = any(t in ("float", "float16", "bfloat16", "double") for t in self.output_types)
        return not floating or self.output_bytes <= SMALL_OUTPUT_BYTES


def node_placement(profile_path: Path) -> list[NodeRun]:
    """Every node of an ONNX Runtime profile file with its provider."""
    events = json.loads(Path(profile_path).read_text())
    nodes: dict[str, NodeRun] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        name = event["name"].removesuffix("_kernel_time")
        types = tuple(key for shape in args.get("output_type_shape", []) for key in shape)
        nodes[name] = NodeRun(
            name=name,
            op_type=args.get("op_name", "?"),
            provider=args["provider"],
            output_bytes=int(args.get("output_size", 0)),
            output_types=types,
        )
    return list(nodes.values())


def gpu_placement(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Run once with profiling; return {"gpu": [...], "cpu_shape_ops": [...], "cpu": [...]}.

    The session must have been made with `OrtOptions(profile_dir=...)`. A non-empty "cpu"
    list names compute nodes that fell back to the CPU provider.
    """
    session.run(None, feeds)
    profile = Path(session.end_profiling())

    report: dict[str, list[str]] = {"gpu": [], "cpu_shape_ops": [], "cpu": []}
    for node in node_placement(profile):
        label = f"{node.name} ({node.op_type})"
        if not node.on_cpu:
            report["gpu"].append(label)
        elif node.is_shape_op:
            report["cpu_shape_ops"].append(label)
        else:
            report["cpu"].append(label)
    return report
