"""Pose pipeline: photo -> 68 landmarks, face crop, normalised pose, stickman, mask.

No PyTorch here: the serving install imports this module. Landmarks come from mediapipe's
face mesh (468 points) mapped to the iBUG 68-point order (models/landmarks68.py); the
foreground mask from mediapipe's selfie segmentation. docs/pose.md describes the rules.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i + 1) x [j, j + 1),
so its centre is (i + 0.5, j + 0.5) and an image of width W spans x in [0, W].
"""

from __future__ import annotations

import io
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.landmarks68 import NUM_LANDMARKS, PARTS, mesh_to_ibug68

logger = logging.getLogger(__name__)

PoseErrorCode = Literal["no_face", "face_too_small", "bad_image"]
POSE_ERROR_CODES: tuple[str, ...] = ("no_face", "face_too_small", "bad_image")

PadMode = Literal["edge", "black"]

# Stickman colours (RGB) per facial part; right and left parts differ so that the
# networks can tell the sides apart.
STICKMAN_COLOURS: dict[str, tuple[int, int, int]] = {
    "jaw": (255, 255, 255),
    "right_brow": (255, 128, 0),
    "left_brow": (0, 128, 255),
    "nose_bridge": (255, 255, 0),
    "lower_nose": (0, 255, 255),
    "right_eye": (255, 0, 0),
    "left_eye": (0, 0, 255),
    "outer_lip": (0, 255, 0),
    "inner_lip": (255, 0, 255),
}
STICKMAN_THICKNESS = 2

_SUBPIXEL_BITS = 4  # cv2 drawing with 1/16 pixel precision
_RECROP_SIZE = 256  # side of the crop a detected face is meshed on again


class PoseError(ValueError):
    """A photo or frame the pose pipeline cannot use; `.code` is stable, the text human."""

    def __init__(self, code: PoseErrorCode, message: str) -> None:
        if code not in POSE_ERROR_CODES:
            raise ValueError(f"PoseError code must be one of {POSE_ERROR_CODES}, got {code!r}")
        super().__init__(message)
        self.code: PoseErrorCode = code
        self.message = message

    def __repr__(self) -> str:
        return f"PoseError({self.code!r}, {self.message!r})"


@dataclass(frozen=True)
class PoseOptions:
    """Settings of a PosePipeline."""

    min_face_px: float = 40.0  # longer side of the 68-point box, in source pixels
    max_num_faces: int = 5  # faces the static face mesh looks for
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5  # streaming face mesh (pose_from_frame)
    pad: PadMode = "edge"  # how crops extending past the image are filled
    find_small_faces: bool = True  # also run the full-range face detector (see detect)
    segmentation_model: int = 0  # selfie segmentation: 0 general (256x256), 1 landscape


@dataclass(frozen=True)
class CropBox:
    """Square face crop in original-image pixels: centre (cx, cy) and side length."""

    cx: float
    cy: float
    side: float

    @property
    def x0(self) -> float:
        return self.cx - self.side / 2

    @property
    def y0(self) -> float:
        return self.cy - self.side / 2

    @property
    def x1(self) -> float:
        return self.cx + self.side / 2

    @property
    def y1(self) -> float:
        return self.cy + self.side / 2

    def to_dict(self) -> dict[str, float]:
        return {"cx": self.cx, "cy": self.cy, "side": self.side}


@dataclass(frozen=True)
class FaceLandmarks:
    """The largest face of an image."""

    points: np.ndarray  # [68, 2] float32, (x, y) pixels, iBUG order
    num_faces: int  # faces found in the image; the largest is the one returned
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the 68 points


@dataclass(frozen=True)
class SourceInputs:
    """Everything registration needs from one photo, at the model's resolution S."""

    image: np.ndarray  # [S, S, 3] uint8 RGB, the face crop
    pose: np.ndarray  # [136] float32 in [-1, 1]
    stickman: np.ndarray  # [S, S, 3] uint8 RGB
    mask: np.ndarray  # [S, S] float32 in [0, 1], 1 = person
    crop: CropBox  # in original-image pixels
    num_faces: int


# ---------------------------------------------------------------------------------------
# Free functions: geometry, crop, normalisation, stickman
# ---------------------------------------------------------------------------------------


def _check_points(points68: np.ndarray) -> np.ndarray:
    points = np.asarray(points68, dtype=np.float32)
    if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected landmarks of shape [68, 2], got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmarks contain NaN or infinite values")
    return points


