"""Each dataset reader on a small fixture in the dataset's real layout."""

import numpy as np
import pandas as pd
import pytest
from conftest import face_like, jpeg_bytes, png_bytes

from synfer_pipeline.curation.readers import SourceError, read_source


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _reasons(listing):
    return sorted((r.uri.rsplit("/", 1)[-1], r.reason) for r in listing.rejects)


@pytest.fixture
def rafdb(tmp_path):
    root = tmp_path / "rafdb"
    for i, name in enumerate(["train_00001", "train_00002", "train_00003", "test_0001", "test_0002"]):
        _write(root / "Image" / "aligned" / f"{name}_aligned.jpg", jpeg_bytes(face_like(100, i)))
    _write(root / "Image" / "aligned" / "train_00099_aligned.jpg", jpeg_bytes(face_like(100, 99)))  # no label row
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel" / "list_patition_label.txt").write_text(
        "train_00001.jpg 4\ntrain_00002.jpg 7\ntrain_00003.jpg 9\ntest_0001.jpg 1\ntest_0002.jpg 6\ntest_0003.jpg 2\n")
    return root


def test_rafdb_maps_codes_and_splits(rafdb):
    listing = read_source("rafdb", str(rafdb), "rafdb")
    got = {r.sample_id: (r.split, r.label) for r in listing.records}
    assert got == {
        "rafdb-train_00001": ("train", "happy"),
        "rafdb-train_00002": ("train", "neutral"),
        "rafdb-test_0001": ("test", "surprise"),
        "rafdb-test_0002": ("test", "anger"),
    }
    assert _reasons(listing) == [
        ("test_0003_aligned.jpg", "missing_file"),       # label row without a file
        ("train_00003_aligned.jpg", "unknown_label"),    # code 9 is outside 1..7
        ("train_00099_aligned.jpg", "unlabelled_file"),  # file without a label row
    ]


def test_affectnet_uses_boxes_and_drops_non_expression_codes(tmp_path):
    root = tmp_path / "affectnet"
    for i in range(5):
        _write(root / "Manually_Annotated_Images" / "101" / f"img{i}.jpg", jpeg_bytes(face_like(120, i)))
    rows = [("101/img0.jpg", 10, 12, 80, 90, 1), ("101/img1.jpg", 0, 0, 120, 120, 7), ("101/img2.jpg", 0, 0, 120, 120, 9),
            ("101/img3.jpg", 0, 0, 120, 120, 13), ("101/missing.jpg", 0, 0, 50, 50, 2)]
    df = pd.DataFrame(rows, columns=["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression"])
    df.to_csv(root / "training.csv", index=False)
    df.iloc[:0].to_csv(root / "validation.csv", index=False)
    listing = read_source("affectnet", str(root), "affectnet")
    got = {r.uri.rsplit("/", 1)[-1]: (r.label, r.box, r.split) for r in listing.records}
    assert got == {"img0.jpg": ("happy", (10.0, 12.0, 80.0, 90.0), "train"), "img1.jpg": ("contempt", (0.0, 0.0, 120.0, 120.0), "train")}
    assert _reasons(listing) == [("img2.jpg", "excluded_label"), ("img3.jpg", "unknown_label"),
                                 ("img4.jpg", "unlabelled_file"), ("missing.jpg", "missing_file")]


def test_affectnet_csv_without_a_needed_column_names_file_and_column(tmp_path):
    root = tmp_path / "affectnet"
    _write(root / "Manually_Annotated_Images" / "1" / "a.jpg", jpeg_bytes(face_like(64)))
    pd.DataFrame({"subDirectory_filePath": ["1/a.jpg"], "face_x": [0], "face_y": [0], "face_width": [64],
                  "face_height": [64]}).to_csv(root / "training.csv", index=False)
    with pytest.raises(SourceError, match=r"training\.csv lacks column\(s\) expression"):
        read_source("affectnet", str(root), "affectnet")


