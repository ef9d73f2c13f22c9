"""From a driver's landmarks to the avatar's pose: absolute and relative motion.

All of it happens in normalised coordinates ([-1, 1] in a crop frame, 136 values).

- absolute: the driver's landmarks are the pose. Pixel landmarks are normalised in their
  own frame's crop box (as the model was trained), so the avatar stays centred and takes
  the driver's face shape, expression and head rotation.
- relative: the avatar keeps its own face shape; only the driver's motion since its first
  frame moves it:

      pose = source_pose + (driver - driver_first) * scale

  Pixel landmarks are normalised in the crop box of the driver's *first* frame, so head
  translation and distance to the camera carry over as motion. `scale` is per axis, the
  avatar's landmark-box size over the driver's (first frame), both in normalised units: a
  wide driver face moves a narrow avatar face proportionally less sideways. The result is
  clipped to [-1, 1].
"""

from __future__ import annotations

import logging

import numpy as np

from models.pose import CropBox, crop_box, normalise_points
from server.protocol import MotionMode

logger = logging.getLogger(__name__)


def _extent(pose136: np.ndarray) -> np.ndarray:
    """Width and height of the landmark box of a normalised pose."""
    points = pose136.reshape(68, 2)
    return np.maximum(points.max(axis=0) - points.min(axis=0), 1e-3)  # [2]


class MotionMapper:
    """Turns each driver pose of one stream into the pose the avatar is rendered in."""

    def __init__(self, mode: MotionMode, source_pose: np.ndarray) -> None:
        self.mode = mode
        self.source_pose = np.asarray(source_pose, dtype=np.float32).reshape(136)
        self._anchor_box: CropBox | None = None
        self._first: np.ndarray | None = None  # [136] driver's first pose
        self._scale = np.ones(2, dtype=np.float32)

    def reset(self) -> None:
        """The next driver pose becomes the new reference (relative motion)."""
        self._anchor_box = None
        self._first = None

    def __call__(self, points: np.ndarray, normalised: bool) -> np.ndarray:
        """Driver landmarks [68, 2] (pixels, or already normalised) -> pose [136]."""
        if self.mode == "absolute":
            if normalised:
                return points.reshape(136).astype(np.float32)
            return normalise_points(points, crop_box(points))

        # relative: normalise in the first frame's box, apply the motion since then
        if normalised:
            driver = points.reshape(136).astype(np.float32)
        else:
            if self._anchor_box is None:
                self._anchor_box = crop_box(points)
            driver = normalise_points(points, self._anchor_box)

        if self._first is None:
            self._first = driver
            self._scale = (_extent(self.source_pose) / _extent(driver)).astype(np.float32)
            logger.debug("relative motion anchored; scale x %.3f y %.3f", *self._scale)

        delta = (driver - self._first).reshape(68, 2) * self._scale  # [68, 2]
        pose = self.source_pose + delta.reshape(136)
        return np.clip(pose, -1.0, 1.0).astype(np.float32)
