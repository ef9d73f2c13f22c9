"""Projectors: embeddings -> the adaptive parameters of a generator.

Every adaptive tensor is a matrix [rows, columns]: a norm's scale and bias ([C, 2]), a
1x1 conv's weight and bias ([Cout, Cin + 1]). It is predicted row by row by a low-rank
linear stack (three Linear layers, no activation between them, shared by all rows):

1. the embedding of the block [B, E, e, e] is average-pooled (or, where it is smaller
   than needed, repeated) to s x s and its values regrouped into `rows` row vectors of
   F = rank * rows / E features, so s * s * E = rows * F;
2. F -> E -> E -> columns.

With `rank` = 1024 this reproduces the released projector's sizes; every output is a
linear function of the pooled embedding of rank at most E.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.networks import ParamLayout, TextureGenerator, inference_param_layout

logger = logging.getLogger(__name__)


def resize_embedding(embedding: Tensor, size: int) -> Tensor:
    """Average-pool (or nearest-repeat) a square embedding to size x size."""
    current = embedding.shape[-1]
    if size == current:
        return embedding
    if size < current:
        return F.avg_pool2d(embedding, current // size)  # [B, E, size, size]
    return F.interpolate(embedding, scale_factor=float(size // current), mode="nearest")


class LowRankStack(nn.Module):
    """One adaptive tensor [B, rows, columns] from one embedding [B, E, e, e]."""

    def __init__(
        self, embedding_channels: int, embedding_size: int, rows: int, columns: int, rank: int
    ) -> None:
        super().__init__()
        features = max(1, rank * rows // embedding_channels)
        side = math.isqrt(rows * features // embedding_channels)
        consistent = side * side * embedding_channels == rows * features and side > 0
        resizable = side % embedding_size == 0 or embedding_size % side == 0
        if not (consistent and resizable):
            raise ValueError(
                f"projector: rank {rank} with {embedding_channels} embedding channels at "
                f"{embedding_size}x{embedding_size} cannot feed {rows} rows; expected "
                "power-of-two widths"
            )

        self.rows = rows
        self.side = side
        self.features = features
        self.layers = nn.Sequential(
            nn.Linear(features, embedding_channels),
            nn.Linear(embedding_channels, embedding_channels),
            nn.Linear(embedding_channels, columns),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        pooled = resize_embedding(embedding, self.side)  # [B, E, s, s]
        rows = pooled.reshape(pooled.shape[0], self.rows, self.features)  # [B, R, F]
        return self.layers(rows)  # [B, R, K]


class Projector(nn.Module):
    """A set of low-rank stacks, one per (name, embedding index, rows, columns) target."""

    def __init__(self, cfg: ModelConfig, targets: list[tuple[str, int, int, int]]) -> None:
        super().__init__()
        self.targets = targets
        self.stacks = nn.ModuleDict()
        for name, index, rows, columns in targets:
            self.stacks[_key(name)] = LowRankStack(
                cfg.embedding_channels[index], cfg.embedding_size, rows, columns, cfg.projector_rank
            )

    def predict(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        """Every target as [B, rows, columns]."""
        return {
            name: self.stacks[_key(name)](embeddings[index]) for name, index, _, _ in self.targets
        }


def _key(name: str) -> str:
    return name.replace(".", "_")


class TextureProjector(Projector):
    """Embeddings -> SPADE conv weights and skip conv weights of the Texture Generator."""

    def __init__(self, cfg: ModelConfig, generator: TextureGenerator) -> None:
        super().__init__(cfg, generator.adaptive_shapes())

    def forward(self, embeddings: list[Tensor]) -> dict[str, Tensor]:
        return self.predict(embeddings)


class InferenceProjector(Projector):
    """Embeddings -> the flat [B, P] parameter vector of the Inference Generator.

    Norm stacks predict (scale - 1, bias) per channel; skip stacks predict the weight
    and bias of the 1x1 conv. The output order is `inference_param_layout(cfg)`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.layout: ParamLayout = inference_param_layout(cfg)
        super().__init__(cfg, _inference_targets(cfg))

    def forward(self, embeddings: list[Tensor]) -> Tensor:
        predicted = self.predict(embeddings)

        pieces = []
        for name, shape in self.layout:
            owner, field = name.rsplit(".", 1)
            matrix = predicted[owner]  # [B, rows, columns]
            if field == "scale":
                value = 1.0 + matrix[:, :, 0]  # [B, C]
            elif field == "weight":
                value = matrix[:, :, : shape[1]]  # [B, Cout, Cin]
            else:
                value = matrix[:, :, -1]  # [B, C]
            pieces.append(value.reshape(value.shape[0], -1))

        return torch.cat(pieces, dim=1)  # [B, P]


def _inference_targets(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """One stack per adaptive norm ([C, 2]) and per skip conv ([Cout, Cin + 1])."""
    targets = []
    seen = set()
    for name, shape in inference_param_layout(cfg):
        owner = name.rsplit(".", 1)[0]
        if owner in seen:
            continue
        seen.add(owner)

        index = int(owner.split(".")[1]) if owner.startswith("blocks.") else 5
        if owner.endswith("skip"):
            cout, cin = shape
            targets.append((owner, index, cout, cin + 1))
        else:
            targets.append((owner, index, shape[0], 2))
    return targets
