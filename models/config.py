"""Typed configuration of the bi-layer networks: the `paper` and `small` presets.

Both presets share one topology; only the resolution and the channel widths differ.
Spatial sizes follow from `image_size`: the generators start at `image_size // 64`
(six x2 upsampling blocks) and the embeddings live at `image_size // 32` (five x2
downsampling blocks).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

NUM_GENERATOR_BLOCKS = 6
NUM_LANDMARKS = 68
POSE_SIZE = 2 * NUM_LANDMARKS  # 136 values, (x, y) pairs in [-1, 1]


@dataclass(frozen=True)
class ModelConfig:
    """Every width and switch of the bi-layer model.

    Tuples list channels from the coarsest to the finest resolution of a network.
    """

    preset: str
    image_size: int
    # stem conv, then the outputs of the 5 downsampling blocks
    embedder_channels: tuple[int, ...]
    # the 6 embeddings, one per generator block (coarse to fine)
    embedding_channels: tuple[int, ...]
    # learned constant, then the outputs of the 6 upsampling blocks
    texture_channels: tuple[int, ...]
    # keypoint MLP output, then the outputs of the 6 upsampling blocks
    inference_channels: tuple[int, ...]
    keypoint_hidden: int
    # per-row feature size of the projectors' low-rank linear stacks (released: 1024)
    projector_rank: int
    # (stem width, width after the downsampling block)
    enhancer_channels: tuple[int, int]
    enhancer_blocks: int
    enhancer_steps: int
    # stem conv, then the outputs of the 5 downsampling blocks
    discriminator_channels: tuple[int, ...]
    negative_slope: float = 0.2
    norm_eps: float = 1e-4
    # grid_sample everywhere: mode="bilinear", padding_mode="zeros", this align_corners
    align_corners: bool = False

    def __post_init__(self) -> None:
        expected = {
            "embedder_channels": 6,
            "embedding_channels": 6,
            "texture_channels": 7,
            "inference_channels": 7,
            "enhancer_channels": 2,
            "discriminator_channels": 6,
        }
        for name, count in expected.items():
            value = getattr(self, name)
            if len(value) != count:
                raise ValueError(f"{name}: expected {count} values, received {len(value)}")

        if self.image_size % 64 != 0 or self.image_size < 64:
            raise ValueError(
                f"image_size: expected a multiple of 64 (>= 64), received {self.image_size}"
            )

        if self.enhancer_steps < 0 or self.enhancer_blocks < 0:
            raise ValueError("enhancer_steps and enhancer_blocks must be >= 0")

    @property
    def base_size(self) -> int:
        """Spatial size of the generators' first tensor (4 at 256 px)."""
        return self.image_size // 64

    @property
    def embedding_size(self) -> int:
        """Spatial size of the embeddings (8 at 256 px)."""
        return self.image_size // 32

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        return {key: list(v) if isinstance(v, tuple) else v for key, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error, missing ones take defaults."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys: {unknown}; expected a subset of {sorted(known)}"
            )

        values: dict[str, Any] = {
            key: tuple(v) if isinstance(v, list) else v for key, v in data.items()
        }
        return cls(**values)


PAPER = ModelConfig(
    preset="paper",
    image_size=256,
    embedder_channels=(64, 128, 256, 512, 512, 512),
    embedding_channels=(512, 512, 512, 256, 128, 64),
    texture_channels=(512, 512, 512, 512, 256, 128, 64),
    inference_channels=(256, 256, 256, 256, 128, 64, 32),
    keypoint_hidden=256,
    projector_rank=1024,
    enhancer_channels=(64, 128),
    enhancer_blocks=8,
    enhancer_steps=4,
    discriminator_channels=(64, 128, 256, 512, 512, 512),
)

SMALL = ModelConfig(
    preset="small",
    image_size=128,
    embedder_channels=(16, 32, 48, 64, 96, 128),
    embedding_channels=(64, 64, 64, 32, 16, 8),
    texture_channels=(64, 64, 64, 64, 32, 16, 8),
    inference_channels=(128, 128, 128, 64, 64, 32, 16),
    keypoint_hidden=128,
    projector_rank=64,
    enhancer_channels=(8, 16),
    enhancer_blocks=4,
    enhancer_steps=4,
    discriminator_channels=(32, 64, 128, 128, 128, 128),
)

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "small": SMALL}


def get_config(preset: str) -> ModelConfig:
    """The named preset ("paper" or "small")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]
