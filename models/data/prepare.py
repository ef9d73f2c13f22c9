"""Prepare training data: talking-head videos or still portraits -> the layout of layout.py.

Both sources are cut into clips, and each clip is one unit of work: done by a process of a
pool (each process builds its own mediapipe pipelines), skipped when it is already
finished, so an interrupted run resumes where it stopped. Frames whose face cannot be
found are counted by reason and reported, never fatal.
"""

from __future__ import annotations

import logging
import multiprocessing
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from models.data.layout import (
    ClipMeta,
    Split,
    clip_dir,
    is_finished,
    split_for_identity,
    write_clip,
    write_manifest,
)
from models.data.synthetic import MotionRanges

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class PrepareOptions:
    """Settings of `avatar prepare-data`."""

    image_size: int = 256
    every: int = 5  # video: keep every k-th frame
    max_frames: int = 32  # video: at most this many kept frames per clip
    clips_per_photo: int = 40  # synthetic
    frames_per_clip: int = 12  # synthetic
    split: Literal["train", "heldout", "auto"] = "train"
    heldout_percent: float = 5.0  # split="auto": share of identities held out
    workers: int = 2  # processes; 1 runs in this process
    seed: int = 0
    motion: MotionRanges = field(default_factory=MotionRanges)


@dataclass(frozen=True)
class ClipJob:
    """One clip to make: from a video file, a frame folder, or a photo (synthetic)."""

    kind: Literal["video", "frames", "synthetic"]
    origin: Path
    identity: str
    video: str
    clip: str
    split: Split
    index: int = 0  # synthetic: clip number of this photo


@dataclass(frozen=True)
class ClipResult:
    path: str
    frames: int
    failed: dict[str, int]


@dataclass
class PrepareReport:
    """What a run did; `failed` counts frames (video) or photos (synthetic) by reason."""

    clips_total: int = 0
    clips_done: int = 0
    clips_skipped: int = 0  # already finished by an earlier run
    frames_written: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    empty_clips: int = 0  # clips with fewer than two usable frames (no pairs)
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clips_total": self.clips_total,
            "clips_done": self.clips_done,
            "clips_skipped": self.clips_skipped,
            "frames_written": self.frames_written,
            "failed": dict(self.failed),
            "empty_clips": self.empty_clips,
            "dataset_frames": self.manifest.get("frames", {}),
            "dataset_clips": len(self.manifest.get("clips", [])),
        }


# ---------------------------------------------------------------------------------------
# Finding the work
# ---------------------------------------------------------------------------------------


def _choose_split(identity: str, options: PrepareOptions) -> Split:
    if options.split == "auto":
        return split_for_identity(identity, options.heldout_percent)
    return options.split


def find_video_jobs(videos_dir: Path, options: PrepareOptions) -> list[ClipJob]:
    """Clips in the VoxCeleb2 layout: person/video/clip.mp4 or person/video/clip/*.jpg.

    A video file directly under person/ (person/video.mp4) counts as a one-clip video.
    """
    jobs = []
    for person in sorted(p for p in videos_dir.iterdir() if p.is_dir()):
        split = _choose_split(person.name, options)
        for video in sorted(person.iterdir()):
            if video.is_file() and video.suffix.lower() in VIDEO_SUFFIXES:
                jobs.append(ClipJob("video", video, person.name, video.stem, "00000", split))
                continue
            if not video.is_dir():
                continue
            for clip in sorted(video.iterdir()):
                if clip.is_file() and clip.suffix.lower() in VIDEO_SUFFIXES:
                    jobs.append(ClipJob("video", clip, person.name, video.name, clip.stem, split))
                elif clip.is_dir() and any(_frame_files(clip)):
                    jobs.append(ClipJob("frames", clip, person.name, video.name, clip.name, split))
    return jobs


def find_photo_jobs(photos_dir: Path, options: PrepareOptions) -> list[ClipJob]:
    """Synthetic clips of photos: photos_dir/<identity>/*.jpg, or loose photos (the file
    name is then the identity)."""
    photos: list[tuple[str, Path]] = []
    for entry in sorted(photos_dir.iterdir()):
        if entry.is_dir():
            photos += [(entry.name, p) for p in _frame_files(entry)]
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            photos.append((entry.stem, entry))
    jobs = []
    for identity, photo in photos:
        split = _choose_split(identity, options)
        for index in range(options.clips_per_photo):
            jobs.append(
                ClipJob("synthetic", photo, identity, photo.stem, f"s{index:04d}", split, index)
            )
    return jobs


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------
# Doing one clip (in a worker process)
# ---------------------------------------------------------------------------------------


