"""Building blocks of the bi-layer networks.

Pre-activation residual blocks (normalise, activate, convolve), adaptive layers whose
affine parameters or 1x1 weights arrive per sample from a projector, spectral norm
helpers, and the closed-form adjoint of bilinear sampling used by the Texture Enhancer.

Adaptive parameters always travel with the batch (leading dimension B), so one batch may
mix avatars. No layer branches on tensor values, so every forward traces to ONNX.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Spectral norm


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Wrap the weight of every Conv2d and Linear below `module` in spectral norm."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear) and not parametrize.is_parametrized(
            layer, "weight"
        ):
            spectral_norm(layer)
    return module


def remove_spectral_norm(module: nn.Module) -> nn.Module:
    """Bake spectrally normalised weights into plain weights, in place.

    The weights are evaluated in eval mode (no power iteration), so an eval-mode forward
    gives the same outputs before and after.
    """
    was_training = module.training
    module.eval()

    with torch.no_grad():
        for layer in module.modules():
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)

    module.train(was_training)
    return module


def has_spectral_norm(module: nn.Module) -> bool:
    """Whether any layer below `module` still carries a spectral-norm parametrisation."""
    return any(parametrize.is_parametrized(layer) for layer in module.modules())


# ----------------------------------------------------------------------------------------
# Adaptive layers


def adaptive_affine(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """x * scale + bias with per-sample, per-channel scale and bias [B, C]."""
    return x * scale[:, :, None, None] + bias[:, :, None, None]  # [B, C, H, W]


def adaptive_conv1x1(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1x1 convolution with per-sample weights [B, Cout, Cin] and biases [B, Cout]."""
    b, c, h, w = x.shape
    out = torch.bmm(weight, x.reshape(b, c, h * w))  # [B, Cout, H*W]
    return out.reshape(b, -1, h, w) + bias[:, :, None, None]  # [B, Cout, H, W]


class AdaptiveBatchNorm(nn.Module):
    """Batch norm without a learned affine, then a per-sample affine from the projector."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.channels = channels
        self.norm = nn.BatchNorm2d(channels, eps=eps, affine=False)

    def forward(self, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        return adaptive_affine(self.norm(x), scale, bias)  # [B, C, H, W]


class AdaptiveSpadeBatchNorm(nn.Module):
    """Batch norm, then a spatially varying scale and bias.

    A learned per-pixel feature map [C, S, S] goes through two 1x1 convolutions whose
    weights come from the avatar's embedding: one gives the scale (around 1), the other
    the bias. The maps depend on the avatar only, not on the input.
    """

    def __init__(self, channels: int, size: int, eps: float) -> None:
        super().__init__()
        self.channels = channels
        self.size = size
        self.norm = nn.BatchNorm2d(channels, eps=eps, affine=False)
        self.pixel_features = nn.Parameter(torch.empty(1, channels, size, size))
        nn.init.uniform_(self.pixel_features, -1.0, 1.0)

    def modulation(self, conv_scale: Tensor, conv_bias: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and bias maps from two adaptive 1x1 convs, each [B, C, C + 1]."""
        b = conv_scale.shape[0]
        features = self.pixel_features.expand(b, -1, -1, -1)  # [B, C, S, S]
        c = self.channels

        scale = 1.0 + adaptive_conv1x1(features, conv_scale[:, :, :c], conv_scale[:, :, c])
        bias = adaptive_conv1x1(features, conv_bias[:, :, :c], conv_bias[:, :, c])
        return scale, bias  # [B, C, S, S] each

    def forward(self, x: Tensor, conv_scale: Tensor, conv_bias: Tensor) -> Tensor:
        scale, bias = self.modulation(conv_scale, conv_bias)
        return self.norm(x) * scale + bias  # [B, C, S, S]


# ----------------------------------------------------------------------------------------
# Plain residual blocks (Embedder, Enhancer, Discriminator)


