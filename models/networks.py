"""The networks of the bi-layer model: Embedder, Texture Generator, Keypoint MLP,
Inference Generator, Texture Enhancer and the patch Discriminator.

Shapes below use S = image_size, b = S // 64 (generator base size), e = S // 32
(embedding size). Images are in [-1, 1].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import NUM_GENERATOR_BLOCKS, POSE_SIZE, ModelConfig
from models.layers import (
    AdaptiveBatchNorm,
    AdaptiveSpadeBatchNorm,
    ResBlock,
    adaptive_conv1x1,
    bilinear_sample,
    bilinear_sample_adjoint,
)

logger = logging.getLogger(__name__)

ParamLayout = list[tuple[str, tuple[int, ...]]]


# ----------------------------------------------------------------------------------------
# Embedder


class Embedder(nn.Module):
    """Source image (background at -1) || stickman -> 6 embeddings, coarse to fine.

    Stem conv, 5 downsampling residual blocks (no normalisation) to e x e, then 6
    residual blocks at e x e, each of which emits one embedding.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.embedder_channels
        slope = cfg.negative_slope

        self.stem = nn.Conv2d(6, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            ResBlock(widths[i], widths[i + 1], "down", negative_slope=slope) for i in range(5)
        )

        chain = (widths[-1], *cfg.embedding_channels)
        self.heads = nn.ModuleList(
            ResBlock(chain[i], chain[i + 1], negative_slope=slope) for i in range(6)
        )

    def forward(self, image: Tensor, stickman: Tensor) -> list[Tensor]:
        x = self.stem(torch.cat([image, stickman], dim=1))  # [B, C0, S, S]
        for block in self.down:
            x = block(x)  # [B, C, e, e] after the last block

        embeddings = []
        for block in self.heads:
            x = block(x)
            embeddings.append(x)  # [B, E_j, e, e]
        return embeddings


# ----------------------------------------------------------------------------------------
# Texture Generator


