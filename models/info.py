"""Parameter and MAC counts of the bi-layer networks (`avatar model-info`).

MACs are counted on a real forward pass by PyTorch's FLOP counter (convolutions and
matrix products: conv, linear, the adaptive 1x1 convs; FLOPs / 2 = MACs). The model is
built on the meta device, so counting the paper preset takes a second and no memory.
Bilinear warping is not a matrix product; it is added as 4 MACs per sampled value.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import typer

logger = logging.getLogger(__name__)


def _count_macs(fn: Any) -> int:
    """MACs of the matrix products run by fn()."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops()) // 2


def model_info(preset: str) -> dict[str, Any]:
    """Parameters per network and MACs per rendered frame and per registration.

    Keys: preset, image_size, params {network: count}, frame_params, generator_params,
    frame_gmac (Keypoint MLP + Inference Generator + warp, batch 1), frame_gmac_parts,
    skip_rewrite_saving_gmac, register_gmac {part: GMAC}, adaptive_params (P).
    """
    result: dict[str, Any] = json.loads(_model_info_json(preset))
    return result


@functools.lru_cache(maxsize=4)
def _model_info_json(preset: str) -> str:
    """model_info as JSON text, counted once per preset and process."""
    import torch

    from models.bilayer import AvatarState, BilayerModel
    from models.config import NUM_GENERATOR_BLOCKS, get_config
    from models.networks import Discriminator

    cfg = get_config(preset)
    size = cfg.image_size

    # parameters: real modules (cheap to build) on the meta device
    with torch.device("meta"):
        model = BilayerModel(cfg, spectral_norm=False).eval().requires_grad_(False)
        discriminator = Discriminator(cfg)

    params = {
        name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()
    }
    params["discriminator"] = sum(p.numel() for p in discriminator.parameters())

    # inputs, batch 1
    with torch.device("meta"):
        image = torch.zeros(1, 3, size, size)
        stickman = torch.zeros(1, 3, size, size)
        pose = torch.zeros(1, 136)
        mask = torch.zeros(1, 1, size, size)

    # (no torch.no_grad here: the counter's module tracker trips over no-grad views)
    with torch.device("meta"):
        embeddings = model.embedder(image, stickman)
        adaptive = model.texture_projector(embeddings)
        texture = model.texture_generator(adaptive)
        avatar_params = model.inference_projector(embeddings)
        state = AvatarState(texture, avatar_params)

        keypoint_macs = _count_macs(lambda: model.keypoint_mlp(pose))
        features = model.keypoint_mlp(pose)
        generator_macs = _count_macs(lambda: model.inference_generator(features, avatar_params))
        warp_macs = 4 * 3 * size * size

        register = {
            "embedder": _count_macs(lambda: model.embedder(image, stickman)),
            "texture_projector": _count_macs(lambda: model.texture_projector(embeddings)),
            "texture_generator": _count_macs(lambda: model.texture_generator(adaptive)),
            "inference_projector": _count_macs(lambda: model.inference_projector(embeddings)),
            "enhancer": _count_macs(
                lambda: model.enhance_texture(texture, avatar_params, image, pose, mask)
            ),
        }
        frame_check = _count_macs(lambda: model.render(state, pose))

    frame_macs = keypoint_macs + generator_macs + warp_macs
    if frame_check + warp_macs != frame_macs:
        logger.warning("render MACs %d differ from the sum of parts %d", frame_check, frame_macs)

    # the skip convs would cost 4x as much after their upsampling (released layout)
    widths = cfg.inference_channels
    skip_macs = sum(
        widths[j] * widths[j + 1] * (cfg.base_size * 2**j) ** 2 for j in range(NUM_GENERATOR_BLOCKS)
    )

    frame_networks = ("keypoint_mlp", "inference_generator")
    generator_networks = [name for name in params if name != "discriminator"]
    info = {
        "preset": preset,
        "image_size": size,
        "params": params,
        "frame_params": sum(params[name] for name in frame_networks),
        "generator_params": sum(params[name] for name in generator_networks),
        "frame_gmac": round(frame_macs / 1e9, 4),
        "frame_gmac_parts": {
            "keypoint_mlp": round(keypoint_macs / 1e9, 4),
            "inference_generator": round(generator_macs / 1e9, 4),
            "warp": round(warp_macs / 1e9, 4),
        },
        "skip_rewrite_saving_gmac": round(3 * skip_macs / 1e9, 4),
        "register_gmac": {name: round(macs / 1e9, 3) for name, macs in register.items()},
        "adaptive_params": model.param_count,
    }
    return json.dumps(info)


def model_info_command(
    preset: str = typer.Option("paper", help="Model preset: paper or small."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters per network and MACs per rendered frame."""
    info = model_info(preset)
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bi-layer model, preset {preset} ({info['image_size']} px)")
    table.add_column("network")
    table.add_column("parameters", justify="right")
    table.add_column("GMAC", justify="right")

    frame_parts = info["frame_gmac_parts"]
    for name, count in info["params"].items():
        gmac = frame_parts.get(name, info["register_gmac"].get(name))
        when = "per frame" if name in frame_parts else "per avatar"
        table.add_row(name, f"{count:,}", "" if gmac is None else f"{gmac:.3f} ({when})")

    frame_row = (f"{info['frame_params']:,}", f"{info['frame_gmac']:.3f}")
    table.add_row("per frame (incl. warp)", *frame_row)
    table.add_row("adaptive values per avatar", f"{info['adaptive_params']:,}", "")
    Console().print(table)
