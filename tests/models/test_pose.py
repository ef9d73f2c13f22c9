"""Pose pipeline on a real photo (skimage's astronaut) with the real mediapipe models."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from models.landmarks68 import (
    IBUG68_MIRROR,
    MESH_TO_IBUG68,
    NUM_MESH_POINTS,
    PARTS,
    part_slices,
)
from models.pose import (
    POSE_ERROR_CODES,
    STICKMAN_COLOURS,
    CropBox,
    FaceLandmarks,
    PoseError,
    PosePipeline,
    crop_box,
    crop_image,
    decode_image,
    denormalise_pose,
    draw_stickman,
    image_to_chw,
    normalise_points,
)

SIZE = 256
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline():
    with PosePipeline(SIZE) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # [512, 512, 3] uint8


@pytest.fixture(scope="module")
def face(pipeline, astronaut) -> FaceLandmarks:
    return pipeline.detect(astronaut)


@pytest.fixture(scope="module")
def source(pipeline, astronaut):
    return pipeline.prepare_source(astronaut)


def _group(points: np.ndarray, name: str) -> np.ndarray:
    return points[part_slices()[name]]


def _paste(canvas_hw: tuple[int, int], image: np.ndarray, side: int, x: int, y: int):
    """A black canvas with `image` resized to side x side at (x, y)."""
    canvas = np.zeros((*canvas_hw, 3), dtype=np.uint8)
    canvas[y : y + side, x : x + side] = cv2.resize(
        image, (side, side), interpolation=cv2.INTER_AREA
    )
    return canvas


# --- the landmark table ----------------------------------------------------------------


def test_table_is_a_valid_68_point_scheme():
    assert MESH_TO_IBUG68.shape == (68,)
    assert len(set(MESH_TO_IBUG68.tolist())) == 68
    assert MESH_TO_IBUG68.min() >= 0 and MESH_TO_IBUG68.max() < NUM_MESH_POINTS

    # parts tile 0..67 in iBUG order
    starts = [start for start, _, _ in PARTS.values()]
    sizes = [len(idx) for _, idx, _ in PARTS.values()]
    assert starts == [0, 17, 22, 27, 31, 36, 42, 48, 60]
    assert sizes == [17, 5, 5, 4, 5, 6, 6, 12, 8]

    # the mirror table is an involution that fixes exactly the midline points
    assert (IBUG68_MIRROR[IBUG68_MIRROR] == np.arange(68)).all()
    midline = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
    assert np.flatnonzero(IBUG68_MIRROR == np.arange(68)).tolist() == midline


# --- landmarks on the astronaut ----------------------------------------------------------


def test_points_fall_in_the_right_regions(face):
    points = face.points
    assert points.shape == (68, 2) and points.dtype == np.float32
    assert face.num_faces == 1

    jaw = _group(points, "jaw")
    right_eye, left_eye = _group(points, "right_eye"), _group(points, "left_eye")
    eyes_y = np.concatenate([right_eye, left_eye])[:, 1].mean()
    mouth_y = _group(points, "outer_lip")[:, 1].mean()
    nose_tip = points[30]

    # jaw below the eyes (its ends start near eye height), chin the lowest point
    assert (jaw[2:15, 1] > eyes_y).all()
    assert jaw[0, 1] > _group(points, "right_brow")[:, 1].max()
    assert points[8, 1] == pytest.approx(points[:, 1].max(), abs=2.0)

    # nose tip between the eyes and the mouth, brows above the eyes
    assert eyes_y < nose_tip[1] < mouth_y
    assert _group(points, "right_brow")[:, 1].mean() < right_eye[:, 1].min()
    assert _group(points, "left_brow")[:, 1].mean() < left_eye[:, 1].min()

    # subject's right is on the image's left in this unmirrored frontal photo
    assert right_eye[:, 0].mean() < nose_tip[0] < left_eye[:, 0].mean()
    assert jaw[0, 0] < points[8, 0] < jaw[16, 0]
    assert points[36, 0] < points[39, 0] < points[42, 0] < points[45, 0]
    assert points[48, 0] < points[54, 0]

    # the face of this photo lies around (225, 130) and is about 90 px across
    x0, y0, x1, y1 = face.box
    assert 170 < x0 < 190 and 260 < x1 < 285 and 75 < y0 < 100 and 165 < y1 < 190


def test_flipped_photo_mirrors_the_points(pipeline, astronaut, face):
    flipped = pipeline.detect(np.ascontiguousarray(astronaut[:, ::-1]))
    width = astronaut.shape[1]

    # mirror back: x -> width - x, and swap each landmark with its other-side partner
    back = flipped.points.copy()
    back[:, 0] = width - back[:, 0]
    back = back[IBUG68_MIRROR]
    error = np.linalg.norm(back - face.points, axis=1)
    assert error.mean() < 2.5 and error.max() < 6.0

    # without the swap the sides would be wrong by a whole eye distance
    unswapped = flipped.points.copy()
    unswapped[:, 0] = width - unswapped[:, 0]
    assert np.linalg.norm(unswapped[36] - face.points[36]) > 30


# --- crop and normalisation ---------------------------------------------------------------


def test_crop_box_rule_and_whole_face_inside(face):
    box = crop_box(face.points)
    x0, y0, x1, y1 = face.box
    longer = max(x1 - x0, y1 - y0)
    assert box.side == pytest.approx(2 * longer)
    assert box.cx == pytest.approx((x0 + x1) / 2)
    assert box.cy == pytest.approx((y0 + y1) / 2 - longer / 6)

    margin = 0.1 * box.side
    assert (face.points[:, 0] > box.x0 + margin).all()
    assert (face.points[:, 0] < box.x1 - margin).all()
    assert (face.points[:, 1] > box.y0 + margin).all()
    assert (face.points[:, 1] < box.y1 - margin).all()


def test_prepare_source(source, astronaut, face):
    assert source.image.shape == (SIZE, SIZE, 3) and source.image.dtype == np.uint8
    assert source.stickman.shape == (SIZE, SIZE, 3) and source.stickman.dtype == np.uint8
    assert source.mask.shape == (SIZE, SIZE) and source.mask.dtype == np.float32
    assert source.pose.shape == (136,) and source.pose.dtype == np.float32
    assert source.num_faces == 1
    assert source.crop == crop_box(face.points)

    # pose inside [-1, 1] (with room to spare: the crop is twice the face)
    assert np.abs(source.pose).max() <= 0.75
    assert 0.0 <= source.mask.min() and source.mask.max() <= 1.0

    # the crop is the photo's pixels at the crop box
    expected = crop_image(astronaut, source.crop, SIZE)
    np.testing.assert_array_equal(source.image, expected)


def test_normalise_denormalise_round_trip(face):
    box = crop_box(face.points)
    pose = normalise_points(face.points, box)
    assert pose.shape == (136,)
    assert np.abs(pose).max() <= 1.0

    # in crop pixels at the crop's own size: back to image pixels exactly
    back = denormalise_pose(pose, box.side) + np.array([box.x0, box.y0])
    np.testing.assert_allclose(back, face.points, atol=1e-3)

    # at the model's size the points scale with the crop
    scaled = denormalise_pose(pose, SIZE)
    expected = (face.points - np.array([box.x0, box.y0])) * (SIZE / box.side)
    np.testing.assert_allclose(scaled, expected, atol=1e-3)


def test_crop_image_geometry_and_padding():
    # a ramp image: red = x index, green = y index
    ramp = np.zeros((256, 256, 3), dtype=np.uint8)
    ramp[..., 0] = np.arange(256)[None, :]
    ramp[..., 1] = np.arange(256)[:, None]

    # one output pixel per source pixel: an exact copy
    box = CropBox(cx=128.0, cy=100.0, side=64.0)
    crop = crop_image(ramp, box, 64)
    np.testing.assert_array_equal(crop, ramp[68:132, 96:160])

    # 2x and 4x reductions: pixel u covers source x in [96 + k u, 96 + k (u + 1))
    for size in (32, 16):
        k = 64 // size
        crop = crop_image(ramp, box, size).astype(np.float64)
        centres = 96 + k * (np.arange(size) + 0.5) - 0.5
        np.testing.assert_allclose(crop[0, :, 0], centres, atol=1.0)

    # a box past the top-left corner: edge repeats the border, black fills zeros
    box = CropBox(cx=0.0, cy=0.0, side=64.0)
    edge = crop_image(ramp, box, 64, pad="edge")
    black = crop_image(ramp, box, 64, pad="black")
    np.testing.assert_array_equal(edge[32:, 32:], ramp[:32, :32])
    np.testing.assert_array_equal(black[32:, 32:], ramp[:32, :32])
    assert (edge[:32, 32:, 0] == np.arange(32)[None, :]).all()  # rows repeat row 0
    assert (black[:32, :32] == 0).all()

    # reduction path past the border stays aligned with the direct path
    far = CropBox(cx=10.0, cy=240.0, side=200.0)
    small = crop_image(ramp, far, 20, pad="black").astype(np.int32)
    assert (small[:, :5] == 0).all()  # x < -90 + 50: outside the image
    assert abs(small[5, 15, 0] - (far.x0 + 155)) <= 3

    with pytest.raises(ValueError, match="pad"):
        crop_image(ramp, box, 64, pad="mirror")  # type: ignore[arg-type]


# --- stickman and mask ---------------------------------------------------------------------


def test_stickman_draws_each_part_in_its_colour(source):
    stickman = source.stickman
    lit = stickman.max(axis=2) > 0
    assert 0.01 < lit.mean() < 0.2  # lines on a black background

    points = denormalise_pose(source.pose, SIZE)
    for name, part in part_slices().items():
        colour = np.array(STICKMAN_COLOURS[name], dtype=np.float64)
        for x, y in points[part]:
            i, j = int(y), int(x)
            patch = stickman[i - 2 : i + 3, j - 2 : j + 3].reshape(-1, 3).astype(np.float64)
            brightest = patch[patch.sum(axis=1).argmax()]
            assert brightest.sum() > 0, f"nothing drawn near {name} point ({x:.0f}, {y:.0f})"
            if "lip" not in name:  # lip corners overlap the other lip's line
                assert np.abs(brightest - colour).max() < 80, (name, brightest, colour)

    # far from every landmark the stickman is black
    assert (stickman[:20, :20] == 0).all()

    # the same pose draws the same stickman
    np.testing.assert_array_equal(draw_stickman(source.pose, SIZE), stickman)


def test_mask_is_foreground_on_the_face_and_background_in_a_corner(source):
    points = denormalise_pose(source.pose, SIZE)
    cx, cy = points[30].astype(int)  # nose tip
    assert source.mask[cy - 10 : cy + 10, cx - 10 : cx + 10].mean() > 0.9
    assert source.mask[:24, :24].mean() < 0.1  # wall behind the astronaut, top left


def test_image_to_chw(source):
    tensor = image_to_chw(source.image)
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == np.float32
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    np.testing.assert_allclose(tensor[:, 5, 7], source.image[5, 7] / 127.5 - 1, atol=1e-6)


# --- faces that cannot be used ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["black", "noise"])
def test_no_face(pipeline, kind):
    rng = np.random.default_rng(0)
    image = (
        np.zeros((320, 320, 3), np.uint8)
        if kind == "black"
        else rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    )
    with pytest.raises(PoseError) as info:
        pipeline.detect(image)
    assert info.value.code == "no_face"
    assert "no face" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_tiny_face_is_refused(pipeline, astronaut):
    canvas = _paste((512, 512), astronaut, 60, 200, 200)  # face of about 11 px
    with pytest.raises(PoseError) as info:
        pipeline.prepare_source(canvas)
    assert info.value.code in ("face_too_small", "no_face")
    assert info.value.code in POSE_ERROR_CODES
    assert "face" in str(info.value)


def test_small_face_is_too_small(pipeline, astronaut):
    canvas = _paste((512, 512), astronaut, 180, 200, 200)  # face of about 35 px
    with pytest.raises(PoseError) as info:
        pipeline.detect(canvas)
    assert info.value.code == "face_too_small"
    assert "too small" in str(info.value) and "40 px" in str(info.value)


def test_face_found_by_the_full_range_detector(pipeline, astronaut, face):
    # too small for the mesh's own detector, found by the full-range one, then meshed
    side, x, y = 250, 200, 200
    canvas = _paste((512, 512), astronaut, side, x, y)
    found = pipeline.detect(canvas)
    expected = face.points * (side / 512) + np.array([x, y])
    error = np.linalg.norm(found.points - expected, axis=1)
    assert found.num_faces == 1
    assert error.mean() < 2.0, error.mean()


@pytest.mark.parametrize("big_first", [True, False], ids=["big-left", "big-right"])
def test_several_faces_take_the_largest(pipeline, astronaut, face, big_first):
    small = 358  # 0.7 x 512
    canvas = np.zeros((512, 512 + small, 3), dtype=np.uint8)
    big_x, small_x = (0, 512) if big_first else (small, 0)
    canvas[:, big_x : big_x + 512] = astronaut
    canvas[:small, small_x : small_x + small] = cv2.resize(
        astronaut, (small, small), interpolation=cv2.INTER_AREA
    )

    found = pipeline.detect(canvas)
    assert found.num_faces == 2
    expected = face.points + np.array([big_x, 0])
    assert np.linalg.norm(found.points - expected, axis=1).mean() < 3.0

    source = pipeline.prepare_source(canvas)
    assert source.num_faces == 2


def test_bad_arrays_are_refused(pipeline, astronaut):
    for bad in (astronaut.astype(np.float32), astronaut[..., 0], astronaut[..., :2]):
        with pytest.raises(PoseError) as info:
            pipeline.detect(bad)
        assert info.value.code == "bad_image"
        assert "uint8 [H, W, 3]" in str(info.value)


# --- decoding uploads -----------------------------------------------------------------------


def _encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_decode_image(astronaut):
    png = _encode(astronaut, "PNG")
    decoded = decode_image(png)
    assert decoded.dtype == np.uint8 and decoded.shape == (512, 512, 3)
    np.testing.assert_array_equal(decoded, astronaut)

    # grey and RGBA become RGB
    assert decode_image(_encode(astronaut[..., 0], "PNG")).shape == (512, 512, 3)
    rgba = np.dstack([astronaut, np.full((512, 512), 255, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG")), astronaut)


def test_decode_applies_exif_orientation(astronaut):
    wide = astronaut[:200]  # [200, 512, 3]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    decoded = decode_image(_encode(wide, "JPEG", exif=exif.tobytes()))
    assert decoded.shape == (512, 200, 3)


@pytest.mark.parametrize("kind", ["truncated-jpeg", "truncated-png", "text", "empty"])
def test_decode_refuses_broken_bytes(astronaut, kind):
    payload = {
        "truncated-jpeg": lambda: _encode(astronaut, "JPEG", quality=90)[:5000],
        "truncated-png": lambda: _encode(astronaut, "PNG")[:20000],
        "text": lambda: b"this is not an image, just some text" * 10,
        "empty": lambda: b"",
    }[kind]()
    with pytest.raises(PoseError) as info:
        decode_image(payload)
    assert info.value.code == "bad_image"
    assert str(info.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [200_000, 10_000], ids=["just-over", "far-over"])
def test_decode_respects_the_pixel_limit(astronaut, monkeypatch, limit):
    # 512 x 512 = 262,144 pixels; PIL itself refuses from twice its limit on
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(PoseError) as info:
        decode_image(_encode(astronaut, "PNG"))
    assert info.value.code == "bad_image"
    assert "too large" in str(info.value) and str(limit) in str(info.value)


# --- driving frames ---------------------------------------------------------------------------


def test_pose_from_frame_tracks_a_moving_face(pipeline, astronaut, source):
    pose, box = pipeline.pose_from_frame(astronaut)
    assert pose.shape == (136,) and pose.dtype == np.float32
    assert np.abs(pose - source.pose).max() < 0.05
    assert abs(box.side - source.crop.side) < 0.05 * source.crop.side

    # move the face right by 6 px a frame: the crop follows
    last_cx = box.cx
    for _ in range(3):
        astronaut = np.ascontiguousarray(np.roll(astronaut, 6, axis=1))
        pose, box = pipeline.pose_from_frame(astronaut)
        assert 3 < box.cx - last_cx < 9
        assert np.abs(pose).max() <= 1.0
        last_cx = box.cx

    with pytest.raises(PoseError) as info:
        pipeline.pose_from_frame(np.zeros((240, 320, 3), np.uint8))
    assert info.value.code == "no_face"


def test_frame_tracker_of_its_own(pipeline, astronaut, source):
    with pipeline.frame_tracker() as tracker:
        pose, _ = tracker.pose_from_frame(astronaut)
        assert np.abs(pose - source.pose).max() < 0.05
    with pytest.raises(RuntimeError, match="closed"):
        tracker.detect(astronaut)


# --- sharing and lifetime ---------------------------------------------------------------------


def test_threads_share_one_pipeline(pipeline, astronaut, face):
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(2):
                results.append(pipeline.detect(astronaut).points)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 6
    for points in results:
        np.testing.assert_allclose(points, face.points, atol=1e-3)


def test_closed_pipeline_refuses_work(astronaut):
    pipe = PosePipeline(128)
    assert pipe.prepare_source(astronaut).image.shape == (128, 128, 3)
    pipe.close()
    pipe.close()  # closing twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        pipe.detect(astronaut)


def test_pose_modules_do_not_import_torch():
    code = (
        "import sys, models.pose, models.landmarks68\n"
        "models.pose.PosePipeline(64).close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