class ResBlock(nn.Module):
    """Pre-activation residual block: [norm] -> act -> conv -> [norm] -> act -> conv.

    `resample` is "down" (average pool after the second conv and on the skip path),
    "up" (nearest x2 before the first conv; the 1x1 skip conv runs before its upsampling)
    or "none". The skip path has a 1x1 conv when channels or resolution change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample: str = "none",
        norm: bool = False,
        negative_slope: float = 0.2,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample: expected 'none', 'down' or 'up', received {resample!r}")

        self.resample = resample
        self.negative_slope = negative_slope
        self.norm1: nn.Module = nn.BatchNorm2d(in_channels, eps=eps) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2: nn.Module = nn.BatchNorm2d(out_channels, eps=eps) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

        needs_skip = in_channels != out_channels or resample != "none"
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if needs_skip else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.norm1(x), self.negative_slope)
        if self.resample == "up":
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.conv1(h)

        h = self.conv2(F.leaky_relu(self.norm2(h), self.negative_slope))

        skip = self.skip(x)
        if self.resample == "down":
            h = F.avg_pool2d(h, 2)
            skip = F.avg_pool2d(skip, 2)
        elif self.resample == "up":
            skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")

        return h + skip


# ----------------------------------------------------------------------------------------
# Sampling


def identity_grid(size: int, align_corners: bool) -> Tensor:
    """The sampling grid [1, size, size, 2] (x, y) that reproduces an image exactly.

    With align_corners=False these are the pixel centres (-1 + 1/size ... 1 - 1/size);
    with align_corners=True the corner pixels sit at -1 and 1.
    """
    if align_corners:
        line = torch.linspace(-1.0, 1.0, size)
    else:
        line = (torch.arange(size, dtype=torch.float32) * 2.0 + 1.0) / size - 1.0

    v, u = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([u, v], dim=2)[None]  # [1, S, S, 2]


def bilinear_sample(texture: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    """grid_sample with the project's fixed settings (bilinear, zeros padding)."""
    return F.grid_sample(
        texture, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
    )


def bilinear_sample_adjoint(
    values: Tensor, grid: Tensor, texture_hw: tuple[int, int], align_corners: bool
) -> Tensor:
    """Adjoint of `bilinear_sample` with respect to the texture.

    Scatters `values` [B, C, H, W] (one per output pixel) back onto a texture
    [B, C, Ht, Wt] with the bilinear weights the forward sampling used, ignoring
    out-of-range corners (zeros padding). This equals the gradient of
    sum(values * bilinear_sample(T, grid)) with respect to T, written with index
    arithmetic and scatter-add so that it exports to ONNX (ScatterElements, add).
    """
    b, c, h, w = values.shape
    ht, wt = texture_hw

    # grid (x, y) in [-1, 1] -> texture pixel coordinates
    gx = grid[..., 0].reshape(b, 1, h * w)  # [B, 1, N]
    gy = grid[..., 1].reshape(b, 1, h * w)
    if align_corners:
        x = (gx + 1.0) * 0.5 * (wt - 1)
        y = (gy + 1.0) * 0.5 * (ht - 1)
    else:
        x = ((gx + 1.0) * wt - 1.0) * 0.5
        y = ((gy + 1.0) * ht - 1.0) * 0.5

    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0  # weight of the right neighbour
    fy = y - y0  # weight of the lower neighbour

    flat_values = values.reshape(b, c, h * w)  # [B, C, N]
    out = values.new_zeros(b, c, ht * wt)  # [B, C, Ht*Wt]

    # each of the 4 corners: bilinear weight, zero outside the texture
    corners = (
        (x0, y0, (1.0 - fx) * (1.0 - fy)),
        (x0 + 1.0, y0, fx * (1.0 - fy)),
        (x0, y0 + 1.0, (1.0 - fx) * fy),
        (x0 + 1.0, y0 + 1.0, fx * fy),
    )
    for cx, cy, weight in corners:
        inside = (cx >= 0) & (cx <= wt - 1) & (cy >= 0) & (cy <= ht - 1)
        weight = weight * inside.to(values.dtype)  # [B, 1, N]

        index = cy.clamp(0, ht - 1) * wt + cx.clamp(0, wt - 1)
        index = index.to(torch.int64).expand(b, c, h * w)  # [B, C, N]
        out = out.scatter_add(2, index, flat_values * weight)

    return out.reshape(b, c, ht, wt)  # [B, C, Ht, Wt]
