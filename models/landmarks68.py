"""The 68-point iBUG 300-W scheme and its table into mediapipe's 468-point face mesh.

No PyTorch here: the serving install imports this module.

"Right" and "left" are the subject's, as in iBUG 300-W. In an unmirrored frontal photo the
subject's right side is on the image's left, so the jaw starts (point 0) on the image's
left and the right eye (36-41) has smaller x than the left eye (42-47). mediapipe names
its sides the same way (its point 33 is the subject's right outer eye corner).

There is no official mediapipe -> iBUG table. The choices below follow two rules, checked
on a frontal photo: anatomical end points where iBUG defines one (eye and mouth corners,
chin, nose tip, brow ends), and in between the mesh points whose arc length along the
part's contour is closest to an even spacing, as iBUG annotators space their points.
The table is mirror-symmetric: the mesh point chosen for a right-side landmark is the
mesh's mirror partner of the one chosen for the matching left-side landmark.
docs/pose.md explains the jaw line in detail.
"""

from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68
NUM_MESH_POINTS = 468

# Jaw, 0-16: from the subject's right (image left) at the height of the outer eye corner,
# down to the chin (8, mesh 152) and up the other side. Mesh 127 / 356 sit on the face
# outline at eye-corner height, where iBUG puts points 0 / 16; 93, 150 and 176 (and their
# mirrors) are skipped so that the eight steps on each side are about equal in length.
JAW = (127, 234, 132, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 361, 454, 356)

# Right eyebrow, 17-21: upper edge of the brow, outer end to inner end.
RIGHT_BROW = (70, 63, 105, 66, 107)

# Left eyebrow, 22-26: upper edge of the brow, inner end to outer end.
LEFT_BROW = (336, 296, 334, 293, 300)

# Nose bridge, 27-30: from between the eyes (168) down the ridge to the tip. Mesh 4 is
# used as the tip rather than mesh 1, which lies almost on the subnasal point in 2D.
NOSE_BRIDGE = (168, 197, 5, 4)

# Lower nose, 31-35: right alar base, along the nostrils' lower edge through the subnasal
# point (33, mesh 2) to the left alar base.
LOWER_NOSE = (98, 97, 2, 326, 327)

# Right eye, 36-41: outer corner, upper lid (outer, inner), inner corner, lower lid
# (inner, outer).
RIGHT_EYE = (33, 160, 158, 133, 153, 144)

# Left eye, 42-47: inner corner, upper lid (inner, outer), outer corner, lower lid
# (outer, inner).
LEFT_EYE = (362, 385, 387, 263, 373, 380)

# Outer lip, 48-59: right mouth corner, upper lip to the top centre (51, mesh 0), left
# corner (54), then the lower lip back through the bottom centre (57, mesh 17).
OUTER_LIP = (61, 39, 37, 0, 267, 269, 291, 321, 314, 17, 84, 91)

# Inner lip, 60-67: right inner corner, upper inner edge through its centre (62, mesh
# 13), left inner corner (64), lower inner edge back through its centre (66, mesh 14).
INNER_LIP = (78, 81, 13, 311, 308, 402, 14, 178)

# name -> (first iBUG index, mesh indices, drawn as a closed loop)
PARTS: dict[str, tuple[int, tuple[int, ...], bool]] = {
    "jaw": (0, JAW, False),
    "right_brow": (17, RIGHT_BROW, False),
    "left_brow": (22, LEFT_BROW, False),
    "nose_bridge": (27, NOSE_BRIDGE, False),
    "lower_nose": (31, LOWER_NOSE, False),
    "right_eye": (36, RIGHT_EYE, True),
    "left_eye": (42, LEFT_EYE, True),
    "outer_lip": (48, OUTER_LIP, True),
    "inner_lip": (60, INNER_LIP, True),
}

# iBUG index -> mediapipe face-mesh index, 68 entries.
MESH_TO_IBUG68 = np.concatenate([np.array(idx, dtype=np.int64) for _, idx, _ in PARTS.values()])

# iBUG index -> index of the same landmark on the other side of the face. Flipping an
# image horizontally maps landmark i to landmark IBUG68_MIRROR[i] (x -> width - x).
IBUG68_MIRROR = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # lower nose
    + [45, 44, 43, 42, 47, 46]  # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]  # left eye <- right eye
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lip
    + [64, 63, 62, 61, 60, 67, 66, 65],  # inner lip
    dtype=np.int64,
)


def part_slices() -> dict[str, slice]:
    """Return each part's slice into the 68 points, in drawing order."""
    return {name: slice(start, start + len(idx)) for name, (start, idx, _) in PARTS.items()}


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """Select the 68 iBUG landmarks from mediapipe face-mesh points [N >= 468, D]."""
    if mesh.ndim != 2 or mesh.shape[0] < NUM_MESH_POINTS:
        raise ValueError(
            f"expected face-mesh points of shape [>={NUM_MESH_POINTS}, D], got {mesh.shape}"
        )
    return mesh[MESH_TO_IBUG68]  # [68, D]
