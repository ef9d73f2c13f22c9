"""Evaluation on held-out pairs: image quality and how well the frame follows the pose.

For every held-out (source, target) pair the model registers the source and renders the
target's pose. Figures, for the model and for the trivial baseline that returns the
source frame unchanged:

- PSNR and SSIM of the rendered frame against the target frame, over the *full* frame,
  with the background of both set to black (-1) by their masks (the target's own mask,
  the model's predicted mask; the baseline uses the source's mask).
- pose error: the 68 landmarks found by the pose pipeline (mediapipe) on the frame, the
  mean distance to the driving (target) landmarks, divided by the inter-ocular distance
  of the driving landmarks (distance between the two eye centres). Frames are upscaled
  2x (bicubic) before detection. A frame where no face is found has no pose error; the
  share of frames with a face is reported as `detected`.

The same detection on the ground-truth target frames (`target`) gives the floor of the
pose error: what the landmark detector itself disagrees with the driving landmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch import Tensor

from models.bilayer import BilayerModel

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path("weights/demo")
DEFAULT_CHECKPOINT = DEFAULT_WEIGHTS / "checkpoint.pt"
DEFAULT_HELDOUT = DEFAULT_WEIGHTS / "heldout"
DETECT_UPSCALE = 2
RIGHT_EYE = slice(36, 42)  # iBUG-68: the subject's right eye (image left)
LEFT_EYE = slice(42, 48)


@dataclass
class Scores:
    """Per-pair figures of one method."""

    psnr: list[float]
    ssim: list[float]
    pose_error: list[float]
    detected: list[bool]

    @classmethod
    def empty(cls) -> Scores:
        return cls([], [], [], [])

    def summary(self) -> dict[str, float | None]:
        found = [error for error in self.pose_error if np.isfinite(error)]
        return {
            "psnr": float(np.mean(self.psnr)) if self.psnr else None,
            "ssim": float(np.mean(self.ssim)) if self.ssim else None,
            "pose_error": float(np.mean(found)) if found else None,
            "detected": float(np.mean(self.detected)) if self.detected else 0.0,
        }


def default_paths(checkpoint: Path | None, data: Path | None) -> tuple[Path, Path]:
    """The checkpoint and held-out data to use: the shipped demo weights by default."""
    checkpoint_path = checkpoint or DEFAULT_CHECKPOINT
    data_path = data or DEFAULT_HELDOUT
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint_path}: pass --checkpoint, or export the demo "
            "weights first (docs/training.md)"
        )
    if not data_path.is_dir():
        raise FileNotFoundError(f"no held-out data folder at {data_path}: pass --data")
    return checkpoint_path, data_path


def load_model(path: Path, device: str = "cpu") -> BilayerModel:
    """An eval-mode `BilayerModel` from a training or bundle checkpoint."""
    from models.bilayer import load_bilayer
    from models.config import ModelConfig

    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "config" not in payload:
        raise ValueError(f"{path}: expected a checkpoint dict with a 'config', got {type(payload)}")
    state = payload.get("model", payload.get("generator"))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected generator weights under 'model' or 'generator'")
    state = {
        key: value.float() if value.is_floating_point() else value for key, value in state.items()
    }
    cfg = ModelConfig.from_dict(payload["config"])
    return load_bilayer(cfg, state).to(device)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def composite(images: Tensor, masks: Tensor) -> Tensor:
    """Background to -1: images [B, 3, H, W] in [-1, 1], masks [B, 1, H, W] in [0, 1]."""
    return (images + 1.0) * masks - 1.0


def inter_ocular(points: np.ndarray) -> float:
    """Distance between the eye centres of 68 landmarks [68, 2]."""
    right = points[RIGHT_EYE].mean(axis=0)
    left = points[LEFT_EYE].mean(axis=0)
    return float(np.linalg.norm(left - right))


def pose_error(pipeline: Any, frame: np.ndarray, driving: np.ndarray) -> float:
    """Mean landmark distance / inter-ocular distance; NaN when no face is found."""
    from models.pose import PoseError

    size = frame.shape[0]
    big = cv2.resize(
        frame, (size * DETECT_UPSCALE, size * DETECT_UPSCALE), interpolation=cv2.INTER_CUBIC
    )
    try:
        found = pipeline.detect(big).points / DETECT_UPSCALE  # [68, 2] pixels of `frame`
    except PoseError:
        return float("nan")
    distances = np.linalg.norm(found - driving, axis=1)  # [68]
    return float(distances.mean() / inter_ocular(driving))


def _batches(dataset: Any, count: int, batch_size: int) -> Iterator[dict[str, Tensor]]:
    for start in range(0, count, batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, count))]
        yield {
            key: torch.stack([item[key] for item in items])
            for key in items[0]
            if isinstance(items[0][key], Tensor)
        }


def _image_scores(
    scores: Scores,
    frames: np.ndarray,
    targets: np.ndarray | None,
    pipeline: Any,
    driving: np.ndarray,
) -> None:
    """Append PSNR and SSIM against `targets` (when given) and the pose error."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for index in range(frames.shape[0]):
        frame = frames[index]
        if targets is not None:
            target = targets[index]
            scores.psnr.append(float(peak_signal_noise_ratio(target, frame, data_range=255)))
            scores.ssim.append(
                float(structural_similarity(target, frame, channel_axis=2, data_range=255))
            )
        error = pose_error(pipeline, frame, driving[index])
        scores.pose_error.append(error)
        scores.detected.append(bool(np.isfinite(error)))