class ClipMaker:
    """Per-process state: the pose pipeline, the mesh detector and cached photo rigs."""

    def __init__(self, out_dir: Path, options: PrepareOptions) -> None:
        self.out_dir = out_dir
        self.options = options
        self._pipeline: Any = None
        self._detector: Any = None
        self._rigs: dict[Path, Any] = {}

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            from models.pose import PosePipeline

            self._pipeline = PosePipeline(self.options.image_size)
        return self._pipeline

    def make(self, job: ClipJob) -> ClipResult:
        folder = clip_dir(self.out_dir, job.identity, job.video, job.clip)
        if job.kind == "synthetic":
            return self._make_synthetic(job, folder)
        return self._make_video(job, folder)

    def _frames(self, job: ClipJob) -> Iterator[tuple[int, np.ndarray | None]]:
        """(index, RGB frame or None if unreadable) for every k-th frame, up to the limit."""
        every, limit = max(self.options.every, 1), self.options.max_frames
        kept = 0
        if job.kind == "frames":
            for index, path in enumerate(_frame_files(job.origin)):
                if index % every:
                    continue
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                yield index, None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                kept += 1
                if kept >= limit:
                    return
            return
        capture = cv2.VideoCapture(str(job.origin))
        try:
            index = 0
            while kept < limit:
                ok = capture.grab()
                if not ok:
                    break
                if index % every == 0:
                    ok, bgr = capture.retrieve()
                    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None
                    kept += 1
                index += 1
        finally:
            capture.release()

    def _make_video(self, job: ClipJob, folder: Path) -> ClipResult:
        from models.pose import PoseError, crop_box, crop_image, normalise_points

        pipeline = self.pipeline
        size = self.options.image_size
        images, masks, poses, indices = [], [], [], []
        failed: dict[str, int] = {}
        for index, frame in self._frames(job):
            try:
                if frame is None:
                    raise PoseError("bad_image", "the frame could not be decoded")
                face = pipeline.detect(frame)
            except PoseError as exc:
                failed[exc.code] = failed.get(exc.code, 0) + 1
                continue

            # crop around this frame's own landmarks; the mask comes from the crop
            box = crop_box(face.points)
            crop = crop_image(frame, box, size, pad=pipeline.options.pad)  # [S, S, 3]
            images.append(crop)
            poses.append(normalise_points(face.points, box))  # [136]
            masks.append(pipeline.segment(crop))  # [S, S]
            indices.append(index)

        meta = ClipMeta(
            identity=job.identity, video=job.video, clip=job.clip, split=job.split,
            source="video", image_size=size, frames=len(images), failed=failed,
            origin=str(job.origin), frame_index=indices,
        )
        write_clip(folder, meta, images, masks, poses)
        return ClipResult(meta.path, meta.frames, failed)

    def _rig(self, photo: Path) -> Any:
        from models.data.synthetic import MeshDetector, PortraitRig
        from models.pose import decode_image

        if photo not in self._rigs:
            if self._detector is None:
                self._detector = MeshDetector()
            image = decode_image(photo.read_bytes())
            self._rigs[photo] = PortraitRig.from_photo(
                image, self.options.image_size, self._detector, self.pipeline.segment
            )
        return self._rigs[photo]

    def _make_synthetic(self, job: ClipJob, folder: Path) -> ClipResult:
        from models.data.synthetic import sample_clip_motions
        from models.pose import PoseError

        meta = ClipMeta(
            identity=job.identity, video=job.video, clip=job.clip, split=job.split,
            source="synthetic", image_size=self.options.image_size, frames=0,
            origin=str(job.origin),
        )
        try:
            rig = self._rig(job.origin)
        except PoseError as exc:
            meta.failed = {exc.code: 1}
            write_clip(folder, meta, [], [], [])
            return ClipResult(meta.path, 0, meta.failed)

        # the same clip gets the same motions whichever process makes it
        photo_key = zlib.crc32(f"{job.identity}/{job.origin.name}".encode())
        rng = np.random.default_rng([self.options.seed, photo_key, job.index])
        motions = sample_clip_motions(
            rng, self.options.frames_per_clip, self.options.motion, rig.mouth_gap
        )
        frames = [rig.render(motion) for motion in motions]
        meta.frames = len(frames)
        meta.frame_index = list(range(len(frames)))
        meta.motions = [motion.to_dict() for motion in motions]
        write_clip(
            folder, meta, [f.image for f in frames], [f.mask for f in frames],
            [f.pose for f in frames],
        )
        return ClipResult(meta.path, meta.frames, {})

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        if self._detector is not None:
            self._detector.close()


_worker: ClipMaker | None = None


def _init_worker(out_dir: Path, options: PrepareOptions) -> None:
    global _worker
    cv2.setNumThreads(1)
    _worker = ClipMaker(out_dir, options)


def _run_job(job: ClipJob) -> ClipResult:
    if _worker is None:
        raise RuntimeError("worker process was not initialised")
    return _worker.make(job)


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------


def prepare(
    jobs: list[ClipJob],
    out_dir: Path,
    options: PrepareOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Make every unfinished clip of `jobs` under out_dir, then rebuild the manifest.

    on_progress(done, total) is called after each clip (skipped clips count as done).
    """
    if options.image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {options.image_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(clips_total=len(jobs))

    # finished clips of an earlier run are skipped
    todo = []
    for job in jobs:
        if is_finished(clip_dir(out_dir, job.identity, job.video, job.clip)):
            report.clips_skipped += 1
        else:
            todo.append(job)
    done = report.clips_skipped
    if on_progress:
        on_progress(done, len(jobs))
    logger.info("%d clips to make, %d already finished", len(todo), report.clips_skipped)

    def account(result: ClipResult) -> None:
        nonlocal done
        report.clips_done += 1
        report.frames_written += result.frames
        report.empty_clips += result.frames < 2
        for code, count in result.failed.items():
            report.failed[code] = report.failed.get(code, 0) + count
        done += 1
        if on_progress:
            on_progress(done, len(jobs))

    # one process per worker, each with its own mediapipe graphs
    workers = max(1, min(options.workers, len(todo)))
    if workers == 1:
        maker = ClipMaker(out_dir, options)
        try:
            for job in todo:
                account(maker.make(job))
        finally:
            maker.close()
    elif todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(out_dir, options)
        ) as pool:
            futures: list[Future[ClipResult]] = [pool.submit(_run_job, job) for job in todo]
            for future in as_completed(futures):
                account(future.result())

    report.manifest = write_manifest(out_dir)
    if report.failed:
        logger.warning("frames that failed, by reason: %s", report.failed)
    return report
