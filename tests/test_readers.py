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
    assert sorted((r.uri.rsplit("#", 1)[1], r.reason) for r in listing.rejects) == [("row=3", "unknown_label"), ("row=4", "bad_pixels")]


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


def test_fer2013_bad_pixel_strings_are_rejected_exactly_and_the_rest_goes_on(tmp_path):
    good = " ".join(["7"] * 2304)
    rows = {
        "ok": (3, good, "Training"),
        "letter": (3, " ".join(["7"] * 17 + ["abc"] + ["7"] * 2286), "Training"),
        "short": (3, " ".join(["7"] * 2303), "Training"),
        "high": (3, " ".join(["7"] * 5 + ["300"] + ["7"] * 2298), "Training"),
        "negative": (3, " ".join(["-4"] + ["7"] * 2303), "Training"),
        "no_emotion": ("", good, "Training"),
        "no_pixels": (3, "", "PublicTest"),
        "usage": (3, good, "Trainnig"),
        "float_label": ("2.5", good, "Training"),
    }
    pd.DataFrame(list(rows.values()), columns=["emotion", "pixels", "Usage"]).to_csv(tmp_path / "f.csv", index=False)
    listing = read_source("fer2013", str(tmp_path / "f.csv"), "fer2013")
    assert len(listing.records) == 1
    got = {int(r.uri.rsplit("=", 1)[1]): (r.reason, r.detail.split(": ", 1)[1]) for r in listing.rejects}
    assert got == {
        1: ("bad_pixels", "pixel 17 is 'abc', not a number"),
        2: ("bad_pixels", "2303 pixel values, expected 2304"),
        3: ("bad_pixels", "pixel 5 is 300, outside 0..255"),
        4: ("bad_pixels", "pixel 0 is -4, outside 0..255"),
        5: ("missing_field", "emotion empty"),
        6: ("missing_field", "pixels empty"),
        7: ("bad_field", "Usage 'Trainnig' is not one of Training, PublicTest, PrivateTest"),
        8: ("unknown_label", "emotion '2.5' not in 0..6"),
    }
    assert all(f"{tmp_path}/f.csv row" in r.detail for r in listing.rejects)  # the file and row are named


def test_affectnet_rows_with_missing_or_bad_fields_and_repeated_rows(tmp_path):
    root = tmp_path / "affectnet"
    for i in range(4):
        _write(root / "Manually_Annotated_Images" / "1" / f"img{i}.jpg", jpeg_bytes(face_like(120, i)))
    rows = [("1/img0.jpg", "10", "12", "80", "90", "1"), ("1/img0.jpg", "10", "12", "80", "90", "2"),  # repeated
            ("1/img1.jpg", "", "0", "100", "100", "3"), ("1/img2.jpg", "0", "0", "wide", "100", "4"),
            ("1/img3.jpg", "0", "0", "0", "100", "5")]
    pd.DataFrame(rows, columns=["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                                "expression"]).to_csv(root / "training.csv", index=False)
    listing = read_source("affectnet", str(root), "affectnet")
    assert [(r.sample_id, r.label) for r in listing.records] == [("affectnet-1_img0_jpg", "happy")]
    got = [(r.reason, r.detail.split(": ", 1)[-1]) for r in listing.rejects]
    assert got == [("duplicate_row", f"{root}/training.csv line 3 names 1/img0.jpg again"),
                   ("missing_field", "face_x empty"), ("bad_field", "face_width 'wide' is not a number"),
                   ("bad_box", "face box (0.0, 0.0, 0.0, 100.0) has no area")]


def test_rafdb_repeated_row_is_a_duplicate_row(rafdb):
    label_file = rafdb / "EmoLabel" / "list_patition_label.txt"
    label_file.write_text(label_file.read_text() + "train_00001.jpg 5\n")
    listing = read_source("rafdb", str(rafdb), "rafdb")
    assert [r.sample_id for r in listing.records].count("rafdb-train_00001") == 1
    assert ("train_00001_aligned.jpg", "duplicate_row") in _reasons(listing)
    assert next(r.label for r in listing.records if r.sample_id == "rafdb-train_00001") == "happy"  # the first row


def test_label_files_without_images_or_empty_fail_naming_the_path(rafdb, tmp_path):
    import shutil

    label_file = rafdb / "EmoLabel" / "list_patition_label.txt"
    label_file.write_text("\n\n")
    with pytest.raises(SourceError, match=f"RAF-DB label file {label_file} is empty"):
        read_source("rafdb", str(rafdb), "rafdb")
    shutil.rmtree(rafdb / "Image")
    with pytest.raises(SourceError, match=f"has no image folder: {rafdb}/Image/aligned does not exist"):
        read_source("rafdb", str(rafdb), "rafdb")
    affectnet = tmp_path / "affectnet"
    affectnet.mkdir()
    (affectnet / "training.csv").write_text("subDirectory_filePath,face_x,face_y,face_width,face_height,expression\n")
    with pytest.raises(SourceError, match=f"{affectnet}/training.csv has no image folder"):
        read_source("affectnet", str(affectnet), "affectnet")
    (affectnet / "Manually_Annotated_Images").mkdir()
    (affectnet / "training.csv").write_text("")
    with pytest.raises(SourceError, match=f"label file {affectnet}/training.csv is empty"):
        read_source("affectnet", str(affectnet), "affectnet")
    fer = tmp_path / "fer.csv"
    fer.write_text("   \n")
    with pytest.raises(SourceError, match=f"label file {fer} is empty"):
        read_source("fer2013", str(fer), "fer2013")