def evaluate(
    checkpoint: Path,
    data: Path,
    max_pairs: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    enhance: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Figures of the model and the unchanged-source baseline on held-out pairs."""
    from models.data.dataset import PairDataset
    from models.pose import PosePipeline, denormalise_pose

    model = load_model(checkpoint, device)
    size = model.cfg.image_size
    dataset = PairDataset(data, image_size=size, split="heldout", seed=seed)
    count = len(dataset) if max_pairs <= 0 else min(max_pairs, len(dataset))

    methods = {"model": Scores.empty(), "baseline": Scores.empty(), "target": Scores.empty()}
    with PosePipeline(size * DETECT_UPSCALE) as pipeline, torch.no_grad():
        for batch in _batches(dataset, count, batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            state = model.register(
                batch["source_image"],
                batch["source_stickman"],
                batch["source_pose"],
                batch["source_mask"],
                enhance=enhance,
            )
            frames = to_uint8(model.render(state, batch["target_pose"]).frame)
            targets = to_uint8(composite(batch["target_image"], batch["target_mask"]))
            sources = to_uint8(composite(batch["source_image"], batch["source_mask"]))
            driving = np.stack(
                [denormalise_pose(pose, size) for pose in batch["target_pose"].cpu().numpy()]
            )  # [B, 68, 2]
            _image_scores(methods["model"], frames, targets, pipeline, driving)
            _image_scores(methods["baseline"], sources, targets, pipeline, driving)
            _image_scores(methods["target"], targets, None, pipeline, driving)

    report: dict[str, Any] = {name: scores.summary() for name, scores in methods.items()}
    report["target"] = {
        "pose_error": report["target"]["pose_error"],
        "detected": report["target"]["detected"],
    }
    report["pairs"] = count
    report["frame"] = "full frame, background set to black by the masks"
    report["checkpoint"] = str(checkpoint)
    report["data"] = str(data)
    logger.info("evaluated %d pairs: %s", count, report)
    return report


def example_grid(
    checkpoint: Path,
    data: Path,
    out_png: Path,
    count: int = 6,
    enhance: bool = True,
    seed: int = 0,
) -> Path:
    """Save rows of source | driver stickman | output | target for held-out pairs."""
    from PIL import Image

    from models.data.dataset import PairDataset

    model = load_model(checkpoint)
    dataset = PairDataset(data, image_size=model.cfg.image_size, split="heldout", seed=seed)

    # spread the rows over the whole set, so that every identity shows
    picks = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    items = [dataset[int(index)] for index in picks]
    batch = {
        key: torch.stack([cast(Tensor, item[key]) for item in items])
        for key in items[0]
        if isinstance(items[0][key], Tensor)
    }
    with torch.no_grad():
        state = model.register(
            batch["source_image"],
            batch["source_stickman"],
            batch["source_pose"],
            batch["source_mask"],
            enhance=enhance,
        )
        frames = model.render(state, batch["target_pose"]).frame
    columns = [
        composite(batch["source_image"], batch["source_mask"]),
        batch["target_stickman"],
        frames,
        composite(batch["target_image"], batch["target_mask"]),
    ]
    tiles = [to_uint8(column) for column in columns]  # each [B, H, W, 3]
    rows = [np.concatenate([tile[row] for tile in tiles], axis=1) for row in range(len(items))]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)
    return out_png


def plot_training_curves(metrics_files: list[Path], out_png: Path, smooth: int = 5) -> Path:
    """Plot the named loss terms of one or more runs' metrics.jsonl (steps continue
    across files, e.g. the base stage then the enhancer stage) into one PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: list[dict[str, float]] = []
    for path in metrics_files:
        offset = records[-1]["step"] if records else 0
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            record["step"] += offset
            records.append(record)
    names = sorted({key for record in records for key in record if key.startswith("loss/")})
    names = [name for name in names if not name.endswith("/total")]

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in names:
        steps = [r["step"] for r in records if name in r]
        values = np.array([r[name] for r in records if name in r])
        if len(values) >= smooth > 1:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1 :]
        axis = axes[1] if name.startswith("loss/D/") or name == "loss/G/adv" else axes[0]
        axis.plot(steps, values, label=name, linewidth=1.2)
    for axis, title in zip(axes, ("reconstruction terms", "adversarial terms"), strict=True):
        axis.set_xlabel("generator step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_yscale("log")
    if len(metrics_files) > 1:
        boundary = sum(1 for _ in Path(metrics_files[0]).read_text().splitlines())
        if boundary:
            first_stage_end = records[boundary - 1]["step"]
            for axis in axes:
                axis.axvline(first_stage_end, color="grey", linestyle="--", linewidth=0.8)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
