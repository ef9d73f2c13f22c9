"""Make the page's bundled recorded pose track from a real face.

The astronaut photo (skimage.data.astronaut, public domain) is turned into a short
synthetic head-motion clip by models.data.synthetic (the face mesh moved and the photo
warped to match: a turn left and right, a nod, a tilt, the mouth opening twice, two
blinks). Each warped frame then goes through the pose pipeline like a webcam frame would:
mediapipe finds the 68 landmarks, and they are normalised to [-1, 1] in their crop. So
the track holds landmarks *detected on images of a face*, not the synthetic mesh itself.

    .venv/bin/python -m tests.browser.pose_track            # writes the bundled file
    .venv/bin/python -m tests.browser.pose_track --out x.json

Deterministic: no random numbers, so a rerun writes the same track (up to mediapipe).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TRACK_PATH = Path(__file__).resolve().parents[2] / "server/static/web/poses.json"
FPS = 30
SECONDS = 4.0
RENDER_SIZE = 256  # pixels of each warped frame the landmarks are taken from
DECIMALS = 4  # 1e-4 of a crop half-side: far below a pixel at 256 px


def clip_motions(frames: int) -> list:
    """A scripted head motion, smooth and looping (the last frame leads into the first)."""
    from models.data.synthetic import HeadMotion

    motions = []
    rad = math.pi / 180
    for index in range(frames):
        phase = 2 * math.pi * index / frames  # one lap over the clip

        # head: turn twice as slowly as the nod, tilt with the turn
        yaw = 18 * rad * math.sin(phase)
        pitch = 8 * rad * math.sin(2 * phase)
        roll = 5 * rad * math.sin(phase + 0.6)

        # mouth opens twice; eyes blink at 35% and 80% of the clip
        mouth = 0.05 * max(0.0, math.sin(2 * phase + 0.8)) ** 2
        blink = 0.0
        for centre in (0.35 * frames, 0.80 * frames):
            blink = max(blink, 1.0 - abs(index - centre) / 2.5)
        motions.append(HeadMotion(
            yaw=yaw, pitch=pitch, roll=roll, scale=1.0 + 0.04 * math.sin(phase),
            mouth=mouth, blink=max(blink, 0.0),
        ))
    return motions


def make_track(fps: int = FPS, seconds: float = SECONDS) -> dict:
    """The track as a JSON-ready dict: {"fps", "points", "frames": [[136 values], ...]}."""
    from skimage.data import astronaut

    from models.data.synthetic import MeshDetector, PortraitRig
    from models.pose import PosePipeline, crop_box, normalise_points

    photo = astronaut()  # [512, 512, 3] uint8
    frames = round(fps * seconds)
    poses = []
    with MeshDetector() as detector, PosePipeline(RENDER_SIZE) as pipeline:
        rig = PortraitRig.from_photo(photo, RENDER_SIZE, detector)

        # warp the photo, then take the landmarks off the warped frame
        for index, motion in enumerate(clip_motions(frames)):
            frame = rig.render(motion).image  # [S, S, 3]
            points = pipeline.detect(frame).points  # [68, 2] pixels
            pose = normalise_points(points, crop_box(points))  # [136] in [-1, 1]
            poses.append([round(float(v), DECIMALS) for v in pose])
            logger.debug("frame %d: pose range %.3f..%.3f", index, pose.min(), pose.max())

    return {
        "fps": fps,
        "points": 68,
        "layout": "frames x 136: x0, y0, x1, y1, ... normalised to [-1, 1] in the crop",
        "source": "skimage.data.astronaut (public domain), warped by "
        "models.data.synthetic, landmarks by models.pose.PosePipeline",
        "frames": poses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TRACK_PATH)
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO)
    track = make_track(args.fps, args.seconds)
    args.out.write_text(json.dumps(track, separators=(",", ":")) + "\n")
    values = np.array(track["frames"])
    logger.info(
        "wrote %s: %d frames, values %.3f..%.3f, %d bytes",
        args.out, len(values), values.min(), values.max(), args.out.stat().st_size,
    )


if __name__ == "__main__":
    main()
