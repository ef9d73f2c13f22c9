"""Parity of the exported graphs with PyTorch: the figures and the tolerances.

Both sides run the same modules (`RegisterGraph`, `FrameGraph`) on the same inputs, in
FP32; ONNX Runtime (CPU) runs the graphs. Tolerances, stated once for tests and the CLI:

- registration: texture max |diff| <= 2e-3 (texture values are in about [-2, 2]);
  params max |diff| <= 1e-4 x max |params| (+ 1e-5);
- per frame: uint8 frames and masks within 1 level on at least 99.9 % of the values,
  and never more than 4 levels apart (rounding at .5 boundaries and last-bit differences
  of the bilinear warp give single-level flips; more would be a real mismatch).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx_export import FrameGraph, RegisterGraph
from models.bilayer import BilayerModel

logger = logging.getLogger(__name__)

TEXTURE_TOLERANCE = 2e-3
PARAMS_RELATIVE_TOLERANCE = 1e-4
LEVEL_SHARE = 0.999  # share of uint8 values within 1 level
MAX_LEVELS = 4


@dataclass(frozen=True)
class ParityRow:
    """One comparison: which graph, on what, the figures and the verdict."""

    graph: str
    inputs: str
    batch: int
    figures: dict[str, float]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_sources(image_size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random registration inputs: images in [-1, 1], poses in [-0.8, 0.8], soft masks."""
    rng = np.random.default_rng(seed)
    size = image_size
    return {
        "image": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32),
        "stickman": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32),
        "pose": rng.uniform(-0.8, 0.8, (batch, 136)).astype(np.float32),
        "mask": rng.uniform(0, 1, (batch, 1, size, size)).astype(np.float32),
    }


def astronaut_source(image_size: int) -> dict[str, np.ndarray]:
    """Registration inputs from a real photo (skimage's astronaut, public domain)."""
    from skimage import data

    from models.pose import PosePipeline, image_to_chw

    with PosePipeline(image_size) as pipeline:
        source = pipeline.prepare_source(data.astronaut())
    return {
        "image": image_to_chw(source.image)[None],  # [1, 3, S, S]
        "stickman": image_to_chw(source.stickman)[None],  # [1, 3, S, S]
        "pose": source.pose[None].astype(np.float32),  # [1, 136]
        "mask": source.mask[None, None].astype(np.float32),  # [1, 1, S, S]
    }


