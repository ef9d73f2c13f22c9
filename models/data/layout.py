"""On-disk layout of prepared training data, shared by the video and synthetic sources.

    OUT/manifest.json                      every finished clip, rebuilt after each run
    OUT/<person>/<video>/<clip>/clip.json  the clip's facts; written last (clip finished)
    OUT/<person>/<video>/<clip>/frames/000000.jpg   face crops, S x S RGB JPEG
    OUT/<person>/<video>/<clip>/masks/000000.png    person masks, S x S uint8 (255 = person)
    OUT/<person>/<video>/<clip>/keypoints.npy       [N, 136] float32 poses in [-1, 1]

Frame i of a clip is `frames/{i:06d}.jpg`, its mask `masks/{i:06d}.png`, its pose row i of
keypoints.npy. A clip is written into a hidden temporary folder and renamed into place,
so a folder with a clip.json is always complete; docs/data.md has the field list.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
CLIP_META = "clip.json"
KEYPOINTS = "keypoints.npy"
JPEG_QUALITY = 95

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")


@dataclass
class ClipMeta:
    """What clip.json holds."""

    identity: str  # the person; pairs never mix identities
    video: str
    clip: str
    split: Split
    source: Literal["video", "synthetic"]
    image_size: int
    frames: int  # frames written (faces found)
    failed: dict[str, int] = field(default_factory=dict)  # pose error code -> frames
    origin: str = ""  # the video file, frame folder or photo it came from
    frame_index: list[int] = field(default_factory=list)  # source frame of each frame
    motions: list[dict[str, float]] = field(default_factory=list)  # synthetic only
    version: int = LAYOUT_VERSION

    @property
    def path(self) -> str:
        return f"{self.identity}/{self.video}/{self.clip}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipMeta:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def safe_name(name: str) -> str:
    """A path component made of letters, digits, '-', '_' and '.' only."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "_"


def clip_dir(root: Path, identity: str, video: str, clip: str) -> Path:
    return root / safe_name(identity) / safe_name(video) / safe_name(clip)


def is_finished(folder: Path) -> bool:
    return (folder / CLIP_META).is_file()


def split_for_identity(identity: str, heldout_percent: float) -> Split:
    """Stable split by identity: the same person always lands in the same split."""
    bucket = zlib.crc32(identity.encode("utf-8")) % 10_000
    return "heldout" if bucket < heldout_percent * 100 else "train"


def write_clip(
    folder: Path,
    meta: ClipMeta,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    poses: Sequence[np.ndarray],
) -> None:
    """Write a clip atomically: a temporary sibling folder, renamed into place.

    images: [S, S, 3] uint8 RGB; masks: [S, S] float in [0, 1]; poses: [136] float32.
    """
    if not len(images) == len(masks) == len(poses) == meta.frames:
        raise ValueError(
            f"clip {meta.path}: {meta.frames} frames declared, got {len(images)} images, "
            f"{len(masks)} masks and {len(poses)} poses"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    (temp / "frames").mkdir(parents=True)
    (temp / "masks").mkdir()

    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(temp / "frames" / f"{i:06d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY,
                                                                   JPEG_QUALITY])
        mask_u8 = np.clip(np.round(np.asarray(mask) * 255), 0, 255).astype(np.uint8)
        cv2.imwrite(str(temp / "masks" / f"{i:06d}.png"), mask_u8)
    keypoints = np.stack(poses).astype(np.float32) if poses else np.zeros((0, 136), np.float32)
    np.save(temp / KEYPOINTS, keypoints)  # [N, 136]

    # clip.json last, then the rename: a folder with clip.json is complete
    (temp / CLIP_META).write_text(json.dumps(asdict(meta), indent=1))
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished folder from an interrupted run
    os.replace(temp, folder)


def read_clip_meta(folder: Path) -> ClipMeta:
    return ClipMeta.from_dict(json.loads((folder / CLIP_META).read_text()))


def scan_clips(root: Path) -> list[ClipMeta]:
    """Every finished clip under root, sorted by path."""
    metas = [read_clip_meta(p.parent) for p in root.glob(f"*/*/*/{CLIP_META}")]
    return sorted(metas, key=lambda m: m.path)


def write_manifest(root: Path) -> dict[str, Any]:
    """Rebuild OUT/manifest.json from the clip.json files and return it."""
    clips = scan_clips(root)
    sizes = sorted({m.image_size for m in clips})
    failed: dict[str, int] = {}
    for meta in clips:
        for code, count in meta.failed.items():
            failed[code] = failed.get(code, 0) + count
    manifest = {
        "version": LAYOUT_VERSION,
        "image_size": sizes[0] if len(sizes) == 1 else sizes,
        "identities": len({m.identity for m in clips}),
        "clips": [
            {
                "path": m.path,
                "identity": m.identity,
                "split": m.split,
                "source": m.source,
                "frames": m.frames,
            }
            for m in clips
        ],
        "frames": {split: sum(m.frames for m in clips if m.split == split) for split in SPLITS},
        "failed": failed,
    }
    temp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    temp.write_text(json.dumps(manifest, indent=1))
    os.replace(temp, root / MANIFEST)
    return manifest
