"""The bi-layer model: register an avatar once, render it in any pose.

`register` runs the heavy networks (Embedder, Texture Generator and the projectors,
optionally the Texture Enhancer) and returns an `AvatarState`: the high-frequency
texture and the flat Inference Generator parameters. `render` runs only the light part
(Keypoint MLP, Inference Generator, warp) from poses and that state. Every row of a
batch may belong to a different avatar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.layers import (
    apply_spectral_norm,
    bilinear_sample,
    identity_grid,
)
from models.layers import (
    remove_spectral_norm as _remove_spectral_norm,
)
from models.networks import (
    Embedder,
    InferenceGenerator,
    KeypointMLP,
    ParamLayout,
    TextureEnhancer,
    TextureGenerator,
)
from models.projector import InferenceProjector, TextureProjector

logger = logging.getLogger(__name__)


@dataclass
class AvatarState:
    """What an avatar needs to be rendered: texture [B, 3, S, S] and params [B, P]."""

    texture: Tensor
    params: Tensor


@dataclass
class RenderOutput:
    """One rendered batch.

    frame:      [B, 3, S, S] (lf + warped) with the background set to -1 by `mask`
    lf:         [B, 3, S, S] low-frequency layer (tanh), unmasked
    warped:     [B, 3, S, S] texture sampled with `uv`, unmasked
    uv:         [B, S, S, 2] sampling grid (x, y) = identity grid + delta uv
    mask_logit: [B, 1, S, S]
    mask:       [B, 1, S, S] sigmoid(mask_logit); detached in the frame during training
    """

    frame: Tensor
    lf: Tensor
    warped: Tensor
    uv: Tensor
    mask_logit: Tensor
    mask: Tensor


@dataclass
class TrainOutput:
    """What the training losses need from one source -> target pass.

    frame_lf_detached: the target frame rebuilt with the LF layer detached (masked like
    `target.frame`), for the perceptual losses.
    """

    state: AvatarState
    target: RenderOutput
    frame_lf_detached: Tensor
    embeddings: list[Tensor]


def mask_background(image: Tensor, mask: Tensor) -> Tensor:
    """Keep the foreground, set the background to -1: image * m + (-1) * (1 - m)."""
    return (image + 1.0) * mask - 1.0


class BilayerModel(nn.Module):
    """All generator-side networks of the bi-layer model (the Discriminator is separate).

    `spectral_norm=True` wraps every conv and linear weight for training; runtimes and
    exporters build with False, or call `remove_spectral_norm` after loading a training
    checkpoint. Call `.eval()` before rendering: batch norm then uses running statistics
    and rows of a batch are independent of each other.
    """

    def __init__(self, cfg: ModelConfig, spectral_norm: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.align_corners = cfg.align_corners

        self.embedder = Embedder(cfg)
        self.texture_generator = TextureGenerator(cfg)
        self.texture_projector = TextureProjector(cfg, self.texture_generator)
        self.inference_generator = InferenceGenerator(cfg)
        self.inference_projector = InferenceProjector(cfg)
        self.keypoint_mlp = KeypointMLP(cfg)
        self.enhancer = TextureEnhancer(cfg)

        grid = identity_grid(cfg.image_size, cfg.align_corners)
        self.register_buffer("identity_grid", grid, persistent=False)  # [1, S, S, 2]

        if spectral_norm:
            apply_spectral_norm(self)

    # ------------------------------------------------------------------------------------
    # Layout of the avatar state

    def param_layout(self) -> ParamLayout:
        """(name, shape) of every Inference Generator parameter, in the flat order of
        `AvatarState.params`."""
        return list(self.inference_generator.layout)

    @property
    def param_count(self) -> int:
        """P, the number of adaptive values per avatar."""
        total = 0
        for _, shape in self.param_layout():
            size = 1
            for dim in shape:
                size *= dim
            total += size
        return total

    # ------------------------------------------------------------------------------------
    # Verbs

    def embed(self, image: Tensor, stickman: Tensor, mask: Tensor | None) -> list[Tensor]:
        """Source frames -> embeddings [B, E_j, e, e], averaged over N sources if given.

        image, stickman: [B, 3, S, S] or [B, N, 3, S, S]; mask: [B, (N,) 1, S, S] or None.
        The background is set to -1 where a mask is given.
        """
        self._check_image("image", image)
        self._check_image("stickman", stickman)
        if mask is not None:
            image = mask_background(image, mask)

        if image.dim() == 4:
            return self.embedder(image, stickman)

        b, n = image.shape[:2]
        embeddings = self.embedder(image.flatten(0, 1), stickman.flatten(0, 1))
        return [x.reshape(b, n, *x.shape[1:]).mean(dim=1) for x in embeddings]

    def register(
        self,
        image: Tensor,
        stickman: Tensor,
        pose: Tensor,
        mask: Tensor | None = None,
        enhance: bool = True,
    ) -> AvatarState:
        """Compute the avatar state of each row.

        image, stickman: [B, 3, S, S] in [-1, 1]; pose: [B, 136]; mask: [B, 1, S, S] in
        [0, 1] or None (then the Enhancer uses the predicted source mask). Several
        source frames per avatar may come as [B, N, ...] (and pose [B, N, 136]): their
        embeddings are averaged and the Enhancer fits the first of them.
        """
        return self._register(image, stickman, pose, mask, enhance)[0]

    def enhance_texture(
        self,
        texture: Tensor,
        params: Tensor,
        image: Tensor,
        pose: Tensor,
        mask: Tensor | None,
    ) -> Tensor:
        """Run the Texture Enhancer against the source frame rendered in the source pose."""
        source = self.render(AvatarState(texture, params), pose)
        source_mask = source.mask if mask is None else mask  # [B, 1, S, S]
        return self.enhancer(texture, source.uv, source.lf, source_mask, image)

    def render(self, state: AvatarState, poses: Tensor) -> RenderOutput:
        """Render poses [B, 136] with the avatar state of each row."""
        return self._render(state, poses, detach_mask=False)

    def forward(
        self,
        source_image: Tensor,
        source_stickman: Tensor,
        source_pose: Tensor,
        target_pose: Tensor,
        source_mask: Tensor | None = None,
        enhance: bool = False,
    ) -> TrainOutput:
        """Training pass: register on the source frame, render the target pose."""
        state, embeddings = self._register(
            source_image, source_stickman, source_pose, source_mask, enhance
        )

        target = self._render(state, target_pose, detach_mask=True)
        mask = target.mask.detach()
        frame_lf_detached = mask_background(target.lf.detach() + target.warped, mask)
        return TrainOutput(state, target, frame_lf_detached, embeddings)

    # ------------------------------------------------------------------------------------
    # Internals

    def _register(
        self,
        image: Tensor,
        stickman: Tensor,
        pose: Tensor,
        mask: Tensor | None,
        enhance: bool,
    ) -> tuple[AvatarState, list[Tensor]]:
        embeddings = self.embed(image, stickman, mask)
        texture = self.texture_generator(self.texture_projector(embeddings))  # [B, 3, S, S]
        params = self.inference_projector(embeddings)  # [B, P]

        if enhance and self.enhancer.steps > 0:
            if image.dim() == 5:  # several sources: the Enhancer fits the first
                image, pose = image[:, 0], pose[:, 0]
                mask = None if mask is None else mask[:, 0]
            texture = self.enhance_texture(texture, params, image, pose, mask)

        return AvatarState(texture=texture, params=params), embeddings

    def _render(self, state: AvatarState, poses: Tensor, detach_mask: bool) -> RenderOutput:
        if poses.dim() != 2 or poses.shape[1] != 136:
            raise ValueError(f"poses: expected [B, 136], received {list(poses.shape)}")

        features = self.keypoint_mlp(poses)  # [B, C0, b, b]
        delta_uv, lf, mask_logit = self.inference_generator(features, state.params)

        uv = self.identity_grid + delta_uv.permute(0, 2, 3, 1)  # [B, S, S, 2]
        warped = bilinear_sample(state.texture, uv, self.align_corners)  # [B, 3, S, S]

        mask = torch.sigmoid(mask_logit)  # [B, 1, S, S]
        frame_mask = mask.detach() if detach_mask else mask
        frame = mask_background(lf + warped, frame_mask)
        return RenderOutput(frame, lf, warped, uv, mask_logit, mask)

    def _check_image(self, name: str, image: Tensor) -> None:
        size = self.cfg.image_size
        if image.dim() not in (4, 5) or tuple(image.shape[-3:]) != (3, size, size):
            raise ValueError(
                f"{name}: expected [B, 3, {size}, {size}] or [B, N, 3, {size}, {size}], "
                f"received {list(image.shape)}"
            )


def remove_spectral_norm(model: nn.Module) -> nn.Module:
    """Bake spectral norm into plain weights (in place) for inference and export."""
    return _remove_spectral_norm(model)


def load_bilayer(cfg: ModelConfig, state_dict: dict[str, Any] | None = None) -> BilayerModel:
    """An eval-mode model without spectral norm, from a checkpoint of either kind.

    A state dict saved with spectral norm (keys containing "parametrizations") is loaded
    into a spectral-norm model and baked; a plain one is loaded directly.
    """
    if state_dict is None:
        model = BilayerModel(cfg, spectral_norm=False)
    elif any("parametrizations" in key for key in state_dict):
        model = BilayerModel(cfg, spectral_norm=True)
        model.load_state_dict(state_dict)
        remove_spectral_norm(model)
    else:
        model = BilayerModel(cfg, spectral_norm=False)
        model.load_state_dict(state_dict)
    return model.eval()
