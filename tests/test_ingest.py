"""raw-face ingest as a library: bad input is recorded and the rest goes on, duplicates are kept once,
versions follow content, published folders are never touched again, and a killed run resumes."""

import io
import os

import numpy as np
import pandas as pd
import pytest
from conftest import face_like, jpeg_bytes, png_bytes
from PIL import Image
from skimage import data

from synfer_pipeline.curation import ingest as ingest_mod
from synfer_pipeline.curation.ingest import IngestSettings, ingest, listing_fingerprint, reject_rate
from synfer_pipeline.curation.readers import read_source
from synfer_pipeline.io.shards import iter_samples
from synfer_pipeline.io.storage import Storage, stage_key


def _run(src, store, settings, fmt="folder", run_id="r1"):
    listing = read_source(fmt, str(src), "wild")
    writer = store.artifact("raw_faces", "wild", stage_key(listing_fingerprint(listing), settings))
    return ingest(listing, settings, writer, run_id)


@pytest.fixture
def wild_folder(tmp_path):
    """A folder-per-class source with every kind of input seen in the wild."""
    root = tmp_path / "wild"
    happy, sad = root / "happy", root / "sad"
    happy.mkdir(parents=True)
    sad.mkdir()
    cmyk = face_like(96, 2).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        happy / "ok.jpg": jpeg_bytes(face_like(96, 1)),
        happy / "grey.png": png_bytes(face_like(96, 3).convert("L")),
        happy / "cmyk.jpg": jpeg_bytes(cmyk),
        happy / "sixteen.png": png_bytes(Image.fromarray((np.asarray(face_like(96, 4).convert("L"), np.uint16) * 257))),
        happy / "palette.png": png_bytes(face_like(96, 5).convert("P")),
        happy / "alpha.png": png_bytes(face_like(96, 6).convert("RGBA")),
        happy / "rotated.jpg": jpeg_bytes(face_like(96, 7).resize((96, 72)), exif=exif.tobytes()),
        happy / "png_named.jpg": png_bytes(face_like(96, 8)),
        sad / "ok.jpg": jpeg_bytes(face_like(96, 9)),
        sad / "ok_again.jpg": jpeg_bytes(face_like(96, 9)),       # duplicate content
        sad / "truncated.jpg": jpeg_bytes(face_like(96, 10))[:300],
        sad / "empty.jpg": b"",
        sad / "text.jpg": b"not an image at all\n" * 20,
        sad / "tiny.png": png_bytes(face_like(16, 11)),
    }
    for path, payload in files.items():
        path.write_bytes(payload)
    (root / "bored").mkdir()
    (root / "bored" / "x.jpg").write_bytes(jpeg_bytes(face_like(96, 12)))  # label outside the label set
    return root


def test_wild_input_is_normalised_or_rejected_with_file_and_reason(wild_folder, tmp_path):
    store = Storage(str(tmp_path / "store"))
    result = _run(wild_folder, store, IngestSettings(face_size=64, aligned=True, min_side=32))
    accepted = {u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1] for u in result.manifest["uri"]}
    assert accepted == {"happy/ok.jpg", "happy/grey.png", "happy/cmyk.jpg", "happy/sixteen.png", "happy/palette.png",
                        "happy/alpha.png", "happy/rotated.jpg", "happy/png_named.jpg", "sad/ok.jpg"}
    rejects = {u.rsplit("/", 1)[-1]: r for u, r in zip(result.rejects["uri"], result.rejects["reason"])}
    assert rejects == {"truncated.jpg": "corrupt", "empty.jpg": "empty_file", "text.jpg": "not_an_image",
                       "tiny.png": "too_small", "x.jpg": "unknown_label"}
    assert result.rejects["detail"].str.len().min() > 0
    assert result.duplicates[["sample_id", "duplicate_of"]].values.tolist() == [["wild-sad_ok_again_jpg", "wild-sad_ok_jpg"]]
    assert reject_rate(len(result.manifest), len(result.duplicates), result.rejects) == pytest.approx(5 / 15)
    rotated = result.manifest.set_index("sample_id").loc["wild-happy_rotated_jpg"]
    assert (rotated.width, rotated.height) == (72, 96)  # EXIF orientation applied before cropping


