"""PyTorch runtimes: the reference implementation, and the fastest CPU path where the
compiler wins (torch.compile with BF16 on CPUs with fast BF16 matrix units).

They run the very modules that are exported to ONNX (`export.onnx_export.FrameGraph` and
`RegisterGraph`), loaded from the bundle's `checkpoint.pt`, so their inputs and outputs
match the ONNX graphs exactly (folded avatar parameters, uint8 frames). PyTorch is an
optional extra: it is imported when a runtime is built, never at module level.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.runtime.base import AvatarTensors, FrameBatch, RuntimeFailure
from server.runtime.onnx_runtime import check_frame_inputs, physical_cores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchOptions:
    """How the PyTorch runtime runs the graph."""

    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (CUDA only)
    compile: bool = False  # torch.compile (max-autotune-no-cudagraphs on CPU)
    cuda_graphs: bool = False  # CUDA only: compile with mode="reduce-overhead"
    threads: int | None = None  # CPU threads; None: physical cores


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise RuntimeFailure(
            "the PyTorch runtime needs PyTorch: pip install 'bilayer-avatar-server[torch]'"
        ) from error
    return torch


def _dtype(torch: Any, precision: str, device: str) -> Any:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision: expected one of {sorted(dtypes)}, got {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on the CPU")
    return dtypes[precision]


class TorchFrameRuntime:
    """The per-frame graph in PyTorch (eager or compiled; FP32, BF16 or FP16)."""

    def __init__(
        self, graph: Any, *, max_batch: int = 8, options: TorchOptions | None = None
    ) -> None:
        torch = _import_torch()
        self.options = options or TorchOptions()
        device = self.options.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeFailure(f"device {device!r} asked for, but CUDA is not available")
        if device == "cpu":
            torch.set_num_threads(self.options.threads or physical_cores())

        self.dtype = _dtype(torch, self.options.precision, device)
        self.graph = graph.to(device).eval()
        if self.precision_is_reduced:
            self.graph.set_network_dtype(self.dtype)
        self.name = f"torch-{device.split(':')[0]}"
        self.precision = self.options.precision
        self.image_size = int(graph.image_size)
        self.param_count = int(graph.param_count)
        self.max_batch = max_batch
        self._torch = torch
        self._lock = threading.Lock()
        self._forward = self._build_forward()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Path, *, max_batch: int = 8, options: TorchOptions | None = None
    ) -> TorchFrameRuntime:
        """Load the generator of a bundle (or training) checkpoint."""
        _import_torch()
        from export.checkpoint import load_generator
        from export.onnx_export import FrameGraph

        model, _ = load_generator(checkpoint)
        return cls(FrameGraph(model), max_batch=max_batch, options=options)

    @property
    def precision_is_reduced(self) -> bool:
        return self.options.precision != "fp32"

    def _build_forward(self) -> Any:
        """The callable that maps (pose, texture, params) tensors to uint8 outputs."""
        torch = self._torch
        graph = self.graph
        if self.options.device == "cpu":
            # oneDNN prefers channels-last activations for its convolutions
            graph = graph.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        if not (self.options.compile or self.options.cuda_graphs):

            def forward(pose: Any, texture: Any, params: Any) -> Any:
                with torch.inference_mode():
                    return graph(pose, texture, params)

            return forward

        mode = "reduce-overhead" if self.options.cuda_graphs else "max-autotune-no-cudagraphs"
        if self.options.device == "cpu":
            # frozen weights let the CPU backend pre-pack convolutions for oneDNN
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            mode = "default"
        compiled = torch.compile(graph, mode=mode, dynamic=False)

        # no_grad, not inference_mode: the compiler's frozen parameters keep version
        # counters, which inference tensors cannot carry
        def compiled_forward(pose: Any, texture: Any, params: Any) -> Any:
            with torch.no_grad():
                return compiled(pose, texture, params)

        return compiled_forward

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run (and for compiled graphs, compile) each batch size once; returns seconds."""
        started = time.perf_counter()
        size, count = self.image_size, self.param_count
        for batch in batch_sizes:
            self.render(
                np.zeros((batch, 136), np.float32),
                np.zeros((batch, 3, size, size), np.float32),
                np.zeros((batch, count), np.float32),
            )
        return time.perf_counter() - started

    def render(self, poses: np.ndarray, textures: np.ndarray, params: np.ndarray) -> FrameBatch:
        """Render one batch (rows may belong to different avatars)."""
        torch = self._torch
        poses = np.asarray(poses, dtype=np.float32)
        textures = np.asarray(textures, dtype=np.float32)
        params = np.asarray(params, dtype=np.float32)
        check_frame_inputs(
            poses, textures, params, self.image_size, self.param_count, self.max_batch
        )

        device = self.options.device
        with self._lock:
            try:
                frame, mask = self._forward(
                    torch.from_numpy(poses).to(device),  # [B, 136]
                    torch.from_numpy(textures).to(device),  # [B, 3, H, W]
                    torch.from_numpy(params).to(device),  # [B, P]
                )
            except Exception as error:
                raise RuntimeFailure(f"{self.name} failed: {error}") from error
        return FrameBatch(frames=frame.cpu().numpy(), masks=mask.cpu().numpy())

    def close(self) -> None:
        """Drop the module (and the compiled code with it)."""
        self.__dict__.pop("graph", None)
        self._forward = None


class TorchRegistrationRuntime:
    """The registration graph in PyTorch (FP32; CPU or CUDA)."""

    def __init__(self, checkpoint: Path, *, device: str = "cpu", enhance: bool = True) -> None:
        torch = _import_torch()
        from export.checkpoint import load_generator
        from export.onnx_export import RegisterGraph

        model, cfg = load_generator(checkpoint)
        self.graph = RegisterGraph(model, enhance=enhance).to(device).eval()
        self.device = device
        self.name = f"torch-{device.split(':')[0]}"
        self.image_size = cfg.image_size
        self._torch = torch

    def register(
        self, image: np.ndarray, stickman: np.ndarray, pose: np.ndarray, mask: np.ndarray
    ) -> AvatarTensors:
        """Texture [3, H, W] and folded params [P] of one avatar."""
        torch = self._torch
        tensors = [
            torch.from_numpy(np.asarray(array, dtype=np.float32)).to(self.device)
            for array in (image, stickman, pose, mask)
        ]
        with torch.inference_mode():
            texture, params = self.graph(*tensors)
        return AvatarTensors(texture=texture[0].cpu().numpy(), params=params[0].cpu().numpy())

    def close(self) -> None:
        """Drop the module."""
        self.__dict__.pop("graph", None)