def driving_poses(pose: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` poses near a source pose [136]: shifted, scaled and jittered landmarks."""
    rng = np.random.default_rng(seed)
    points = pose.reshape(68, 2)
    poses = []
    for _ in range(count):
        scale = rng.uniform(0.9, 1.1)
        shift = rng.uniform(-0.08, 0.08, 2)
        jitter = rng.normal(0, 0.01, points.shape)
        poses.append((points - points.mean(0)) * scale + points.mean(0) + shift + jitter)
    return np.stack(poses).reshape(count, 136).astype(np.float32)  # [count, 136]


def ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU session as the server makes it."""
    from server.runtime.onnx_runtime import OrtOptions, make_session

    return make_session(path, OrtOptions(intra_op_threads=threads))


def register_torch(model: BilayerModel, sources: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """Texture and folded params of each source, one at a time, in PyTorch."""
    graph = RegisterGraph(model).eval()
    textures, params = [], []
    with torch.no_grad():
        for i in range(sources["pose"].shape[0]):
            row = [torch.from_numpy(sources[k][i : i + 1]) for k in graph_inputs()]
            texture, param = graph(*row)
            textures.append(texture.numpy())
            params.append(param.numpy())
    return np.concatenate(textures), np.concatenate(params)


def graph_inputs() -> list[str]:
    return ["image", "stickman", "pose", "mask"]


def register_parity(
    model: BilayerModel, session: Any, sources: dict[str, np.ndarray], label: str
) -> tuple[ParityRow, np.ndarray, np.ndarray]:
    """Compare the registration graph with PyTorch; returns the row and torch's outputs."""
    ref_texture, ref_params = register_torch(model, sources)
    textures, params = [], []
    for i in range(sources["pose"].shape[0]):
        feeds = {k: sources[k][i : i + 1] for k in graph_inputs()}
        texture, param = session.run(["texture", "params"], feeds)
        textures.append(texture)
        params.append(param)
    texture_diff = float(np.abs(np.concatenate(textures) - ref_texture).max())
    params_diff = float(np.abs(np.concatenate(params) - ref_params).max())
    params_scale = float(np.abs(ref_params).max())

    passed = texture_diff <= TEXTURE_TOLERANCE and params_diff <= (
        PARAMS_RELATIVE_TOLERANCE * params_scale + 1e-5
    )
    figures = {
        "texture_max_abs": texture_diff,
        "params_max_abs": params_diff,
        "params_max_ref": params_scale,
    }
    row = ParityRow("register", label, int(sources["pose"].shape[0]), figures, passed)
    return row, ref_texture, ref_params


def level_figures(ours: np.ndarray, ref: np.ndarray, name: str) -> dict[str, float]:
    """Max level difference and share within one level of two uint8 arrays."""
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return {
        f"{name}_max_levels": float(diff.max()),
        f"{name}_share_within_1": float((diff <= 1).mean()),
    }


def levels_pass(figures: dict[str, float], name: str) -> bool:
    return (
        figures[f"{name}_max_levels"] <= MAX_LEVELS
        and figures[f"{name}_share_within_1"] >= LEVEL_SHARE
    )


def frame_parity(
    model: BilayerModel,
    session: Any,
    poses: np.ndarray,
    textures: np.ndarray,
    params: np.ndarray,
    label: str,
) -> ParityRow:
    """Compare one batch of the per-frame graph with PyTorch."""
    graph = FrameGraph(model).eval()
    with torch.no_grad():
        ref_frame, ref_mask = graph(
            torch.from_numpy(poses), torch.from_numpy(textures), torch.from_numpy(params)
        )
    frame, mask = session.run(
        ["frame", "mask"], {"pose": poses, "texture": textures, "params": params}
    )
    if frame.shape != tuple(ref_frame.shape) or frame.dtype != np.uint8:
        raise ValueError(
            f"frame: expected uint8 {list(ref_frame.shape)}, got {frame.dtype} {list(frame.shape)}"
        )

    figures = {
        **level_figures(frame, ref_frame.numpy(), "frame"),
        **level_figures(mask, ref_mask.numpy(), "mask"),
    }
    passed = levels_pass(figures, "frame") and levels_pass(figures, "mask")
    return ParityRow("frame", label, int(poses.shape[0]), figures, passed)


def bundle_parity(
    model: BilayerModel,
    register_path: Path,
    frame_path: Path,
    *,
    real: bool = True,
    seed: int = 0,
    threads: int | None = None,
) -> list[ParityRow]:
    """Every comparison for one exported model: random sources, the real photo (when
    `real`), and a mixed batch of avatars in one per-frame call."""
    size = model.cfg.image_size
    register_session = ort_session(register_path, threads)
    frame_session = ort_session(frame_path, threads)
    rows = []

    # random sources, two avatars
    sources = random_sources(size, 2, seed)
    row, textures, params = register_parity(model, register_session, sources, "random")
    rows.append(row)

    # the real photo
    if real:
        photo = astronaut_source(size)
        row, photo_texture, photo_params = register_parity(
            model, register_session, photo, "astronaut"
        )
        rows.append(row)
        poses = driving_poses(photo["pose"][0], 2, seed)
        rows.append(
            frame_parity(
                model, frame_session, poses, np.repeat(photo_texture, 2, 0),
                np.repeat(photo_params, 2, 0), "astronaut",
            )
        )
        # mixed batch: the photo's avatar next to a random one
        textures = np.concatenate([photo_texture, textures[:1]])
        params = np.concatenate([photo_params, params[:1]])

    # batch 1, and a batch whose rows are different avatars
    poses = driving_poses(sources["pose"][0], 2, seed + 1)
    rows.append(frame_parity(model, frame_session, poses[:1], textures[:1], params[:1], "b1"))
    rows.append(frame_parity(model, frame_session, poses, textures, params, "mixed avatars"))
    for row in rows:
        logger.info("parity %s on %s (batch %d): %s %s", row.graph, row.inputs, row.batch,
                    "ok" if row.passed else "FAILED", row.figures)
    return rows
