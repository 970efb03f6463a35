"""Face detection and face crops.

The detector is a replaceable component: anything with `detect(rgb: np.ndarray) -> list[Box]` will do. Three ship:
BlazeFace (a CNN with eye, nose, mouth and ear keypoints, in `blazeface.py`; the eyes level the face), OpenCV's
Haar cascades (eye cascades level the face) and scikit-image's LBP cascade. Sources that are already aligned
(RAF-DB aligned, FFHQ, CelebA-HQ, FER2013) skip detection and are centre-cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Box:
    """A face box in pixels of the image it was found in; `roll` is the in-plane tilt in degrees (0 if unknown).

    `landmarks` are (x, y) points in the same pixels, in the detector's order (BlazeFace: `blazeface.KEYPOINTS`),
    or None when the detector gives none.
    """

    x: float
    y: float
    w: float
    h: float
    score: float = 1.0
    roll: float = 0.0
    landmarks: tuple[tuple[float, float], ...] | None = None

    def scaled(self, s: float) -> Box:
        points = None if self.landmarks is None else tuple((x * s, y * s) for x, y in self.landmarks)
        return Box(self.x * s, self.y * s, self.w * s, self.h * s, self.score, self.roll, points)

    @property
    def area(self) -> float:
        return self.w * self.h


def inside_fraction(box: Box, size: tuple[int, int]) -> float:
    """Share of the box's area that lies inside an image of `size` (width, height); 0 for a box of no area."""
    w, h = size
    inter_w = max(0.0, min(box.x + box.w, w) - max(box.x, 0.0))
    inter_h = max(0.0, min(box.y + box.h, h) - max(box.y, 0.0))
    return inter_w * inter_h / box.area if box.area > 0 else 0.0


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an HxWx3 uint8 RGB array, largest first."""


def detect_batch(detector: FaceDetector, images: list[np.ndarray]) -> list[list[Box]]:
    """`detector.detect` over several images: in one call where the detector batches (`detect_batch`), else one by one."""
    batched = getattr(detector, "detect_batch", None)
    return batched(images) if batched is not None else [detector.detect(im) for im in images]


class HaarCascadeDetector:
    """OpenCV's frontal-face Haar cascade on a downscaled grey image, with eye cascades for the roll angle."""

    name = "opencv-haar"

    # Defaults trade recall on small faces for speed (Haar costs ~25 ms per image at 240 px on one core here).
    def __init__(self, detect_side: int = 240, scale_factor: float = 1.15, min_neighbors: int = 5,
                 min_face_frac: float = 0.12, level_eyes: bool = True):
        self.detect_side, self.scale_factor, self.min_neighbors = detect_side, scale_factor, min_neighbors
        self.min_face_frac, self.level_eyes = min_face_frac, level_eyes
        self._face = _cascade("haarcascade_frontalface_default.xml")
        self._eye = _cascade("haarcascade_eye.xml") if level_eyes else None

    def detect(self, rgb: np.ndarray) -> list[Box]:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.detect_side / max(grey.shape))
        small = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else grey
        small = cv2.equalizeHist(small)
        side = max(12, int(min(small.shape) * self.min_face_frac))
        found, _, weights = self._face.detectMultiScale3(
            small, self.scale_factor, self.min_neighbors, minSize=(side, side), outputRejectLevels=True)
        boxes = [Box(*map(float, f), score=float(w)).scaled(1 / scale) for f, w in zip(found, np.ravel(weights))]
        boxes = _main_face_first(boxes)
        if boxes and self._eye is not None:
            boxes[0] = Box(**{**boxes[0].__dict__, "roll": self._roll(grey, boxes[0])})
        return boxes

    def _roll(self, grey: np.ndarray, box: Box) -> float:
        """Tilt from the two eyes found in the upper half of the face; 0 when they are not both found."""
        x0, y0 = int(max(box.x, 0)), int(max(box.y, 0))
        upper = grey[y0:y0 + int(box.h * 0.55), x0:x0 + int(box.w)]
        if upper.size == 0:
            return 0.0
        side = max(8, int(box.w * 0.12))
        eyes = self._eye.detectMultiScale(upper, 1.1, 4, minSize=(side, side))
        if len(eyes) < 2:
            return 0.0
        eyes = sorted(eyes, key=lambda e: e[2] * e[3], reverse=True)[:2]
        (ax, ay), (bx, by) = sorted((e[0] + e[2] / 2, e[1] + e[3] / 2) for e in eyes)
        if bx - ax < box.w * 0.2:  # both hits on one eye
            return 0.0
        angle = math.degrees(math.atan2(by - ay, bx - ax))
        return angle if abs(angle) <= 25 else 0.0


