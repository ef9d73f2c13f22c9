"""Native TensorRT runtime for the per-frame graph.

Loads an engine built by `avatar build-engine` (after checking its metadata against this
GPU, this TensorRT and the bundle's ONNX file), then runs batches with the named-tensor
API: input shapes set per call, `execute_async_v3` on one CUDA stream, device buffers
sized for the largest batch allocated once and reused by every call. Buffers come from
cuda-python, so the serving install needs no PyTorch. TensorRT is imported lazily.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from export.tensorrt_build import (
    StaleEngineError,
    check_engine,
    cuda_call,
    import_cudart,
    import_tensorrt,
)
from server.runtime.base import FrameBatch, RuntimeFailure
from server.runtime.onnx_runtime import FRAME_INPUTS, FRAME_OUTPUTS, check_frame_inputs

logger = logging.getLogger(__name__)


class _Buffer:
    """One device buffer and its pinned host mirror, both sized for the largest batch."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        cudart = import_cudart()
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.nbytes = self.row_bytes * shape[0]
        self.device = cuda_call(cudart.cudaMalloc(self.nbytes))
        self.host_ptr = cuda_call(cudart.cudaMallocHost(self.nbytes))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(int(self.host_ptr))
        self.host = np.frombuffer(memoryview(raw), dtype=self.dtype).reshape(shape)

    def free(self) -> None:
        cudart = import_cudart()
        cuda_call(cudart.cudaFree(self.device))
        cuda_call(cudart.cudaFreeHost(self.host_ptr))


class TensorRTFrameRuntime:
    """Per-frame engine on one GPU; one batch at a time (calls are serialised)."""

    name = "tensorrt"

    def __init__(
        self,
        engine_path: Path,
        onnx_path: Path,
        *,
        max_batch: int = 16,
        precision: str = "fp16",
        device: int = 0,
    ) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        self.precision = precision
        self.engine_path = Path(engine_path)

        # refuse an engine built for another GPU, TensorRT or ONNX file
        try:
            self.metadata = check_engine(
                engine_path, onnx_path, max_batch=max_batch, precision=precision, device=device
            )
        except StaleEngineError as error:
            raise RuntimeFailure(str(error)) from error

        cuda_call(cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeFailure(f"TensorRT could not deserialise {self.engine_path}")
        self.context = self.engine.create_execution_context()

        # the engine's I/O contract: names, modes, dtypes, static sizes
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(FRAME_INPUTS) or sorted(outputs) != sorted(FRAME_OUTPUTS):
            raise RuntimeFailure(
                f"{self.engine_path}: expected inputs {list(FRAME_INPUTS)} and outputs "
                f"{list(FRAME_OUTPUTS)}, got {inputs} and {outputs}"
            )
        texture_shape = tuple(self.engine.get_tensor_shape("texture"))
        self.image_size = int(texture_shape[2])
        self.param_count = int(tuple(self.engine.get_tensor_shape("params"))[1])
        self.max_batch = int(self.metadata["profile"]["max"])

        # device buffers for the largest batch, bound once
        size, batch = self.image_size, self.max_batch
        shapes = {
            "pose": (batch, 136),
            "texture": (batch, 3, size, size),
            "params": (batch, self.param_count),
            "frame": (batch, size, size, 3),
            "mask": (batch, size, size),
        }
        self.buffers: dict[str, _Buffer] = {}
        for name, shape in shapes.items():
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            self.buffers[name] = _Buffer(shape, dtype)
            self.context.set_tensor_address(name, int(self.buffers[name].device))
        self.stream = cuda_call(cudart.cudaStreamCreate())
        self._lock = threading.Lock()

        logger.info(
            "TensorRT %s engine %s on %s: batch 1..%d, %d px, %d params",
            precision,
            self.engine_path.name,
            self.metadata["gpu_name"],
            self.max_batch,
            self.image_size,
            self.param_count,
        )

    def render(self, poses: np.ndarray, textures: np.ndarray, params: np.ndarray) -> FrameBatch:
        """Copy the batch in, run the engine, copy frames and masks out."""
        cudart = import_cudart()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        feeds = {
            "pose": np.asarray(poses, dtype=np.float32),  # [B, 136]
            "texture": np.asarray(textures, dtype=np.float32),  # [B, 3, H, W]
            "params": np.asarray(params, dtype=np.float32),  # [B, P]
        }
        batch = check_frame_inputs(
            feeds["pose"], feeds["texture"], feeds["params"],
            self.image_size, self.param_count, self.max_batch,
        )

        with self._lock:
            # inputs: into pinned staging memory, then one async copy each
            for name, array in feeds.items():
                buffer = self.buffers[name]
                buffer.host[:batch] = array
                cuda_call(cudart.cudaMemcpyAsync(
                    buffer.device, buffer.host_ptr, buffer.row_bytes * batch, h2d, self.stream
                ))
                self.context.set_input_shape(name, array.shape)

            if not self.context.execute_async_v3(int(self.stream)):
                raise RuntimeFailure(f"TensorRT execution failed on a batch of {batch}")

            # outputs: back into pinned memory, then copied out for the caller
            for name in FRAME_OUTPUTS:
                buffer = self.buffers[name]
                cuda_call(cudart.cudaMemcpyAsync(
                    buffer.host_ptr, buffer.device, buffer.row_bytes * batch, d2h, self.stream
                ))
            cuda_call(cudart.cudaStreamSynchronize(self.stream))
            frames = self.buffers["frame"].host[:batch].copy()  # [B, H, W, 3]
            masks = self.buffers["mask"].host[:batch].copy()  # [B, H, W]
        return FrameBatch(frames=frames, masks=masks)

    def close(self) -> None:
        """Free the device buffers, the stream, the context and the engine."""
        cudart = import_cudart()
        with self._lock:
            for buffer in self.buffers.values():
                buffer.free()
            self.buffers = {}
            if self.stream is not None:
                cuda_call(cudart.cudaStreamDestroy(self.stream))
                self.stream = None
            self.context = None
            self.engine = None


def tensorrt_available() -> str | None:
    """None when TensorRT, cuda-python and a GPU are present; else the reason they are not."""
    try:
        import_tensorrt()
        cudart = import_cudart()
    except ImportError as error:
        return str(error)
    try:
        count = cuda_call(cudart.cudaGetDeviceCount())
    except RuntimeError as error:
        return f"no usable CUDA device: {error}"
    return None if count > 0 else "no CUDA device found"

