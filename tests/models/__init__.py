"""Tests of the model package."""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig, get_config


def tiny_config() -> ModelConfig:
    """The small preset's topology at 64 px with a few channels: for tests of properties
    that do not depend on widths (spectral norm, gradients), where the cost matters."""
    return dataclasses.replace(
        get_config("small"),
        preset="tiny",
        image_size=64,
        embedder_channels=(8, 8, 16, 16, 16, 16),
        embedding_channels=(16, 16, 16, 16, 8, 8),
        texture_channels=(16, 16, 16, 16, 8, 8, 8),
        inference_channels=(16, 16, 16, 16, 8, 8, 8),
        keypoint_hidden=32,
        projector_rank=16,
        enhancer_channels=(8, 8),
        enhancer_blocks=1,
        enhancer_steps=1,
        discriminator_channels=(8, 8, 16, 16, 16, 16),
    )
