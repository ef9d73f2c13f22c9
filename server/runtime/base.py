"""The small interface every runtime implements (ONNX Runtime, TensorRT, PyTorch).

Arrays cross this boundary as numpy, float32 unless stated, batch first:

- pose:     [B, 136]      landmarks normalised to [-1, 1], (x, y) pairs in iBUG-68 order
- texture:  [B, 3, H, W]  high-frequency texture in [-1, 1]
- params:   [B, P]        the avatar's flat Inference Generator parameters
- frame:    [B, H, W, 3]  uint8 RGB, the rendered frame
- mask:     [B, H, W]     uint8 foreground mask, 0..255

The per-frame call is stateless: every avatar's state travels with the pose, so rows of
one batch may belong to different avatars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FrameBatch:
    """What one per-frame call returns."""

    frames: np.ndarray  # [B, H, W, 3] uint8
    masks: np.ndarray  # [B, H, W] uint8


@dataclass(frozen=True)
class AvatarTensors:
    """What registration returns for one avatar: the state every frame needs."""

    texture: np.ndarray  # [3, H, W] float32
    params: np.ndarray  # [P] float32


class RuntimeFailure(Exception):
    """A runtime failed to load or to run; the message says which and why."""


@runtime_checkable
class FrameRuntime(Protocol):
    """Renders frames from poses and avatar state, one batch per call."""

    name: str  # e.g. "onnxruntime-cpu", "tensorrt", "torch-cpu"
    precision: str  # "fp32", "fp16", "bf16", "int8"
    image_size: int
    param_count: int
    max_batch: int

    def render(self, poses: np.ndarray, textures: np.ndarray, params: np.ndarray) -> FrameBatch:
        """Render one batch; shapes as in the module docstring."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device buffers."""
        ...


@runtime_checkable
class RegistrationRuntime(Protocol):
    """Runs the heavy networks once per avatar."""

    name: str
    image_size: int

    def register(
        self,
        image: np.ndarray,  # [1, 3, H, W] float32 in [-1, 1], the cropped source
        stickman: np.ndarray,  # [1, 3, H, W] float32 in [-1, 1]
        pose: np.ndarray,  # [1, 136] float32
        mask: np.ndarray,  # [1, 1, H, W] float32 in [0, 1]
    ) -> AvatarTensors:
        """Compute the texture and the Inference Generator parameters of one avatar."""
        ...

    def close(self) -> None: ...