class TextureBlock(nn.Module):
    """Upsampling residual block with adaptive SPADE batch norm (Texture Generator).

    norm1 -> act -> nearest x2 -> conv1 -> norm2 -> act -> conv2, plus an adaptive 1x1
    skip conv (run at the input resolution, then upsampled).
    """

    def __init__(
        self, in_channels: int, out_channels: int, size: int, first: bool, cfg: ModelConfig
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.first = first
        self.negative_slope = cfg.negative_slope

        self.norm1: nn.Module = (
            nn.BatchNorm2d(in_channels, eps=cfg.norm_eps)
            if first
            else AdaptiveSpadeBatchNorm(in_channels, size, cfg.norm_eps)
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaptiveSpadeBatchNorm(out_channels, 2 * size, cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, adaptive: dict[str, Tensor], prefix: str) -> Tensor:
        if self.first:
            h = self.norm1(x)
        else:
            h = self.norm1(
                x, adaptive[f"{prefix}.norm1.conv_scale"], adaptive[f"{prefix}.norm1.conv_bias"]
            )
        h = F.leaky_relu(h, self.negative_slope)
        h = self.conv1(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [B, Cout, 2s, 2s]

        h = self.norm2(
            h, adaptive[f"{prefix}.norm2.conv_scale"], adaptive[f"{prefix}.norm2.conv_bias"]
        )
        h = self.conv2(F.leaky_relu(h, self.negative_slope))

        skip = adaptive[f"{prefix}.skip"]  # [B, Cout, Cin + 1]
        skip = adaptive_conv1x1(x, skip[:, :, : self.in_channels], skip[:, :, self.in_channels])
        return h + F.interpolate(skip, scale_factor=2.0, mode="nearest")  # [B, Cout, 2s, 2s]


class TextureGenerator(nn.Module):
    """Learned constant -> 6 upsampling blocks -> SPADE norm -> conv -> tanh texture."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.texture_channels
        self.widths = widths
        self.negative_slope = cfg.negative_slope

        self.constant = nn.Parameter(torch.randn(1, widths[0], cfg.base_size, cfg.base_size))
        self.blocks = nn.ModuleList(
            TextureBlock(widths[j], widths[j + 1], cfg.base_size * 2**j, j == 0, cfg)
            for j in range(NUM_GENERATOR_BLOCKS)
        )
        self.final_norm = AdaptiveSpadeBatchNorm(widths[-1], cfg.image_size, cfg.norm_eps)
        self.head = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def adaptive_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, embedding index, rows, columns) of every adaptive tensor it consumes."""
        shapes = []
        widths = self.widths
        for j in range(NUM_GENERATOR_BLOCKS):
            cin, cout = widths[j], widths[j + 1]
            if j > 0:
                shapes.append((f"blocks.{j}.norm1.conv_scale", j, cin, cin + 1))
                shapes.append((f"blocks.{j}.norm1.conv_bias", j, cin, cin + 1))
            shapes.append((f"blocks.{j}.norm2.conv_scale", j, cout, cout + 1))
            shapes.append((f"blocks.{j}.norm2.conv_bias", j, cout, cout + 1))
            shapes.append((f"blocks.{j}.skip", j, cout, cin + 1))

        c = self.final_norm.channels
        last = NUM_GENERATOR_BLOCKS - 1
        shapes.append(("final_norm.conv_scale", last, c, c + 1))
        shapes.append(("final_norm.conv_bias", last, c, c + 1))
        return shapes

    def forward(self, adaptive: dict[str, Tensor]) -> Tensor:
        batch = adaptive["final_norm.conv_scale"].shape[0]
        x = self.constant.expand(batch, -1, -1, -1)  # [B, C0, b, b]

        for j, block in enumerate(self.blocks):
            x = block(x, adaptive, f"blocks.{j}")  # [B, C_j+1, 2^(j+1) b, ...]

        x = self.final_norm(x, adaptive["final_norm.conv_scale"], adaptive["final_norm.conv_bias"])
        x = F.leaky_relu(x, self.negative_slope)
        return torch.tanh(self.head(x))  # [B, 3, S, S]


# ----------------------------------------------------------------------------------------
# Keypoint MLP and Inference Generator


class KeypointMLP(nn.Module):
    """Pose [B, 136] -> 3 hidden layers (LeakyReLU) -> [B, C0, b, b]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.keypoint_hidden
        self.out_channels = cfg.inference_channels[0]
        self.size = cfg.base_size
        self.negative_slope = cfg.negative_slope

        self.layers = nn.ModuleList(
            [
                nn.Linear(POSE_SIZE, hidden),
                nn.Linear(hidden, hidden),
                nn.Linear(hidden, hidden),
                nn.Linear(hidden, self.out_channels * self.size * self.size),
            ]
        )

    def forward(self, pose: Tensor) -> Tensor:
        x = pose
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.leaky_relu(x, self.negative_slope)
        return x.reshape(-1, self.out_channels, self.size, self.size)  # [B, C0, b, b]


def inference_param_layout(cfg: ModelConfig) -> ParamLayout:
    """Name and shape of every adaptive value of the Inference Generator, in flat order.

    Per block j: norm1 scale/bias (not in block 0, whose first norm is plain), norm2
    scale/bias, skip weight [Cout, Cin] and bias; then the final norm's scale and bias.
    """
    widths = cfg.inference_channels
    layout: ParamLayout = []
    for j in range(NUM_GENERATOR_BLOCKS):
        cin, cout = widths[j], widths[j + 1]
        if j > 0:
            layout += [(f"blocks.{j}.norm1.scale", (cin,)), (f"blocks.{j}.norm1.bias", (cin,))]
        layout += [(f"blocks.{j}.norm2.scale", (cout,)), (f"blocks.{j}.norm2.bias", (cout,))]
        layout += [(f"blocks.{j}.skip.weight", (cout, cin)), (f"blocks.{j}.skip.bias", (cout,))]

    layout += [("final_norm.scale", (widths[-1],)), ("final_norm.bias", (widths[-1],))]
    return layout


def split_params(params: Tensor, layout: ParamLayout) -> dict[str, Tensor]:
    """Slice a flat [B, P] parameter tensor into named [B, *shape] tensors."""
    total = sum(_numel(shape) for _, shape in layout)
    if params.shape[-1] != total:
        raise ValueError(f"params: expected {total} values per avatar, received {params.shape[-1]}")

    named = {}
    offset = 0
    for name, shape in layout:
        size = _numel(shape)
        named[name] = params[:, offset : offset + size].reshape(-1, *shape)
        offset += size
    return named


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


class InferenceBlock(nn.Module):
    """Upsampling residual block of the Inference Generator.

    norm1 -> act -> conv1 (at the input resolution) -> norm2 -> act -> nearest x2 ->
    conv2; adaptive batch norms (the first block's norm1 is plain) and an adaptive 1x1
    skip conv that runs before its upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, first: bool, cfg: ModelConfig) -> None:
        super().__init__()
        self.first = first
        self.negative_slope = cfg.negative_slope

        self.norm1: nn.Module = (
            nn.BatchNorm2d(in_channels, eps=cfg.norm_eps)
            if first
            else AdaptiveBatchNorm(in_channels, cfg.norm_eps)
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaptiveBatchNorm(out_channels, cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, p: dict[str, Tensor], prefix: str) -> Tensor:
        if self.first:
            h = self.norm1(x)
        else:
            h = self.norm1(x, p[f"{prefix}.norm1.scale"], p[f"{prefix}.norm1.bias"])
        h = self.conv1(F.leaky_relu(h, self.negative_slope))  # [B, Cout, s, s]

        h = self.norm2(h, p[f"{prefix}.norm2.scale"], p[f"{prefix}.norm2.bias"])
        h = F.interpolate(F.leaky_relu(h, self.negative_slope), scale_factor=2.0, mode="nearest")
        h = self.conv2(h)  # [B, Cout, 2s, 2s]

        skip = adaptive_conv1x1(x, p[f"{prefix}.skip.weight"], p[f"{prefix}.skip.bias"])
        return h + F.interpolate(skip, scale_factor=2.0, mode="nearest")


class InferenceGenerator(nn.Module):
    """Pose features [B, C0, b, b] + avatar params [B, P] -> (delta_uv, lf, mask_logit).

    Six upsampling blocks, a final adaptive norm, then one 3x3 conv whose 6 output
    channels are the three heads: delta uv (2, tanh), low-frequency RGB (3, tanh) and the
    mask logit (1).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.inference_channels
        self.layout = inference_param_layout(cfg)
        self.negative_slope = cfg.negative_slope

        self.blocks = nn.ModuleList(
            InferenceBlock(widths[j], widths[j + 1], j == 0, cfg)
            for j in range(NUM_GENERATOR_BLOCKS)
        )
        self.final_norm = AdaptiveBatchNorm(widths[-1], cfg.norm_eps)
        self.head = nn.Conv2d(widths[-1], 6, 3, padding=1)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = split_params(params, self.layout)

        for j, block in enumerate(self.blocks):
            x = block(x, p, f"blocks.{j}")  # [B, C_j+1, 2^(j+1) b, ...]

        x = self.final_norm(x, p["final_norm.scale"], p["final_norm.bias"])
        out = self.head(F.leaky_relu(x, self.negative_slope))  # [B, 6, S, S]

        delta_uv = torch.tanh(out[:, 0:2])  # [B, 2, S, S]
        lf = torch.tanh(out[:, 2:5])  # [B, 3, S, S]
        mask_logit = out[:, 5:6]  # [B, 1, S, S]
        return delta_uv, lf, mask_logit


# ----------------------------------------------------------------------------------------
# Texture Enhancer


class EnhancerNet(nn.Module):
    """texture || gradient (6 ch) -> conv -> down block -> N res blocks -> up block -> conv.

    No normalisation anywhere.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c0, c1 = cfg.enhancer_channels
        slope = cfg.negative_slope
        self.negative_slope = slope

        self.stem = nn.Conv2d(6, c0, 3, padding=1)
        self.down = ResBlock(c0, c1, "down", negative_slope=slope)
        self.blocks = nn.ModuleList(
            ResBlock(c1, c1, negative_slope=slope) for _ in range(cfg.enhancer_blocks)
        )
        self.up = ResBlock(c1, c0, "up", negative_slope=slope)
        self.head = nn.Conv2d(c0, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(self.stem(x))  # [B, C1, S/2, S/2]
        for block in self.blocks:
            x = block(x)
        x = self.up(x)  # [B, C0, S, S]
        return self.head(F.leaky_relu(x, self.negative_slope))  # [B, 3, S, S]


class TextureEnhancer(nn.Module):
    """Refines the texture by unrolled, learned gradient steps on the source frame.

    Each step warps the texture with the source grid, adds the source LF layer, masks,
    takes the gradient of the squared error against the masked source image with respect
    to the texture (closed form: the adjoint of bilinear sampling), and adds
    tanh(net(texture || gradient)) to the texture.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.steps = cfg.enhancer_steps
        self.align_corners = cfg.align_corners
        self.net = EnhancerNet(cfg)

    def data_gradient(
        self, texture: Tensor, grid: Tensor, lf: Tensor, mask: Tensor, source: Tensor
    ) -> Tensor:
        """d/dT sum((mask * (lf + sample(T, grid)) - mask * source)^2)."""
        residual = lf + bilinear_sample(texture, grid, self.align_corners) - source  # [B, 3, S, S]
        weighted = 2.0 * mask * mask * residual
        return bilinear_sample_adjoint(
            weighted, grid, (texture.shape[2], texture.shape[3]), self.align_corners
        )  # [B, 3, St, St]

    def forward(
        self, texture: Tensor, grid: Tensor, lf: Tensor, mask: Tensor, source: Tensor
    ) -> Tensor:
        for _ in range(self.steps):
            gradient = self.data_gradient(texture, grid, lf, mask, source)
            update = self.net(torch.cat([texture, gradient], dim=1))  # [B, 3, S, S]
            texture = texture + torch.tanh(update)
        return texture


# ----------------------------------------------------------------------------------------
# Discriminator


class Discriminator(nn.Module):
    """Patch discriminator on image || stickman; returns scores and block features.

    Stem conv, 5 downsampling residual blocks with batch norm, one block at the final
    resolution, then a 1x1 conv to a score map [B, 1, S/32, S/32].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.discriminator_channels
        slope = cfg.negative_slope
        self.negative_slope = slope

        self.stem = nn.Conv2d(6, widths[0], 3, padding=1)
        blocks = [
            ResBlock(widths[i], widths[i + 1], "down", True, slope, cfg.norm_eps) for i in range(5)
        ]
        blocks.append(ResBlock(widths[-1], widths[-1], "none", True, slope, cfg.norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, image: Tensor, stickman: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.stem(torch.cat([image, stickman], dim=1))  # [B, C0, S, S]

        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)

        scores = self.head(F.leaky_relu(x, self.negative_slope))  # [B, 1, S/32, S/32]
        return scores, features
