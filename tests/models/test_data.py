"""Training data: the synthetic warp, prepare-data on a real video, the pair dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from models.data.dataset import Augment, PairDataset, flip_pose
from models.data.layout import CLIP_META, KEYPOINTS, read_clip_meta, scan_clips
from models.data.prepare import PrepareOptions, find_photo_jobs, find_video_jobs, prepare
from models.data.synthetic import (
    HeadMotion,
    MeshDetector,
    MotionRanges,
    PortraitRig,
    sample_clip_motions,
)
from models.landmarks68 import mesh_to_ibug68
from models.pose import PosePipeline

SIZE = 128
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline():
    with PosePipeline(SIZE) as pose_pipeline:
        yield pose_pipeline


@pytest.fixture(scope="module")
def rig(pipeline):
    with MeshDetector() as detector:
        return PortraitRig.from_photo(skdata.astronaut(), SIZE, detector, pipeline.segment)


def _interocular(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0)))


def test_unmoved_frame_matches_the_photo_landmarks(rig, pipeline):
    frame = rig.render(HeadMotion())
    assert frame.image.shape == (SIZE, SIZE, 3) and frame.image.dtype == np.uint8
    assert frame.mask.shape == (SIZE, SIZE) and 0 <= frame.mask.min() <= frame.mask.max() <= 1
    assert frame.pose.shape == (136,) and np.abs(frame.pose).max() < 1

    # mediapipe on the rendered crop finds the landmarks we claim
    found = pipeline.detect(frame.image).points
    error = np.linalg.norm(found - frame.points, axis=1).mean() / _interocular(frame.points)
    assert error < 0.08, f"landmark error {error:.3f} of the inter-ocular distance"

    # the person mask covers the face centre and not the top corners
    assert frame.mask[SIZE // 2, SIZE // 2] > 0.9
    assert frame.mask[:8, :8].mean() < 0.5


def test_yaw_moves_the_nose_across_the_jaw(rig):
    def nose_offset(yaw: float) -> float:
        points = rig.render(HeadMotion(yaw=yaw)).points  # [68, 2]
        jaw_mid = (points[0] + points[16]) / 2
        return float(points[30, 0] - jaw_mid[0]) / _interocular(points)

    # positive yaw turns the face towards the image's left (the subject's right)
    negative, centre, positive = nose_offset(-0.4), nose_offset(0.0), nose_offset(0.4)
    assert positive < centre - 0.2 and negative > centre + 0.2, (negative, centre, positive)


def test_mouth_opening_and_blink(rig):
    def inner_gap(frame) -> float:
        return float(frame.points[66, 1] - frame.points[62, 1]) / _interocular(frame.points)

    def eye_opening(frame) -> float:
        p = frame.points
        lids = (p[41, 1] - p[37, 1]) + (p[40, 1] - p[38, 1]) + (p[47, 1] - p[43, 1])
        return float(lids + p[46, 1] - p[44, 1]) / 4 / _interocular(p)

    neutral = rig.render(HeadMotion())
    opened = rig.render(HeadMotion(mouth=0.08))
    closed = rig.render(HeadMotion(blink=1.0))
    assert inner_gap(opened) > inner_gap(neutral) + 0.1
    assert eye_opening(closed) < 0.25 * eye_opening(neutral)

    # the opened mouth shows a dark cavity between the inner lips
    centre = ((opened.points[62] + opened.points[66]) / 2).astype(int)
    assert opened.image[centre[1], centre[0]].mean() < 80


def test_warp_carries_photo_pixels_to_the_moved_landmarks(rig):
    motion = HeadMotion(yaw=0.35, pitch=-0.15, roll=0.2, scale=1.05)
    frame = rig.render(motion)
    photo = cv2.GaussianBlur(rig.work_image, (5, 5), 0).astype(np.float32)
    warped = cv2.GaussianBlur(frame.image, (5, 5), 0).astype(np.float32)

    def sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
        xy = np.clip(np.round(points - 0.5).astype(int), 0, image.shape[0] - 1)
        return image[xy[:, 1], xy[:, 0]]  # [N, 3]

    # points where the photo has contrast, so that a wrong place would show
    original = mesh_to_ibug68(rig.mesh[:, :2])  # [68, 2] working pixels
    at_source = sample(photo, original)
    at_moved = np.abs(sample(warped, frame.points) - at_source).mean(axis=1)

    # control: the same crop positions without the motion land elsewhere
    unmoved = rig.render(HeadMotion()).points
    at_unmoved = np.abs(sample(warped, unmoved) - at_source).mean(axis=1)
    assert np.median(at_moved) < 12, np.median(at_moved)
    assert np.median(at_moved) < 0.5 * np.median(at_unmoved)


def test_clip_motions_are_smooth_and_seeded():
    ranges = MotionRanges()
    first = sample_clip_motions(np.random.default_rng(3), 12, ranges, mouth_gap=0.02)
    again = sample_clip_motions(np.random.default_rng(3), 12, ranges, mouth_gap=0.02)
    other = sample_clip_motions(np.random.default_rng(4), 12, ranges, mouth_gap=0.02)
    assert first == again and first != other
    yaw = np.array([m.yaw for m in first])
    assert np.abs(yaw).max() <= np.radians(ranges.yaw_deg) + 1e-9
    assert np.abs(np.diff(yaw)).max() < np.radians(2 * ranges.yaw_deg) / 3
    assert min(m.mouth for m in first) >= -0.02


def _write_video(path: Path, rig: PortraitRig, blanks: int) -> int:
    """A short talking-head mp4: warped astronaut frames, then blank frames."""
    motions = sample_clip_motions(np.random.default_rng(0), 8, MotionRanges(), rig.mouth_gap)
    path.parent.mkdir(parents=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (SIZE, SIZE))
    assert writer.isOpened()
    for motion in motions:
        writer.write(cv2.cvtColor(rig.render(motion).image, cv2.COLOR_RGB2BGR))
    for _ in range(blanks):
        writer.write(np.full((SIZE, SIZE, 3), 90, np.uint8))
    writer.release()
    return len(motions)


def test_prepare_data_from_video_counts_failures_and_resumes(rig, tmp_path):
    videos = tmp_path / "videos"
    faces = _write_video(videos / "collins" / "flight1" / "00001.mp4", rig, blanks=3)
    out = tmp_path / "prepared"
    options = PrepareOptions(image_size=64, every=1, max_frames=100, workers=1)

    jobs = find_video_jobs(videos, options)
    assert [(j.identity, j.video, j.clip) for j in jobs] == [("collins", "flight1", "00001")]
    report = prepare(jobs, out, options)
    assert report.clips_done == 1 and report.clips_skipped == 0
    assert report.frames_written == faces
    assert report.failed == {"no_face": 3}

    # the documented layout
    clip = out / "collins" / "flight1" / "00001"
    meta = read_clip_meta(clip)
    assert meta.frames == faces and meta.source == "video" and meta.split == "train"
    assert meta.frame_index == list(range(faces))
    keypoints = np.load(clip / KEYPOINTS)
    assert keypoints.shape == (faces, 136) and keypoints.dtype == np.float32
    assert np.abs(keypoints).max() < 1
    assert len(list((clip / "frames").glob("*.jpg"))) == faces
    assert cv2.imread(str(clip / "masks" / "000000.png"), cv2.IMREAD_GRAYSCALE).shape == (64, 64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frames"] == {"train": faces, "heldout": 0}
    assert manifest["failed"] == {"no_face": 3}

    # a second run finds the clip finished and leaves it alone
    stamp = (clip / CLIP_META).stat().st_mtime_ns
    again = prepare(find_video_jobs(videos, options), out, options)
    assert again.clips_done == 0 and again.clips_skipped == 1 and again.frames_written == 0
    assert (clip / CLIP_META).stat().st_mtime_ns == stamp


def test_synthetic_prepare_in_worker_processes_feeds_the_dataset(tmp_path):
    photos = tmp_path / "photos" / "collins"
    photos.mkdir(parents=True)
    cv2.imwrite(str(photos / "astronaut.jpg"), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "synthetic"
    options = PrepareOptions(
        image_size=SIZE, clips_per_photo=3, frames_per_clip=5, split="heldout", workers=2
    )
    report = prepare(find_photo_jobs(tmp_path / "photos", options), out, options)
    assert report.clips_done == 3 and report.frames_written == 15 and not report.failed
    clips = scan_clips(out)
    assert [c.path for c in clips] == [f"collins/astronaut/s000{i}" for i in range(3)]
    assert all(len(c.motions) == 5 and c.source == "synthetic" for c in clips)

    # held-out pairs: fixed, never augmented, same clip, different frames
    dataset = PairDataset(out, split="heldout", seed=0)
    assert len(dataset) == 15 and dataset.identities == ["collins"]
    item = dataset[7]
    for side in ("source", "target"):
        assert item[f"{side}_image"].shape == (3, SIZE, SIZE)
        assert item[f"{side}_stickman"].shape == (3, SIZE, SIZE)
        assert item[f"{side}_mask"].shape == (1, SIZE, SIZE)
        assert item[f"{side}_pose"].shape == (136,)
        assert -1 <= float(item[f"{side}_image"].min()) <= float(item[f"{side}_image"].max()) <= 1
    assert item["identity"] == "collins"
    assert not torch.equal(item["source_pose"], item["target_pose"])
    with pytest.raises(ValueError, match="splits found: \\['heldout'\\]"):
        PairDataset(out, split="train")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, rig):
    """Two identities of synthetic clips written with the layout's writer."""
    from models.data.layout import ClipMeta, write_clip

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for identity in ("ann", "bob"):
        for c in range(2):
            frames = [rig.render(m) for m in sample_clip_motions(rng, 4, MotionRanges())]
            meta = ClipMeta(identity, "photo", f"s{c:04d}", "train", "synthetic", SIZE, 4)
            write_clip(
                root / identity / "photo" / f"s{c:04d}", meta, [f.image for f in frames],
                [f.mask for f in frames], [f.pose for f in frames],
            )
    return root