def test_fer2013_pixels_usage_and_bad_rows(tmp_path):
    rng = np.random.default_rng(0)
    pix = lambda: " ".join(map(str, rng.integers(0, 256, 48 * 48)))  # noqa: E731
    df = pd.DataFrame({"emotion": [3, 0, 6, 8, 2], "pixels": [pix(), pix(), pix(), pix(), "1 2 3"],
                       "Usage": ["Training", "PublicTest", "PrivateTest", "Training", "Training"]})
    df.to_csv(tmp_path / "fer2013.csv", index=False)
    listing = read_source("fer2013", str(tmp_path / "fer2013.csv"), "fer2013")
    assert [(r.label, r.split, r.pixels.shape) for r in listing.records] == [
        ("happy", "train", (48, 48)), ("anger", "val", (48, 48)), ("neutral", "test", (48, 48))]
    assert sorted((r.uri.rsplit("#", 1)[1], r.reason) for r in listing.rejects) == [("row=3", "unknown_label"), ("row=4", "corrupt")]


def test_fer2013_with_ferplus_majority_votes(tmp_path):
    pix = " ".join(["128"] * 2304)
    pd.DataFrame({"emotion": [0, 0, 0], "pixels": [pix] * 3, "Usage": ["Training"] * 3}).to_csv(tmp_path / "fer2013.csv", index=False)
    votes = pd.DataFrame([[0, 8, 1, 0, 0, 0, 0, 0, 1, 0], [5, 0, 0, 0, 5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]],
                         columns=["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"])
    votes.insert(0, "Usage", "Training")
    votes.to_csv(tmp_path / "fer2013new.csv", index=False)
    listing = read_source("fer2013", str(tmp_path), "ferplus", {"ferplus_csv": str(tmp_path / "fer2013new.csv")})
    assert [r.label for r in listing.records] == ["happy"]  # a tie and a not-a-face row have no label
    assert [r.reason for r in listing.rejects] == ["unknown_label", "unknown_label"]


def test_class_folders_with_split_folders_and_unknown_class(tmp_path):
    root = tmp_path / "sfew"
    _write(root / "Train" / "Happy" / "a.png", png_bytes(face_like(64, 1)))
    _write(root / "Train" / "Angry" / "b.png", png_bytes(face_like(64, 2)))
    _write(root / "Val" / "Sad" / "c.jpg", jpeg_bytes(face_like(64, 3)))
    _write(root / "Val" / "Bored" / "d.jpg", jpeg_bytes(face_like(64, 4)))
    _write(root / "Val" / "Sad" / "notes.txt", b"sidecar")
    listing = read_source("folder", str(root), "sfew")
    assert sorted((r.split, r.label, r.sample_id) for r in listing.records) == [
        ("train", "anger", "sfew-Train_Angry_b_png"), ("train", "happy", "sfew-Train_Happy_a_png"), ("val", "sad", "sfew-Val_Sad_c_jpg")]
    assert _reasons(listing) == [("d.jpg", "unknown_label")]
    assert listing.ignored == 1


def test_unlabelled_folder_lists_images_recursively_and_skips_sidecars(tmp_path):
    root = tmp_path / "ffhq"
    _write(root / "00000" / "00000.png", png_bytes(face_like(64, 0)))
    _write(root / "00000" / "00001.png", png_bytes(face_like(64, 1)))
    _write(root / "01000" / "01000.png", png_bytes(face_like(64, 2)))
    _write(root / "LICENSE.txt", b"license")
    _write(root / ".DS_Store", b"junk")
    listing = read_source("unlabelled", str(root), "ffhq")
    assert [(r.sample_id, r.label) for r in listing.records] == [
        ("ffhq-00000_00000_png", None), ("ffhq-00000_00001_png", None), ("ffhq-01000_01000_png", None)]
    assert listing.ignored == 2 and not listing.rejects


def test_missing_or_empty_source_fails_naming_the_path(tmp_path):
    with pytest.raises(SourceError, match=f"{tmp_path}/nowhere does not exist"):
        read_source("unlabelled", str(tmp_path / "nowhere"), "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=f"{tmp_path}/empty holds no images"):
        read_source("folder", str(tmp_path / "empty"), "x")
    with pytest.raises(SourceError, match="list_patition_label.txt is missing"):
        read_source("rafdb", str(tmp_path / "empty"), "x")
