"""Loss terms of the bi-layer model: what the generator and the discriminator minimise.

The weights follow the released training recipe (adversarial 0.5, feature matching 10,
pixel L1 on the low-frequency layer 10, mask BCE 10, VGG19 10, VGGFace 0.01), plus a
small warp regulariser. The perceptual losses run only when the user gives a path to
their weights: nothing is downloaded. Without them, `frame_l1` (an L1 on the composed
frame whose low-frequency layer is detached, so only the texture path learns from it)
stands in for the perceptual term; set its weight to 0 to train by the paper's recipe.

Every term is returned by name (`loss/G/adv`, `loss/D/real`, ...) so the training loop
logs exactly what it optimises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import gan

logger = logging.getLogger(__name__)

ADVERSARIAL_KINDS: tuple[str, ...] = gan.ADVERSARIAL_LOSSES


@dataclass(frozen=True)
class LossWeights:
    """Weight of each named generator loss term (0 switches a term off)."""

    adv: float = 0.5
    fm: float = 10.0
    lf_l1: float = 10.0
    mask: float = 10.0
    warp: float = 0.1
    frame_l1: float = 10.0
    source_l1: float = 10.0
    vgg19: float = 10.0
    vggface: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Adversarial terms (the objectives themselves live in models/gan.py)
# ---------------------------------------------------------------------------------------


def discriminator_terms(
    kind: gan.AdversarialLoss, real_scores: Tensor, fake_scores: Tensor
) -> dict[str, Tensor]:
    """The discriminator's loss split into its real and fake halves.

    Scores are raw patch logits [B, 1, h, w]; `fake_scores` must come from detached
    generator output. Returns `loss/D/real` and `loss/D/fake`; their sum is what D
    minimises.
    """
    d_loss_fn, _ = gan.adversarial_losses(kind)
    loss = d_loss_fn(real_scores.float(), fake_scores.float())
    return {"loss/D/real": loss.real, "loss/D/fake": loss.fake}


def generator_adversarial(
    kind: gan.AdversarialLoss, real_scores: Tensor, fake_scores: Tensor
) -> Tensor:
    """The generator's adversarial loss; the relativistic form also needs real scores."""
    _, g_loss_fn = gan.adversarial_losses(kind)
    return g_loss_fn(fake_scores.float(), real_scores.float())


def feature_matching(real_features: Sequence[Tensor], fake_features: Sequence[Tensor]) -> Tensor:
    """Mean L1 between discriminator features of real (detached) and generated frames."""
    return gan.feature_matching_loss(real_features, fake_features)


# ---------------------------------------------------------------------------------------
# Reconstruction terms
# ---------------------------------------------------------------------------------------


def composite(image: Tensor, mask: Tensor) -> Tensor:
    """Set the background of `image` [B, 3, H, W] in [-1, 1] to -1 where `mask` is 0."""
    return image * mask + (mask - 1.0)  # [B, 3, H, W]: x*m + (-1)*(1-m)


def lf_l1(lf: Tensor, target: Tensor) -> Tensor:
    """Pixel L1 between the low-frequency layer and the (masked) target frame."""
    return F.l1_loss(lf, target)


def frame_l1(frame_lf_detached: Tensor, target: Tensor) -> Tensor:
    """Pixel L1 on the composed frame; the LF layer is detached by the caller."""
    return F.l1_loss(frame_lf_detached, target)


def mask_bce(mask_logit: Tensor, target_mask: Tensor) -> Tensor:
    """Binary cross-entropy of the predicted mask logits against the target's mask."""
    return F.binary_cross_entropy_with_logits(mask_logit.float(), target_mask.float())


def warp_regulariser(delta_uv: Tensor) -> Tensor:
    """Mean L1 magnitude of the predicted warp offsets Δuv [B, H, W, 2]."""
    return delta_uv.abs().mean()


def identity_grid(size: int, align_corners: bool, device: torch.device | str = "cpu") -> Tensor:
    """The sampling grid that leaves an image unchanged: [1, size, size, 2], (x, y)."""
    if align_corners:
        axis = torch.linspace(-1.0, 1.0, size, device=device)
    else:
        axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y], dim=-1)[None]  # [1, S, S, 2]