def test_dataset_pairs_are_deterministic_and_stay_in_the_clip(prepared):
    dataset = PairDataset(prepared, image_size=SIZE, split="train", seed=5)
    same = PairDataset(prepared, image_size=SIZE, split="train", seed=5)
    other = PairDataset(prepared, image_size=SIZE, split="train", seed=6)
    assert len(dataset) == 16
    keypoints = {
        (c.identity, c.clip): np.load(prepared / c.path / KEYPOINTS) for c in dataset.clips
    }
    differs = 0
    for i in range(len(dataset)):
        a, b, c = dataset[i], same[i], other[i]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "identity")
        differs += not torch.equal(a["source_image"], c["source_image"])

        # both poses come from the item's clip, and they are different frames (flips undone)
        clip = dataset.clips[i // 4]
        rows = keypoints[(clip.identity, clip.clip)]
        poses = [a["source_pose"].numpy(), a["target_pose"].numpy()]
        matches = [
            [j for j, row in enumerate(rows) if np.allclose(row, p)
             or np.allclose(row, flip_pose(p))]
            for p in poses
        ]
        assert matches[0] and matches[1] and matches[0] != matches[1]
        assert a["identity"] == clip.identity
    assert differs > 0

    # a new epoch draws new sources
    dataset.set_epoch(1)
    assert any(
        not torch.equal(dataset[i]["source_pose"], same[i]["source_pose"])
        for i in range(len(dataset))
    )


def test_dataset_flip_mirrors_image_and_pose_together(prepared):
    plain = PairDataset(prepared, split="train", seed=0, augment=None)
    flipped = PairDataset(
        prepared, split="train", seed=0,
        augment=Augment(flip=1.0, brightness=0, contrast=0, saturation=0),
    )
    a, b = plain[3], flipped[3]
    assert torch.allclose(b["target_image"], a["target_image"].flip(-1), atol=0.02)
    assert torch.allclose(b["target_pose"], torch.from_numpy(flip_pose(a["target_pose"].numpy())))
    # the stickman is drawn from the flipped pose, so it matches the mirrored one closely
    mismatch = (b["target_stickman"] - a["target_stickman"].flip(-1)).abs().mean()
    assert mismatch < 0.05
    assert np.array_equal(flip_pose(flip_pose(a["target_pose"].numpy())), a["target_pose"].numpy())


def test_dataset_is_fast(prepared):
    # CPU time, not wall time: the test machine's cores are shared
    torch.set_num_threads(1)
    dataset = PairDataset(prepared, split="train", seed=0)
    dataset[0]
    start = time.process_time()
    for _ in range(3):
        for i in range(len(dataset)):
            dataset[i]
    per_item = (time.process_time() - start) / (3 * len(dataset))
    assert per_item < 0.01, f"{per_item * 1e3:.1f} ms CPU per item"


def test_shipped_photos_have_sources():
    sources = (REPO / "assets" / "portraits" / "SOURCES.md").read_text()
    photos = sorted((REPO / "assets").glob("*/*/*.jpg"))
    assert len(photos) >= 5
    for photo in photos:
        assert f"{photo.parent.parent.name}/{photo.parent.name}/{photo.name}" in sources
        assert photo.stat().st_size < 200_000