def test_shards_hold_rgb_crops_with_labels_and_the_manifest_matches(wild_folder, tmp_path):
    store = Storage(str(tmp_path / "store"))
    result = _run(wild_folder, store, IngestSettings(face_size=64, aligned=True, shard_size=4))
    samples = dict(iter_samples(store, result.ref.uri, "faces"))
    assert len(samples) == 9 and result.ref.counts["shards"] == 3
    for key, members in samples.items():
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.size == (64, 64) and img.mode == "RGB"
        row = result.manifest.set_index("key").loc[key]
        assert int(members["cls"]) == row.label_index and row.label in ("happy", "sad")
    published = os.listdir(result.ref.uri)
    assert {"manifest.parquet", "rejects.parquet", "duplicates.parquet", "preview.png", "ref.json"} <= set(published)
    assert not [p for p in published if p.startswith("_progress") or ".tmp-" in p]


def test_unchanged_input_keeps_its_version_and_changed_input_adds_one(wild_folder, tmp_path):
    store = Storage(str(tmp_path / "store"))
    settings = IngestSettings(face_size=64, aligned=True)
    first = _run(wild_folder, store, settings, run_id="r1")
    first_files = {p: os.path.getmtime(os.path.join(first.ref.uri, p)) for p in os.listdir(first.ref.uri)}
    again = _run(wild_folder, store, settings, run_id="r2")
    assert again.ref.data_version == first.ref.data_version and again.ref.uri == first.ref.uri
    (wild_folder / "happy" / "ok.jpg").write_bytes(jpeg_bytes(face_like(96, 42)))  # one image changes
    changed = _run(wild_folder, store, settings, run_id="r3")
    assert changed.ref.data_version != first.ref.data_version
    assert {p: os.path.getmtime(os.path.join(first.ref.uri, p)) for p in os.listdir(first.ref.uri)} == first_files
    assert [r.data_version for r in store.published("raw_faces", "wild")] == sorted([first.ref.data_version, changed.ref.data_version])


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the pipeline may catch it."""


def test_a_killed_run_resumes_at_the_next_shard_with_the_same_result(wild_folder, tmp_path, monkeypatch):
    settings = IngestSettings(face_size=64, aligned=True, shard_size=2, batch=1)
    reference = _run(wild_folder, Storage(str(tmp_path / "uninterrupted")), settings)
    store = Storage(str(tmp_path / "store"))
    calls, kill = [], [True]
    real = ingest_mod._decoded

    def dies_after_seven(record, s, full):
        calls.append(record.sample_id)
        if kill[0] and len(calls) == 8:
            raise Killed()
        return real(record, s, full)

    monkeypatch.setattr(ingest_mod, "_decoded", dies_after_seven)
    with pytest.raises(Killed):
        _run(wild_folder, store, settings)
    assert not store.published("raw_faces", "wild")
    done_before_kill = len(calls) - 1
    calls.clear()
    kill[0] = False
    resumed = _run(wild_folder, store, settings)
    assert resumed.ref.data_version == reference.ref.data_version
    # 15 records; shards of 2 close at records 2, 4, 6 (rejects and duplicates in between): only what followed
    # the last finished shard runs again.
    assert calls[0] != "wild-bored_x_jpg" and len(calls) <= 15 - done_before_kill + 2
    pd.testing.assert_frame_equal(resumed.manifest, reference.manifest)
    pd.testing.assert_frame_equal(resumed.rejects, reference.rejects)


def test_workers_give_the_same_result_as_one_process(wild_folder, tmp_path):
    one = _run(wild_folder, Storage(str(tmp_path / "a")), IngestSettings(face_size=64, aligned=True, workers=1))
    two = _run(wild_folder, Storage(str(tmp_path / "b")), IngestSettings(face_size=64, aligned=True, workers=2))
    assert one.ref.data_version == two.ref.data_version


def test_unaligned_photos_are_detected_and_a_photo_without_a_face_is_rejected(tmp_path):
    src = tmp_path / "photos" / "happy"
    src.mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(src / "astronaut.jpg", quality=95)
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(src / "wall.jpg")
    result = _run(tmp_path / "photos", Storage(str(tmp_path / "store")), IngestSettings(face_size=128))
    assert list(result.manifest["sample_id"]) == ["wild-happy_astronaut_jpg"]
    x, y, w, h = eval(result.manifest["face_box"][0])  # noqa: S307 - our own JSON list
    assert 170 < x + w / 2 < 290 and 40 < y + h / 2 < 200
    assert list(result.rejects["reason"]) == ["no_face"]


def test_boxes_outside_the_image_repeated_rows_and_conflicting_duplicates(tmp_path):
    """AffectNet-style rows: a face box mostly outside its image is rejected (file, reason, how much is inside), a
    repeated row never writes two samples under one key, and the same picture under two labels is kept once with
    both labels recorded."""
    root = tmp_path / "affectnet"
    images = root / "Manually_Annotated_Images" / "7"
    images.mkdir(parents=True)
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):
        (images / name).write_bytes(jpeg_bytes(face_like(100, seed)))
    (images / "c_copy.jpg").write_bytes((images / "c.jpg").read_bytes())
    rows = [("7/a.jpg", 10, 10, 80, 80, 1), ("7/b.jpg", 90, 90, 60, 60, 2),   # b: 3% of the box inside
            ("7/a.jpg", 10, 10, 80, 80, 1),                                   # a again
            ("7/c.jpg", 0, 0, 100, 100, 3), ("7/c_copy.jpg", 0, 0, 100, 100, 6)]  # one picture, two labels
    pd.DataFrame(rows, columns=["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                                "expression"]).to_csv(root / "training.csv", index=False)
    listing = read_source("affectnet", str(root), "affectnet")
    store = Storage(str(tmp_path / "store"))
    settings = IngestSettings(face_size=32)
    result = ingest(listing, settings, store.artifact("raw_faces", "affectnet", "k"), "r1")
    keys = [k for k, _ in iter_samples(store, result.ref.uri, "faces")]
    assert sorted(keys) == ["affectnet-7_a_jpg", "affectnet-7_c_jpg"] and len(keys) == len(set(keys))
    rejects = {(r.uri.rsplit("/", 1)[1], r.reason): r.detail for r in result.rejects.itertuples()}
    assert rejects[("b.jpg", "bad_box")] == "face box (90, 90, 60, 60) lies mostly outside the 100x100 image (3% inside)"
    assert ("a.jpg", "duplicate_row") in rejects
    dup = result.duplicates.iloc[0]
    assert (dup.sample_id, dup.duplicate_of, dup.label, dup.label_of_kept, dup.conflicting_labels) == (
        "affectnet-7_c_copy_jpg", "affectnet-7_c_jpg", "anger", "surprise", True)


def test_an_aligned_crop_keeps_the_given_square_of_an_aligned_image(tmp_path):
    """`aligned_crop` (centre x, centre y, side) cuts a wide-margin aligned crop down to its face square."""
    root = tmp_path / "aligned" / "happy"
    root.mkdir(parents=True)
    arr = np.zeros((200, 200, 3), np.uint8)
    arr[60:140, 40:120] = 255  # the "face": an 80 px white square centred at (80, 100)
    (root / "a.png").write_bytes(png_bytes(Image.fromarray(arr)))
    store = Storage(str(tmp_path / "store"))
    cropped = _run(tmp_path / "aligned", store, IngestSettings(face_size=40, aligned=True, aligned_crop=(0.4, 0.5, 0.4)))
    (image,) = [np.asarray(Image.open(io.BytesIO(m["jpg"]))) for _, m in iter_samples(store, cropped.ref.uri, "faces")]
    assert image.shape == (40, 40, 3) and image.mean() > 240  # exactly the white square, nothing around it
    assert cropped.manifest["face_box"][0] == "[40.0, 60.0, 80.0, 80.0]"
    whole = _run(tmp_path / "aligned", Storage(str(tmp_path / "store2")), IngestSettings(face_size=40, aligned=True))
    (image,) = [np.asarray(Image.open(io.BytesIO(m["jpg"]))) for _, m in iter_samples(Storage(str(tmp_path / "store2")), whole.ref.uri, "faces")]
    assert 35 < image.mean() < 46  # the whole frame: the square is 16% of it (255 x 0.16 = 41)
    with pytest.raises(ValueError, match="aligned_crop"):
        IngestSettings(aligned=True, aligned_crop=(0.5, 0.5, 1.5))