# ---------------------------------------------------------------------------------------
# Perceptual losses (VGG19 on ImageNet, VGGFace): only with user-supplied weights
# ---------------------------------------------------------------------------------------

# Conv widths per stage; "M" is a 2x2 max pool. Layer indices match the usual
# `features.N` numbering of the VGG state dicts (conv, ReLU, ..., pool).
VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
}
# The ReLU after the first conv of each stage (relu1_1 ... relu5_1).
VGG_FEATURE_LAYERS: dict[str, tuple[int, ...]] = {
    "vgg19": (1, 6, 11, 20, 29),
    "vgg16": (1, 6, 11, 18, 25),
}
# Input normalisation on [0, 1] RGB images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VGGFace was trained on 0..255 BGR with this mean (given here in RGB order) and no scaling.
VGGFACE_MEAN = (129.186279296875 / 255, 104.76238250732422 / 255, 93.59396362304688 / 255)
VGGFACE_STD = (1 / 255, 1 / 255, 1 / 255)


class VGGFeatures(nn.Module):
    """The convolutional part of VGG16/19, returning the relu{1..5}_1 activations."""

    def __init__(
        self,
        layout: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        bgr: bool = False,
    ) -> None:
        super().__init__()
        if layout not in VGG_LAYOUTS:
            raise ValueError(f"VGG layout must be one of {sorted(VGG_LAYOUTS)}, got {layout!r}")
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG_LAYOUTS[layout]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = int(item)
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=False)]
                channels = width
        last = max(VGG_FEATURE_LAYERS[layout])
        self.features = nn.Sequential(*layers[: last + 1])
        self.taps = VGG_FEATURE_LAYERS[layout]
        self.bgr = bgr
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def load_weights(self, path: Path) -> None:
        """Load a `features.N.weight`-style state dict (a classifier part is ignored)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        features = {
            key.removeprefix("features."): value
            for key, value in state.items()
            if key.startswith("features.")
        }
        wanted = self.features.state_dict()
        missing = [key for key in wanted if key not in features]
        if missing:
            raise ValueError(
                f"{path}: expected VGG conv weights named features.N.weight/bias, "
                f"missing {missing[:4]} (found {sorted(state)[:4]} ...)"
            )
        self.features.load_state_dict({key: features[key] for key in wanted})

    def forward(self, image: Tensor) -> list[Tensor]:
        """image [B, 3, H, W] in [-1, 1] -> the relu*_1 activations."""
        x = (image + 1) / 2  # [B, 3, H, W] in [0, 1]
        if self.bgr:
            x = x.flip(1)
        mean, std = cast(Tensor, self.mean), cast(Tensor, self.std)
        x = (x - mean) / std
        taps: list[Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                taps.append(x)
        return taps


class PerceptualLoss(nn.Module):
    """Mean L1 between VGG activations of two images; the network is frozen."""

    def __init__(self, network: VGGFeatures) -> None:
        super().__init__()
        self.network = network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        fake_taps = self.network(fake)
        with torch.no_grad():
            real_taps = self.network(real)
        terms = [F.l1_loss(f, r) for f, r in zip(fake_taps, real_taps, strict=True)]
        return torch.stack(terms).mean()


def load_perceptual(kind: str, path: Path) -> PerceptualLoss:
    """VGG19 (ImageNet, RGB) or VGGFace (VGG16 layout, BGR) perceptual loss from `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} weights: expected a state-dict file at {path}")
    if kind == "vgg19":
        network = VGGFeatures("vgg19", IMAGENET_MEAN, IMAGENET_STD)
    elif kind == "vggface":
        network = VGGFeatures("vgg16", VGGFACE_MEAN, VGGFACE_STD, bgr=True)
    else:
        raise ValueError(f"perceptual loss must be 'vgg19' or 'vggface', got {kind!r}")
    network.load_weights(path)
    logger.info("loaded %s weights from %s", kind, path)
    return PerceptualLoss(network)
