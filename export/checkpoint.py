"""Generator checkpoints: read training checkpoints and bundle checkpoints alike.

A bundle's `checkpoint.pt` is `{"format": 1, "config": {...}, "generator": state_dict,
"trained": bool}` with plain (spectral norm baked) weights, FP16 or FP32. A training
checkpoint carries the config next to the generator's state dict under "generator",
"model" or "state_dict" (spectral-norm keys are baked on load); optimiser and
discriminator state are ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.bilayer import BilayerModel, load_bilayer
from models.config import ModelConfig, get_config

logger = logging.getLogger(__name__)

GENERATOR_FORMAT = 1
STATE_KEYS = ("generator", "model", "state_dict", "generator_state")


def round_weights_fp16(model: nn.Module) -> nn.Module:
    """Round every floating-point parameter and buffer to FP16 and back, in place."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


def _config_from(checkpoint: dict[str, Any], path: Path) -> ModelConfig:
    config = checkpoint.get("config")
    if isinstance(config, dict):
        # a training checkpoint may nest the model config next to training options
        model_config = config.get("model", config)
        if isinstance(model_config, dict) and "preset" in model_config:
            return ModelConfig.from_dict(model_config)
    if isinstance(config, ModelConfig):
        return config
    if isinstance(checkpoint.get("preset"), str):
        return get_config(checkpoint["preset"])
    raise ValueError(f"{path}: no model config found (expected a 'config' dict with 'preset')")


def _generator_state(checkpoint: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in STATE_KEYS:
        state = checkpoint.get(key)
        if isinstance(state, dict) and state and all(
            isinstance(value, torch.Tensor) for value in state.values()
        ):
            # strip the prefix a wrapper module (DDP, compile) leaves behind
            return {
                name.removeprefix("module.").removeprefix("_orig_mod."): value.float()
                if value.is_floating_point() else value
                for name, value in state.items()
            }
    raise ValueError(
        f"{path}: no generator weights found; expected a state dict under one of {STATE_KEYS}, "
        f"got keys {sorted(checkpoint)}"
    )


def load_generator(path: Path | str) -> tuple[BilayerModel, ModelConfig]:
    """An eval-mode BilayerModel (spectral norm baked) and its config from a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")

    cfg = _config_from(checkpoint, path)
    state = _generator_state(checkpoint, path)

    # the discriminator, if saved alongside, is not part of the generator
    state = {name: value for name, value in state.items() if not name.startswith("discriminator.")}
    model = load_bilayer(cfg, state)
    logger.info("loaded %s generator (%s preset) from %s", type(model).__name__, cfg.preset, path)
    return model, cfg


def calibrate_batch_norm(model: BilayerModel, cfg: ModelConfig, seed: int = 0) -> None:
    """Set every batch norm's running statistics from a few random training passes.

    A randomly initialised model has mean 0 / variance 1 statistics that match nothing;
    its eval-mode activations then grow or vanish block after block. Statistics measured
    on its own activations (as training would leave them) keep them in range.
    """
    generator = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes

    model.train()
    with torch.no_grad():
        for _ in range(2):
            image = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
            stickman = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
            poses = torch.rand(2, 2, 136, generator=generator) * 1.6 - 0.8
            mask = torch.rand(2, 1, size, size, generator=generator)
            model(image, stickman, poses[0], poses[1], mask)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def random_generator(preset: str, seed: int = 0) -> tuple[BilayerModel, ModelConfig]:
    """A seeded, randomly initialised eval-mode generator without spectral norm.

    Batch-norm statistics are calibrated on the model's own activations, as after
    training, so that its outputs are neither saturated nor flat and exports exercise the
    folding of the statistics.
    """
    cfg = get_config(preset)
    torch.manual_seed(seed)
    model = BilayerModel(cfg, spectral_norm=False)
    calibrate_batch_norm(model, cfg, seed)
    return model.eval(), cfg
