"""Synthetic pseudo-videos from still portraits.

A still photo becomes many short "clips" of the same person: mediapipe's 3-D face mesh is
moved (head rotation about the head centre, scale, shift, mouth opening, blinks) and the
photo is warped piecewise-affinely so that every mesh point lands where the moved mesh
puts it. The 68 landmarks of each warped frame are therefore known exactly: they are the
moved mesh points picked by the 468 -> 68 table of models/landmarks68.py.

The warp: one fixed triangulation (Delaunay on the photo's mesh points, a ring of points
around the head that moves with it, and points on the border of the working region that
stay put). Every frame rasterises the moved triangles far-to-near into a triangle-id
image at the output resolution, so the near side of a turned face hides the far side,
then maps each output pixel back to the photo through its triangle's affine map and
samples the photo with cv2.remap. About 5-10 ms a frame at 128 px on one core.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy.spatial import Delaunay

from models.landmarks68 import NUM_MESH_POINTS, mesh_to_ibug68
from models.pose import CropBox, PoseError, crop_box, crop_image, normalise_points

logger = logging.getLogger(__name__)

# mediapipe face-mesh indices used to deform the face
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
    377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
FOREHEAD, CHIN = 10, 152
UPPER_INNER_LIP_CENTRE, LOWER_INNER_LIP_CENTRE = 13, 14
MOUTH_CORNERS = (61, 291, 78, 308)

# lower lip, outer and inner edges, without the corners
LOWER_LIP = (146, 91, 181, 84, 17, 314, 405, 321, 375, 95, 88, 178, 87, 14, 317, 402, 318, 324)

# inner-lip contour (loop), used to paint the mouth cavity when the mouth opens
INNER_LIP_LOOP = (
    78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95,
)

# upper-lid points, the lower-lid points they close onto, and the crease above them
RIGHT_UPPER_LID = (246, 161, 160, 159, 158, 157, 173)
RIGHT_LOWER_LID = (7, 163, 144, 145, 153, 154, 155)
RIGHT_CREASE = (247, 30, 29, 27, 28, 56, 190)
LEFT_UPPER_LID = (466, 388, 387, 386, 385, 384, 398)
LEFT_LOWER_LID = (249, 390, 373, 374, 380, 381, 382)
LEFT_CREASE = (467, 260, 259, 257, 258, 286, 414)

RING_SCALE = 1.6  # the head ring: face oval scaled about the head centre
WORK_SIDE = 1.75  # working region side, in crop sides (crop side = 2 x landmark box)
BORDER_STEPS = 6  # border anchor points per side of the working region
MOUTH_CAVITY_RGB = (45, 20, 22)


@dataclass(frozen=True)
class MotionRanges:
    """How far synthetic clips move a head away from its photo (uniform, +-)."""

    yaw_deg: float = 25.0  # turn; positive yaw turns the face towards the image left
    pitch_deg: float = 15.0  # nod up/down
    roll_deg: float = 12.0  # tilt in the image plane
    scale: float = 0.08  # relative head size change in the frame
    shift: float = 0.06  # head shift, in crop sides (the background moves in the crop)
    mouth: float = 0.10  # extra mouth opening, in face heights (forehead to chin)
    blink_probability: float = 0.3  # chance that a clip contains one blink
    keyframes: int = 3  # random poses a clip passes through, smoothly interpolated


@dataclass(frozen=True)
class HeadMotion:
    """One frame's deformation of the photo's head. Angles in radians."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0  # in crop sides
    shift_y: float = 0.0
    mouth: float = 0.0  # change of the inner-lip gap, in face heights (may be negative)
    blink: float = 0.0  # 0 = eyes as in the photo, 1 = closed

    def to_dict(self) -> dict[str, float]:
        return {key: round(float(value), 5) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class SyntheticFrame:
    """A warped frame, cropped as DESIGN's crop rule says around its own landmarks."""

    image: np.ndarray  # [S, S, 3] uint8 RGB
    mask: np.ndarray  # [S, S] float32 in [0, 1]
    pose: np.ndarray  # [136] float32 in [-1, 1]
    points: np.ndarray  # [68, 2] float32, landmarks in pixels of the crop
    motion: HeadMotion = field(default_factory=HeadMotion)


class MeshDetector:
    """mediapipe face mesh with its depth: photo -> [468, 3] pixel points of the largest
    face (z in the same pixel scale as x; smaller z is nearer the camera)."""

    def __init__(self, min_detection_confidence: float = 0.5) -> None:
        import mediapipe as mp

        self._lock = threading.Lock()
        self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=5,
            min_detection_confidence=min_detection_confidence,
        )

    def detect(self, image_rgb: np.ndarray) -> np.ndarray:
        if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise PoseError(
                "bad_image",
                f"expected a uint8 [H, W, 3] RGB image, got {image_rgb.dtype} {image_rgb.shape}",
            )
        height, width = image_rgb.shape[:2]
        with self._lock:
            result = self._mesh.process(np.ascontiguousarray(image_rgb))
        faces = result.multi_face_landmarks or []
        if not faces:
            raise PoseError("no_face", "no face was found in the photo")
        meshes = [
            np.array([(p.x * width, p.y * height, p.z * width) for p in face.landmark])
            for face in faces
        ]
        areas = [np.ptp(m[:, 0]) * np.ptp(m[:, 1]) for m in meshes]
        return meshes[int(np.argmax(areas))][:NUM_MESH_POINTS].astype(np.float64)  # [468, 3]

    def close(self) -> None:
        with self._lock:
            self._mesh.close()

    def __enter__(self) -> MeshDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _triangle_affines(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Affine maps of triangles target [F, 3, 2] -> source [F, 3, 2], as [F + 1, 3, 2]
    matrices applied as [x, y, 1] @ m; degenerate triangles and the appended last entry
    get the identity."""
    ones = np.ones(target.shape[:2] + (1,))
    rows = np.concatenate([target, ones], axis=2)  # [F, 3, 3]
    r0, r1, r2 = rows[:, 0], rows[:, 1], rows[:, 2]
    det = np.einsum("fi,fi->f", r0, np.cross(r1, r2))  # [F]
    usable = np.abs(det) > 1e-9
    inverse = np.stack([np.cross(r1, r2), np.cross(r2, r0), np.cross(r0, r1)], axis=2)
    inverse /= np.where(usable, det, 1.0)[:, None, None]  # [F, 3, 3]
    affine = inverse @ source  # [F, 3, 2]
    identity = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    affine[~usable] = identity
    return np.concatenate([affine, identity[None]], axis=0)  # [F + 1, 3, 2]


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """3x3 rotation in image axes (x right, y down, z away from the camera)."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    about_z = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return about_z @ about_x @ about_y


class PortraitRig:
    """A photo's face mesh, working image and triangulation, ready to render motions.

    `mesh` is the photo's [468, 3] face mesh in photo pixels (MeshDetector.detect) and
    `segment` a function image -> person probability [H, W] (PosePipeline.segment); when
    None the mask is all ones.
    """

    def __init__(
        self,
        photo: np.ndarray,
        mesh: np.ndarray,
        image_size: int,
        segment: Any = None,
    ) -> None:
        if mesh.shape != (NUM_MESH_POINTS, 3):
            raise ValueError(f"expected a face mesh [468, 3], got {mesh.shape}")
        self.image_size = image_size

        # working region around the face, resampled so that a crop side is ~image_size
        crop = crop_box(mesh_to_ibug68(mesh[:, :2]).astype(np.float32))
        work_side = crop.side * WORK_SIDE
        self.work_px = int(math.ceil(image_size * WORK_SIDE))
        work_box = CropBox(cx=crop.cx, cy=crop.cy, side=work_side)
        self.work_image = crop_image(photo, work_box, self.work_px)  # [W, W, 3]
        px_scale = self.work_px / work_side
        origin = np.array([work_box.x0, work_box.y0, 0.0])
        self.mesh = (mesh - origin) * px_scale  # [468, 3] working pixels

        # person mask of the working image, warped along with the photo
        if segment is None:
            self.work_mask = np.ones((self.work_px, self.work_px), np.float32)
        else:
            self.work_mask = np.asarray(segment(self.work_image), np.float32)

        # face frame: head centre, face height, down and right unit vectors
        oval = self.mesh[list(FACE_OVAL), :2]
        self.centre = np.array([*oval.mean(axis=0), 0.0])  # [3]
        down = self.mesh[CHIN, :2] - self.mesh[FOREHEAD, :2]
        self.face_height = float(np.linalg.norm(down))
        self.down = down / max(self.face_height, 1e-6)
        self.right = np.array([-self.down[1], self.down[0]])
        self.crop_side = crop.side * px_scale
        gap = self.mesh[LOWER_INNER_LIP_CENTRE, :2] - self.mesh[UPPER_INNER_LIP_CENTRE, :2]
        self.mouth_gap = max(float(gap @ self.down), 0.0) / max(self.face_height, 1e-6)

        self._mouth_weights = self._make_mouth_weights()
        self.ring = np.concatenate(
            [self.centre[:2] + (oval - self.centre[:2]) * RING_SCALE, np.zeros((len(oval), 1))],
            axis=1,
        )  # [36, 3]
        steps = np.linspace(0.0, self.work_px, BORDER_STEPS + 1)[:-1]
        end = float(self.work_px)
        border = [(s, 0.0) for s in steps] + [(end, s) for s in steps]
        border += [(end - s, end) for s in steps] + [(0.0, end - s) for s in steps]
        self.border = np.array(border)  # [4 * steps, 2]

        # one triangulation for every frame, made on the photo's points
        self.source_points = np.concatenate(
            [self.mesh[:, :2], self.ring[:, :2], self.border], axis=0
        )  # [P, 2]
        self.triangles = Delaunay(self.source_points).simplices.astype(np.int64)  # [F, 3]
        self._face_triangle = (self.triangles < NUM_MESH_POINTS).all(axis=1)  # [F]

    @classmethod
    def from_photo(
        cls,
        photo: np.ndarray,
        image_size: int,
        detector: MeshDetector,
        segment: Any = None,
    ) -> PortraitRig:
        return cls(photo, detector.detect(photo), image_size, segment)

    def _make_mouth_weights(self) -> np.ndarray:
        """How much each mesh point follows the jaw when the mouth opens, in [0, 1]."""
        rel = self.mesh[:, :2] - self.mesh[UPPER_INNER_LIP_CENTRE, :2]
        along = rel @ self.down  # below the mouth line: > 0
        across = rel @ self.right
        half_width = 0.5 * float(np.ptp(self.mesh[list(FACE_OVAL), :2] @ self.right))
        lip_depth = max(float(along[17]), 1e-6)  # bottom of the lower lip

        # the jaw drops fully below the lower lip, fading out towards the ears; the
        # lower lip moves as a whole, the mouth corners a little
        lateral = np.clip(1.0 - (across / max(half_width, 1e-6)) ** 2, 0.0, 1.0)
        weights = np.clip(along / lip_depth, 0.0, 1.0) * lateral
        weights[list(LOWER_LIP)] = lateral[list(LOWER_LIP)]
        weights[list(MOUTH_CORNERS)] = 0.3 * lateral[list(MOUTH_CORNERS)]
        return weights  # [468]

    def moved_mesh(self, motion: HeadMotion) -> np.ndarray:
        """The face mesh after `motion`, [468, 3] in working pixels."""
        mesh = self.mesh.copy()

        # mouth: lower lip and jaw move along the face's down direction
        mouth = max(motion.mouth, -self.mouth_gap)
        drop = mouth * self.face_height * self._mouth_weights  # [468]
        mesh[:, :2] += drop[:, None] * self.down[None, :]

        # blink: upper lids move onto the lower lids, the crease follows part way
        if motion.blink > 0:
            for upper, lower, crease in (
                (RIGHT_UPPER_LID, RIGHT_LOWER_LID, RIGHT_CREASE),
                (LEFT_UPPER_LID, LEFT_LOWER_LID, LEFT_CREASE),
            ):
                delta = (mesh[list(lower), :2] - mesh[list(upper), :2]) * motion.blink
                mesh[list(upper), :2] += delta
                mesh[list(crease), :2] += 0.4 * delta
        return self._rigid(mesh, motion)

    def _rigid(self, points: np.ndarray, motion: HeadMotion) -> np.ndarray:
        """Rotate about the head centre, scale, shift; points [N, 3] -> [N, 3]."""
        rotation = _rotation(motion.yaw, motion.pitch, motion.roll)
        moved = (points - self.centre) @ rotation.T * motion.scale + self.centre
        moved[:, 0] += motion.shift_x * self.crop_side
        moved[:, 1] += motion.shift_y * self.crop_side
        return moved

    def render(self, motion: HeadMotion) -> SyntheticFrame:
        """Warp the photo to `motion` and crop it around the moved landmarks."""
        size = self.image_size
        mesh = self.moved_mesh(motion)  # [468, 3]
        ring = self._rigid(self.ring, motion)  # [36, 3]
        target = np.concatenate([mesh[:, :2], ring[:, :2], self.border], axis=0)  # [P, 2]

        # crop of the moved face, as for a real video frame
        points68 = mesh_to_ibug68(mesh[:, :2]).astype(np.float32)  # [68, 2]
        box = crop_box(points68)
        pose = normalise_points(points68, box)  # [136]
        to_crop = size / box.side
        origin = np.array([box.x0, box.y0])

        # triangle-id image, far triangles first; head-ring and border triangles lie behind
        depth = np.full(len(self.triangles), np.inf)
        depth[self._face_triangle] = mesh[self.triangles[self._face_triangle], 2].mean(axis=1)
        order = np.argsort(-depth, kind="stable")
        corners = (target[self.triangles] - origin) * to_crop  # [F, 3, 2] crop pixels
        fixed = np.round((corners - 0.5) * 16).astype(np.int32)  # 4 sub-pixel bits
        ids = np.full((size, size), -1, np.int32)
        for index, triangle in zip(order.tolist(), fixed[order], strict=True):
            cv2.fillConvexPoly(ids, triangle, index, lineType=cv2.LINE_8, shift=4)

        # affine map of each triangle: target working pixels -> photo working pixels,
        # [x, y, 1] @ affine; the extra last map (identity) serves uncovered pixels
        affine = _triangle_affines(target[self.triangles], self.source_points[self.triangles])
        ids[ids < 0] = len(affine) - 1

        # output pixel centres in working pixels, then through their triangle's map
        centres = origin[None, :] + (np.arange(size)[:, None] + 0.5) / to_crop  # [S, 2]
        maps = affine[ids]  # [S, S, 3, 2]
        grid_x = centres[None, :, 0, None]  # [1, S, 1]
        grid_y = centres[:, None, 1, None]  # [S, 1, 1]
        warp = grid_x * maps[:, :, 0] + grid_y * maps[:, :, 1] + maps[:, :, 2]  # [S, S, 2]
        warp = (warp - 0.5).astype(np.float32)  # cv2 indexes pixels by their centres
        map_x, map_y = warp[..., 0], warp[..., 1]
        image = cv2.remap(
            self.work_image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )  # [S, S, 3]
        mask = cv2.remap(
            self.work_mask, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )  # [S, S]

        # a mouth opened wider than in the photo shows a dark cavity, not stretched lips
        if motion.mouth > 0.005:
            loop = (mesh[list(INNER_LIP_LOOP), :2] - origin) * to_crop
            cavity = np.zeros((size, size), np.uint8)
            cv2.fillPoly(cavity, [np.round((loop - 0.5) * 16).astype(np.int32)], (255,), shift=4)
            alpha = cv2.GaussianBlur(cavity, (3, 3), 0).astype(np.float32)[..., None] / 255
            strength = min(1.0, motion.mouth / 0.03) * 0.85
            dark = np.array(MOUTH_CAVITY_RGB, np.float32)
            image = (image * (1 - alpha * strength) + dark * alpha * strength).astype(np.uint8)

        points = ((points68 - origin) * to_crop).astype(np.float32)  # [68, 2]
        return SyntheticFrame(
            image=image, mask=np.clip(mask, 0, 1), pose=pose, points=points, motion=motion
        )


def sample_clip_motions(
    rng: np.random.Generator, frames: int, ranges: MotionRanges, mouth_gap: float = 0.0
) -> list[HeadMotion]:
    """A smooth random head trajectory of `frames` motions.

    The clip passes through `ranges.keyframes` random poses spread evenly in time, with
    smooth (cosine) interpolation in between; one blink happens with the given chance.
    `mouth_gap` is the photo's own inner-lip gap, so the mouth can close at most that much.
    """
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")
    count = max(ranges.keyframes, 1)
    rad = math.pi / 180
    keys = np.stack(
        [
            rng.uniform(-ranges.yaw_deg, ranges.yaw_deg, count) * rad,
            rng.uniform(-ranges.pitch_deg, ranges.pitch_deg, count) * rad,
            rng.uniform(-ranges.roll_deg, ranges.roll_deg, count) * rad,
            1.0 + rng.uniform(-ranges.scale, ranges.scale, count),
            rng.uniform(-ranges.shift, ranges.shift, count),
            rng.uniform(-ranges.shift, ranges.shift, count),
            rng.uniform(-min(mouth_gap, ranges.mouth), ranges.mouth, count),
        ],
        axis=1,
    )  # [K, 7]

    # cosine interpolation between keyframes placed evenly over the clip
    if count == 1 or frames == 1:
        values = np.repeat(keys[:1], frames, axis=0)
    else:
        position = np.linspace(0.0, count - 1, frames)
        left = np.minimum(position.astype(int), count - 2)
        t = position - left
        t = (1 - np.cos(t * math.pi)) / 2
        values = keys[left] * (1 - t[:, None]) + keys[left + 1] * t[:, None]  # [M, 7]

    # one blink: eyes close and open again over about four frames
    blink = np.zeros(frames)
    if frames >= 3 and rng.random() < ranges.blink_probability:
        middle = rng.uniform(1, frames - 2)
        blink = np.clip(1.0 - np.abs(np.arange(frames) - middle) / 2.0, 0.0, 1.0)
    return [
        HeadMotion(
            yaw=float(v[0]), pitch=float(v[1]), roll=float(v[2]), scale=float(v[3]),
            shift_x=float(v[4]), shift_y=float(v[5]), mouth=float(v[6]), blink=float(b),
        )
        for v, b in zip(values, blink, strict=True)
    ]
