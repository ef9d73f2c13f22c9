"""The one training dataset: (source, target) frame pairs of one clip, any data source.

Reads the layout of models/data/layout.py, whether the clips came from videos or from the
synthetic source. Each item is one target frame of the chosen split and a different,
randomly chosen source frame of the same clip (so the same identity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from models.data.layout import KEYPOINTS, SPLITS, ClipMeta, clip_dir, scan_clips
from models.landmarks68 import IBUG68_MIRROR, NUM_LANDMARKS
from models.pose import draw_stickman

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """Random changes applied identically to both frames of a pair (training split)."""

    flip: float = 0.5  # chance of a horizontal mirror (landmarks are re-ordered to match)
    brightness: float = 0.15  # +- relative
    contrast: float = 0.15  # +- relative
    saturation: float = 0.15  # +- relative


def flip_pose(pose: np.ndarray) -> np.ndarray:
    """The pose [136] of the horizontally mirrored frame: x -> -x, sides swapped."""
    points = pose.reshape(NUM_LANDMARKS, 2).copy()
    points[:, 0] = -points[:, 0]
    return points[IBUG68_MIRROR].reshape(-1)  # [136]


class PairDataset(Dataset[dict[str, torch.Tensor | str]]):
    """(source, target) pairs from prepared clips.

    Items are dicts: `source_image`, `target_image`, `source_stickman`, `target_stickman`
    [3, S, S] float32 in [-1, 1]; `source_pose`, `target_pose` [136] float32 in [-1, 1];
    `source_mask`, `target_mask` [1, S, S] float32 in [0, 1]; `identity` (str).

    Item i is always target frame i of the split; its source frame is drawn from
    (seed, epoch, i), so the dataset is deterministic given the seed, and set_epoch()
    draws new sources (and augmentations) for a new epoch. The held-out split always
    yields the same pairs and is never augmented. `image_size` None keeps the prepared
    size; another size resizes on loading.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        split: str = "train",
        seed: int = 0,
        augment: Augment | None = Augment(),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no prepared data folder at {self.root}")
        self.split = split
        self.seed = seed
        self.epoch = 0
        self.augment = augment if split == "train" else None

        # clips of the split that can make a pair
        clips = scan_clips(self.root)
        self.clips: list[ClipMeta] = [c for c in clips if c.split == split and c.frames >= 2]
        if not self.clips:
            found = sorted({c.split for c in clips if c.frames >= 2})
            raise ValueError(
                f"no clips of split {split!r} with at least 2 frames under {self.root}; "
                f"splits found: {found or 'none'} (run `avatar prepare-data` first)"
            )
        sizes = {c.image_size for c in self.clips}
        self.image_size = image_size or max(sizes)

        # all poses in memory; items index (clip, frame)
        self._folders = [clip_dir(self.root, c.identity, c.video, c.clip) for c in self.clips]
        self._poses = [np.load(folder / KEYPOINTS).astype(np.float32) for folder in self._folders]
        for meta, poses in zip(self.clips, self._poses, strict=True):
            if poses.shape != (meta.frames, 2 * NUM_LANDMARKS):
                raise ValueError(
                    f"clip {meta.path}: keypoints {poses.shape}, expected ({meta.frames}, 136)"
                )
        self._items = np.array(
            [(c, f) for c, meta in enumerate(self.clips) for f in range(meta.frames)],
            dtype=np.int64,
        )  # [N, 2]
        self.identities = sorted({c.identity for c in self.clips})
        logger.info(
            "%s split of %s: %d frames, %d clips, %d identities",
            split, self.root, len(self._items), len(self.clips), len(self.identities),
        )

    def __len__(self) -> int:
        return len(self._items)

    def set_epoch(self, epoch: int) -> None:
        """Draw new source frames and augmentations (training split only)."""
        self.epoch = epoch

    def _load(self, clip: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        folder = self._folders[clip]
        bgr = cv2.imread(str(folder / "frames" / f"{frame:06d}.jpg"), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(folder / "masks" / f"{frame:06d}.png"), cv2.IMREAD_GRAYSCALE)
        if bgr is None or mask is None:
            raise FileNotFoundError(f"frame {frame} of clip {folder} is missing or unreadable")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # [s, s, 3]
        size = self.image_size
        if image.shape[0] != size:
            shrink = image.shape[0] > size
            method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            image = cv2.resize(image, (size, size), interpolation=method)
            mask = cv2.resize(mask, (size, size), interpolation=method)
        return image, mask, self._poses[clip][frame]

    def _colour(self, images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Same brightness / contrast / saturation change for every image of the pair."""
        aug = self.augment
        if aug is None:
            return images
        brightness = 1 + rng.uniform(-aug.brightness, aug.brightness)
        contrast = 1 + rng.uniform(-aug.contrast, aug.contrast)
        saturation = 1 + rng.uniform(-aug.saturation, aug.saturation)

        # brightness, then saturation (towards the channel mean), then contrast (towards
        # the image mean) are together one affine colour map: out = matrix @ rgb + offset
        mix = saturation * np.eye(3) + (1 - saturation) / 3 * np.ones((3, 3))
        matrix = contrast * brightness * mix
        out = []
        for image in images:
            offset = (1 - contrast) * brightness * float(np.mean(cv2.mean(image)[:3]))
            affine = np.concatenate([matrix, np.full((3, 1), offset)], axis=1)  # [3, 4]
            out.append(cv2.transform(np.ascontiguousarray(image), affine))  # saturates
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        clip, target = (int(v) for v in self._items[index])
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, epoch, index])

        # a different frame of the same clip as the source
        frames = self.clips[clip].frames
        source = int(rng.integers(frames - 1))
        source += source >= target

        source_image, source_mask, source_pose = self._load(clip, source)
        target_image, target_mask, target_pose = self._load(clip, target)

        # mirror both frames together, then the same colour change for both
        aug = self.augment
        if aug is not None and rng.random() < aug.flip:
            source_image, target_image = source_image[:, ::-1], target_image[:, ::-1]
            source_mask, target_mask = source_mask[:, ::-1], target_mask[:, ::-1]
            source_pose, target_pose = flip_pose(source_pose), flip_pose(target_pose)
        source_image, target_image = self._colour([source_image, target_image], rng)

        size = self.image_size
        item: dict[str, torch.Tensor | str] = {}
        for name, image, mask, pose in (
            ("source", source_image, source_mask, source_pose),
            ("target", target_image, target_mask, target_pose),
        ):
            item[f"{name}_image"] = _to_tensor(image)  # [3, S, S]
            item[f"{name}_pose"] = torch.from_numpy(np.ascontiguousarray(pose))  # [136]
            item[f"{name}_stickman"] = _to_tensor(draw_stickman(pose, size))  # [3, S, S]
            item[f"{name}_mask"] = torch.from_numpy(
                np.ascontiguousarray(mask, dtype=np.float32)[None] / 255.0
            )  # [1, S, S]
        item["identity"] = self.clips[clip].identity
        return item


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [S, S, 3] -> float32 [3, S, S] in [-1, 1]."""
    array = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0)