class SkimageCascadeDetector:
    """scikit-image's LBP frontal-face cascade (a second, independent detector)."""

    name = "skimage-lbp"

    def __init__(self, detect_side: int = 320, min_face_frac: float = 0.1):
        from skimage import data
        from skimage.feature import Cascade

        self.detect_side, self.min_face_frac = detect_side, min_face_frac
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())

    def detect(self, rgb: np.ndarray) -> list[Box]:
        scale = min(1.0, self.detect_side / max(rgb.shape[:2]))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        side = max(12, int(min(small.shape[:2]) * self.min_face_frac))
        found = self._cascade.detect_multi_scale(small, scale_factor=1.2, step_ratio=1, min_size=(side, side),
                                                 max_size=small.shape[:2])
        boxes = [Box(d["c"], d["r"], d["width"], d["height"]).scaled(1 / scale) for d in found]
        return sorted(boxes, key=lambda b: b.area, reverse=True)


def _main_face_first(boxes: list[Box]) -> list[Box]:
    """Confident boxes (score at least half the best) largest first, then the doubtful ones.

    Largest-first alone lets a big false positive (a patterned patch) win over a confident real face.
    """
    if not boxes:
        return boxes
    best = max(b.score for b in boxes)
    confident = sorted((b for b in boxes if b.score >= best / 2), key=lambda b: b.area, reverse=True)
    doubtful = sorted((b for b in boxes if b.score < best / 2), key=lambda b: b.score, reverse=True)
    return confident + doubtful


def _blazeface(**options) -> FaceDetector:
    from synfer_pipeline.curation.blazeface import BlazeFaceDetector  # imports torch: only when chosen

    return BlazeFaceDetector(**options)


DETECTORS = {"blazeface": _blazeface, "opencv-haar": HaarCascadeDetector, "skimage-lbp": SkimageCascadeDetector}


def make_detector(name: str, **options) -> FaceDetector:
    """A detector by configured name, with that detector's constructor options.

    `blazeface`: weights (path, default the fetched fixture), variant (`short` or `full`), score_threshold (0.5),
    torch_threads (1). `opencv-haar`: detect_side, scale_factor, min_neighbors, min_face_frac, level_eyes.
    `skimage-lbp`: detect_side, min_face_frac.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name](**options)


def _cascade(filename: str) -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + filename
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV cascade {path} did not load (opencv-python-headless>=5 ships none: pin <5)")
    return cascade


def aligned_box(width: int, height: int, crop: tuple[float, float, float]) -> Box:
    """The face square of an aligned image: `crop` = (centre x, centre y, side), the centre in fractions of the
    width and height, the side in fractions of the shorter side (crop it with `crop_face(..., margin=0)`)."""
    fx, fy, fside = crop
    side = fside * min(width, height)
    return Box(fx * width - side / 2, fy * height - side / 2, side, side)


def crop_face(img: Image.Image | np.ndarray, box: Box | None, size: int, margin: float = 0.3) -> Image.Image:
    """A `size`x`size` RGB crop centred on `box` (widened by `margin` of its side, levelled by `box.roll`).

    With `box=None` (aligned sources) the centred square of the whole image is used. Parts of the square outside
    the image are filled by replicating the border, so faces near an edge keep their proportions.
    """
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if box is None:
        side = float(min(w, h))
        cx, cy, roll = w / 2, h / 2, 0.0
    else:
        side = max(box.w, box.h) * (1 + margin)
        cx, cy, roll = box.x + box.w / 2, box.y + box.h / 2, box.roll
    s = size / side
    if roll == 0.0 and s < 1:
        return Image.fromarray(_crop_then_resize(arr, cx, cy, side, size))
    # One affine warp does crop, rotation and resize together: dst = M @ src.
    m = cv2.getRotationMatrix2D((cx, cy), roll, s)
    m[0, 2] += size / 2 - cx
    m[1, 2] += size / 2 - cy
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return Image.fromarray(cv2.warpAffine(arr, m, (size, size), flags=interp, borderMode=cv2.BORDER_REPLICATE))


def _crop_then_resize(arr: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Axis-aligned crop + area downscale (cheaper and sharper than a warp when there is no rotation)."""
    h, w = arr.shape[:2]
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x1, y1 = x0 + int(round(side)), y0 + int(round(side))
    pad = [max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w)]
    if any(pad):
        arr = cv2.copyMakeBorder(arr, *pad, cv2.BORDER_REPLICATE)
        x0, x1, y0, y1 = x0 + pad[2], x1 + pad[2], y0 + pad[0], y1 + pad[0]
    return cv2.resize(arr[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