def landmark_box(points68: np.ndarray) -> tuple[float, float, float, float]:
    """Return (x0, y0, x1, y1) of the landmarks."""
    points = _check_points(points68)
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def crop_box(points68: np.ndarray) -> CropBox:
    """Square crop of a face: the landmark box's centre moved up by 1/6 of the box's
    longer side; side = 2 x that longer side."""
    x0, y0, x1, y1 = landmark_box(points68)
    size = max(x1 - x0, y1 - y0, 1e-3)
    return CropBox(cx=(x0 + x1) / 2, cy=(y0 + y1) / 2 - size / 6, side=2 * size)


def crop_image(image: np.ndarray, box: CropBox, size: int, pad: PadMode = "edge") -> np.ndarray:
    """Cut `box` out of `image` [H, W, C] uint8 and resize it to [size, size, C].

    The box may extend past the image: outside pixels repeat the nearest edge pixel
    (pad="edge", the default) or are black (pad="black"). Strong reductions average
    pixel areas first, so the result does not alias.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image [H, W, C], got {image.dtype} {tuple(image.shape)}"
        )
    if pad not in ("edge", "black"):
        raise ValueError(f"pad must be 'edge' or 'black', got {pad!r}")
    if size < 1 or box.side <= 0:
        raise ValueError(f"crop size and side must be positive, got {size} and {box.side}")
    border = cv2.BORDER_REPLICATE if pad == "edge" else cv2.BORDER_CONSTANT
    scale = size / box.side  # output pixels per source pixel

    # source (after optional area reduction) = offset + a * original coordinate
    source = image
    ox, oy, ax, ay = 0.0, 0.0, 1.0, 1.0
    h, w = image.shape[:2]
    rx0, ry0 = math.floor(box.x0) - 1, math.floor(box.y0) - 1
    rx1, ry1 = math.ceil(box.x1) + 1, math.ceil(box.y1) + 1
    overlaps = rx0 < w and ry0 < h and rx1 > 0 and ry1 > 0
    if scale < 0.5 and overlaps:
        # integer region around the box, padded where it leaves the image
        region = cv2.copyMakeBorder(
            image[max(ry0, 0) : min(ry1, h), max(rx0, 0) : min(rx1, w)],
            max(-ry0, 0),
            max(ry1 - h, 0),
            max(-rx0, 0),
            max(rx1 - w, 0),
            border,
            value=(0, 0, 0, 0),
        )
        rw, rh = rx1 - rx0, ry1 - ry0
        tw, th = max(1, round(rw * scale * 2)), max(1, round(rh * scale * 2))
        source = cv2.resize(region, (tw, th), interpolation=cv2.INTER_AREA)
        if source.ndim == 2:
            source = source[:, :, None]
        ax, ay = tw / rw, th / rh
        ox, oy = -rx0 * ax, -ry0 * ay

    # output pixel u has its centre at original x = box.x0 + (u + 0.5) / scale;
    # cv2 indexes source pixels by their centres, hence the -0.5
    matrix = np.array(
        [
            [ax / scale, 0.0, ox + ax * (box.x0 + 0.5 / scale) - 0.5],
            [0.0, ay / scale, oy + ay * (box.y0 + 0.5 / scale) - 0.5],
        ],
        dtype=np.float64,
    )
    crop = cv2.warpAffine(
        source,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=border,
        borderValue=(0, 0, 0, 0),
    )
    if crop.ndim == 2:
        crop = crop[:, :, None]
    return crop  # [size, size, C]


def normalise_points(points68: np.ndarray, box: CropBox) -> np.ndarray:
    """Landmarks in image pixels -> pose [136] float32: crop-relative, mapped to [-1, 1]."""
    points = _check_points(points68)
    if box.side <= 0:
        raise ValueError(f"crop side must be positive, got {box.side}")
    origin = np.array([box.x0, box.y0], dtype=np.float64)
    unit = (points.astype(np.float64) - origin) / box.side  # [68, 2] in [0, 1] inside
    return (unit * 2 - 1).astype(np.float32).reshape(-1)  # [136] as (x, y) pairs


def denormalise_pose(pose136: np.ndarray, size: int) -> np.ndarray:
    """Pose [136] in [-1, 1] -> landmarks [68, 2] float32 in pixels of a size x size crop."""
    pose = np.asarray(pose136, dtype=np.float32)
    if pose.shape != (2 * NUM_LANDMARKS,):
        raise ValueError(f"expected a pose of shape [136], got {pose.shape}")
    return ((pose.reshape(NUM_LANDMARKS, 2) + 1) / 2 * size).astype(np.float32)  # [68, 2]


def draw_stickman(pose136: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a pose as coloured polylines (one per part, thickness 2) on black.

    Eyes and lips are closed loops; the rest are open lines. Returns [size, size, 3]
    uint8 RGB; colours in STICKMAN_COLOURS.
    """
    points = denormalise_pose(pose136, size)
    stickman = np.zeros((size, size, 3), dtype=np.uint8)

    # cv2 draws at pixel-centre indices, in fixed point with _SUBPIXEL_BITS
    fixed = np.round((points - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)  # [68, 2]
    for name, (start, mesh_idx, closed) in PARTS.items():
        line = fixed[start : start + len(mesh_idx)].reshape(-1, 1, 2)
        cv2.polylines(
            stickman,
            [line],
            isClosed=closed,
            color=STICKMAN_COLOURS[name],
            thickness=STICKMAN_THICKNESS,
            lineType=cv2.LINE_AA,
            shift=_SUBPIXEL_BITS,
        )
    return stickman  # [size, size, 3]


def image_to_chw(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] image or stickman -> float32 [3, H, W] in [-1, 1], the model's input."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}"
        )
    return (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()  # [3, H, W]


def decode_image(data: bytes) -> np.ndarray:
    """Decode uploaded bytes (JPEG, PNG, WebP, ...) -> uint8 [H, W, 3] RGB, upright.

    Raises PoseError("bad_image") for empty, truncated or non-image bytes, and for images
    above PIL's Image.MAX_IMAGE_PIXELS (when that limit is set).
    """
    if not data:
        raise PoseError("bad_image", "the upload is empty: expected image bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            limit = Image.MAX_IMAGE_PIXELS
            width, height = opened.size
            if limit is not None and width * height > limit:
                raise PoseError(
                    "bad_image",
                    f"the image is too large: {width}x{height} pixels, at most {limit} allowed",
                )

            # load() decodes everything, so truncated files fail here, not later
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            rgb = upright.convert("RGB")
    except PoseError:
        raise
    except Image.DecompressionBombError as exc:
        raise PoseError(
            "bad_image",
            f"the image is too large: more than {Image.MAX_IMAGE_PIXELS} pixels allowed ({exc})",
        ) from exc
    except UnidentifiedImageError as exc:
        raise PoseError("bad_image", f"the upload is not a readable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise PoseError("bad_image", f"the image could not be decoded: {exc}") from exc
    image = np.asarray(rgb, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise PoseError("bad_image", f"decoded image has unusable shape {image.shape}")
    return np.ascontiguousarray(image)  # [H, W, 3]


# ---------------------------------------------------------------------------------------
# mediapipe-backed pipeline
# ---------------------------------------------------------------------------------------


def _check_image(image_rgb: Any) -> np.ndarray:
    if not isinstance(image_rgb, np.ndarray):
        raise PoseError(
            "bad_image", f"expected a numpy uint8 [H, W, 3] image, got {type(image_rgb).__name__}"
        )
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise PoseError(
            "bad_image",
            f"expected a uint8 [H, W, 3] RGB image, got {image_rgb.dtype} {image_rgb.shape}",
        )
    if min(image_rgb.shape[:2]) < 1:
        raise PoseError("bad_image", f"the image is empty: shape {image_rgb.shape}")
    return np.ascontiguousarray(image_rgb)


def _faces_from_result(result: Any, width: int, height: int) -> list[np.ndarray]:
    """mediapipe face-mesh result -> list of [68, 2] float32 pixel landmarks."""
    faces = []
    for face in result.multi_face_landmarks or []:
        mesh = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float32)  # [468, 2]
        points = mesh_to_ibug68(mesh) * np.array([width, height], dtype=np.float32)
        faces.append(points.astype(np.float32))  # [68, 2]
    return faces


def _area(box: tuple[float, ...]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _same_face(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two face boxes (x0, y0, x1, y1) overlap enough to be one face."""
    inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    overlap = _area(inter)
    union = _area(a) + _area(b) - overlap
    if union > 0 and overlap / union > 0.3:
        return True
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return b[0] <= cx <= b[2] and b[1] <= cy <= b[3]


def _too_small_text(what: str, longer: float, min_face_px: float) -> str:
    return (
        f"the face in the {what} is too small: it spans {longer:.0f} px, "
        f"at least {min_face_px:.0f} px needed (use a closer or larger photo)"
    )


def _select_face(
    faces: list[np.ndarray], min_face_px: float, what: str, num_faces: int | None = None
) -> FaceLandmarks:
    """Take the largest face (by landmark-box area) and check it is big enough."""
    if not faces:
        raise PoseError("no_face", f"no face was found in the {what}")
    boxes = [landmark_box(face) for face in faces]
    best = int(np.argmax([_area(box) for box in boxes]))
    x0, y0, x1, y1 = boxes[best]
    longer = max(x1 - x0, y1 - y0)
    if longer < min_face_px:
        raise PoseError("face_too_small", _too_small_text(what, longer, min_face_px))
    count = len(faces) if num_faces is None else num_faces
    if count > 1:
        logger.info("%d faces in the %s, using the largest (%.0f px)", count, what, longer)
    return FaceLandmarks(points=faces[best], num_faces=count, box=boxes[best])


class FrameTracker:
    """Landmarks for a stream of frames (webcam): mediapipe face mesh in streaming mode.

    Streaming mode finds the face once and then tracks it from frame to frame, which is
    faster than detecting it in every frame; it looks for one face only. Frames of one
    stream belong to one tracker: frames of another stream make it lose the track, which
    costs a detection (PosePipeline.pose_from_frame then retries with full detection).
    Thread-safe; close() or use as a context manager.
    """

    def __init__(self, image_size: int, options: PoseOptions | None = None) -> None:
        import mediapipe as mp

        self.image_size = image_size
        self.options = options or PoseOptions()
        self._lock = threading.Lock()
        self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=1,
            min_detection_confidence=self.options.min_detection_confidence,
            min_tracking_confidence=self.options.min_tracking_confidence,
        )

    def detect(self, image_rgb: np.ndarray) -> FaceLandmarks:
        """Landmarks of the tracked face in this frame."""
        image = _check_image(image_rgb)
        height, width = image.shape[:2]
        with self._lock:
            if self._mesh is None:
                raise RuntimeError("this FrameTracker is closed")
            result = self._mesh.process(image)
        faces = _faces_from_result(result, width, height)
        return _select_face(faces, self.options.min_face_px, "frame")

    def pose_from_frame(self, image_rgb: np.ndarray) -> tuple[np.ndarray, CropBox]:
        """Pose [136] of the frame's face, normalised in that frame's own crop box."""
        face = self.detect(image_rgb)
        box = crop_box(face.points)
        return normalise_points(face.points, box), box

    def close(self) -> None:
        with self._lock:
            if self._mesh is not None:
                self._mesh.close()
                self._mesh = None

    def __enter__(self) -> FrameTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PosePipeline:
    """Photo -> model inputs (crop, pose, stickman, mask), and frame -> pose.

    Holds a static-image face mesh (up to options.max_num_faces faces) and a selfie
    segmenter behind one lock, plus a streaming face mesh for frames behind another, so
    one pipeline can be shared by threads. Reusable for any number of calls; close() or
    use as a context manager.
    """

    def __init__(self, image_size: int, options: PoseOptions | None = None) -> None:
        import mediapipe as mp

        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.image_size = image_size
        self.options = options or PoseOptions()
        self._lock = threading.Lock()
        self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=self.options.max_num_faces,
            min_detection_confidence=self.options.min_detection_confidence,
        )
        self._segmenter: Any = mp.solutions.selfie_segmentation.SelfieSegmentation(
            model_selection=self.options.segmentation_model
        )
        self._detector: Any = None
        if self.options.find_small_faces:
            self._detector = mp.solutions.face_detection.FaceDetection(
                model_selection=1,  # full range: faces down to ~25 px
                min_detection_confidence=self.options.min_detection_confidence,
            )
        self._tracker_lock = threading.Lock()
        self._tracker: FrameTracker | None = None
        self._closed = False

    def detect(self, image_rgb: np.ndarray) -> FaceLandmarks:
        """68 landmarks of the largest face; PoseError when there is none or it is small.

        The face mesh's own detector only finds faces that fill a good part of the image.
        With options.find_small_faces, mediapipe's full-range face detector runs too; its
        faces that the mesh missed count in num_faces, and when the largest face is one
        of them, the mesh runs again on a crop around it.
        """
        image = _check_image(image_rgb)
        height, width = image.shape[:2]
        min_face_px = self.options.min_face_px
        with self._lock:
            self._check_open()
            faces = _faces_from_result(self._mesh.process(image), width, height)
            meshed = [landmark_box(face) for face in faces]
            missed = self._missed_faces(image, meshed)  # largest first
            num_faces = len(faces) + len(missed)
            largest_meshed = max((_area(box) for box in meshed), default=0.0)
            if not missed or _area(missed[0]) <= largest_meshed:
                return _select_face(faces, min_face_px, "image", num_faces)

            # the largest face is one the mesh missed: mesh it again on a crop around it
            box = missed[0]
            longer = max(box[2] - box[0], box[3] - box[1])
            if longer < min_face_px:
                raise PoseError("face_too_small", _too_small_text("image", longer, min_face_px))
            points = self._mesh_around(image, box)
        if points is None:
            raise PoseError(
                "no_face",
                "a face was detected in the image but its landmarks could not be located "
                "(is it turned away or covered?)",
            )
        return _select_face([points], min_face_px, "image", num_faces)

    def _missed_faces(
        self, image: np.ndarray, meshed: list[tuple[float, float, float, float]]
    ) -> list[tuple[float, float, float, float]]:
        """Boxes (x0, y0, x1, y1) of faces the full-range detector finds and the mesh
        did not, largest first. Call with the lock held."""
        if self._detector is None:
            return []
        height, width = image.shape[:2]
        missed = []
        for detection in self._detector.process(image).detections or []:
            rel = detection.location_data.relative_bounding_box
            x0, y0 = rel.xmin * width, rel.ymin * height
            box = (x0, y0, x0 + rel.width * width, y0 + rel.height * height)
            if not any(_same_face(box, other) for other in meshed):
                missed.append(box)
        return sorted(missed, key=_area, reverse=True)

    def _mesh_around(
        self, image: np.ndarray, box: tuple[float, float, float, float]
    ) -> np.ndarray | None:
        """Landmarks [68, 2] of the face in `box`, meshed on a crop around it, or None.
        Call with the lock held."""
        longer = max(box[2] - box[0], box[3] - box[1])
        region = CropBox(cx=(box[0] + box[2]) / 2, cy=(box[1] + box[3]) / 2, side=2.5 * longer)
        size = _RECROP_SIZE
        crop = crop_image(image, region, size, pad="black")  # [size, size, 3]
        faces = _faces_from_result(self._mesh.process(crop), size, size)
        if not faces:
            return None

        # the face nearest the crop's centre is the detected one; map it back
        centres = [face.mean(axis=0) for face in faces]
        nearest = int(np.argmin([np.hypot(*(c - size / 2)) for c in centres]))
        origin = np.array([region.x0, region.y0], dtype=np.float32)
        return (faces[nearest] * (region.side / size) + origin).astype(np.float32)  # [68, 2]

    def segment(self, image_rgb: np.ndarray) -> np.ndarray:
        """Foreground (person) probability [H, W] float32 in [0, 1]."""
        image = _check_image(image_rgb)
        with self._lock:
            self._check_open()
            result = self._segmenter.process(image)
        mask = np.asarray(result.segmentation_mask, dtype=np.float32)  # [H, W]
        return np.clip(mask, 0.0, 1.0)

    def prepare_source(self, image_rgb: np.ndarray) -> SourceInputs:
        """Everything registration needs from one photo."""
        face = self.detect(image_rgb)

        # crop at the model's resolution; the pose is normalised in the same box
        box = crop_box(face.points)
        size = self.image_size
        crop = crop_image(image_rgb, box, size, pad=self.options.pad)  # [S, S, 3]
        pose = normalise_points(face.points, box)  # [136]
        stickman = draw_stickman(pose, size)  # [S, S, 3]

        # the segmenter sees the crop, so the mask is aligned with it
        mask = self.segment(crop)  # [S, S]
        logger.debug(
            "source prepared: crop centre (%.1f, %.1f) side %.1f, %d face(s)",
            box.cx,
            box.cy,
            box.side,
            face.num_faces,
        )
        return SourceInputs(
            image=crop,
            pose=pose,
            stickman=stickman,
            mask=mask,
            crop=box,
            num_faces=face.num_faces,
        )

    def pose_from_frame(self, image_rgb: np.ndarray) -> tuple[np.ndarray, CropBox]:
        """Pose [136] and crop box of the face in a driving frame (webcam).

        Uses a shared streaming face mesh (one face, tracked between calls); when it finds
        no face, full static detection is tried once before giving up, so frames from
        different streams through one pipeline still work, at detection speed.
        """
        image = _check_image(image_rgb)
        with self._tracker_lock:
            self._check_open()
            if self._tracker is None:
                self._tracker = FrameTracker(self.image_size, self.options)
            tracker = self._tracker
        try:
            face = tracker.detect(image)
        except PoseError as exc:
            if exc.code != "no_face":
                raise
            face = self.detect(image)
        box = crop_box(face.points)
        return normalise_points(face.points, box), box

    def frame_tracker(self) -> FrameTracker:
        """A tracker of its own for one stream (the caller closes it)."""
        return FrameTracker(self.image_size, self.options)

    def close(self) -> None:
        with self._lock, self._tracker_lock:
            if self._closed:
                return
            self._closed = True
            self._mesh.close()
            self._segmenter.close()
            if self._detector is not None:
                self._detector.close()
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this PosePipeline is closed")

    def __enter__(self) -> PosePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
