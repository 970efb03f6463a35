"""Toy faces: the demo's built-in data, written in real dataset layouts with exactly known AUs."""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synfer_pipeline.demo import toyfaces
from synfer_pipeline.demo.data import write_demo_data, write_rafdb_layout, write_unlabelled_folder
from synfer_pipeline.demo.toyfaces import (
    DEFINING_AUS,
    DRAWN_AUS,
    EXTRA_AUS,
    ToyFace,
    draw_toy_face,
    face_geometry,
    render_toy_face,
    sample_aus,
)
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7, OPENGRAPHAU_41, au_vector

# RAF-DB's own code table (readme of the basic set), written out here independently of the module.
RAFDB_NAMES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral"}


def _read_au_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _face_coords(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every output pixel in face units: x in half-widths, y in half-heights, roll undone (y > 0 is down)."""
    cx, cy, a, b = face_geometry(params)
    yy, xx = np.mgrid[0:params["size"], 0:params["size"]] + 0.5
    c, s = math.cos(math.radians(params["roll_deg"])), math.sin(math.radians(params["roll_deg"]))
    du, dv = xx - cx, yy - cy
    return (c * du - s * dv) / a, (s * du + c * dv) / b


@pytest.fixture(scope="module")
def rafdb(tmp_path_factory) -> Path:
    return write_rafdb_layout(tmp_path_factory.mktemp("toy") / "rafdb", n_train=21, n_test=10, size=100, seed=3)


# ---- the AU sampler -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression", EXPRESSIONS_7)
def test_sampled_aus_come_from_the_paper_table_and_keep_the_defining_aus(expression):
    rng = np.random.default_rng(0)
    allowed = set(EXPRESSION_AUS[expression]) | set(EXTRA_AUS.get(expression, {}))
    samples = [sample_aus(expression, rng) for _ in range(300)]
    for aus in samples:
        assert set(aus) <= allowed
        assert set(DEFINING_AUS[expression]) <= set(aus)
        assert list(aus) == [au for au in OPENGRAPHAU_41 if au in aus]  # OpenGraphAU order
    counts = Counter(au for aus in samples for au in aus)
    for au in set(EXPRESSION_AUS[expression]) - set(DEFINING_AUS[expression]):
        assert 0.75 < counts[au] / 300 < 0.95, au  # kept with probability 0.85: a random subset per image


def test_neutral_faces_have_no_action_units():
    rng = np.random.default_rng(1)
    assert all(sample_aus("neutral", rng) == () for _ in range(50))
    assert draw_toy_face("neutral", rng).aus == ()


def test_defining_aus_make_each_expression_distinct():
    defining = {e: frozenset(DEFINING_AUS[e]) for e in EXPRESSIONS_7}
    assert len(set(defining.values())) == 7
    assert all(set(DEFINING_AUS[e]) <= set(EXPRESSION_AUS[e]) for e in EXPRESSIONS_7)


def test_unknown_expression_and_undrawable_au_are_errors():
    with pytest.raises(ValueError):
        sample_aus("boredom", np.random.default_rng(0))
    with pytest.raises(ValueError):
        draw_toy_face("happy", np.random.default_rng(0), aus=("AU10",))  # in OpenGraphAU, but never drawn


# ---- drawing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [48, 100, 256])
def test_faces_are_rgb_of_the_requested_size(size):
    face = draw_toy_face("surprise", np.random.default_rng(size), size=size)
    assert isinstance(face, ToyFace)
    assert face.image.mode == "RGB" and face.image.size == (size, size)
    assert face.expression == "surprise"
    assert face.aus == tuple(au for au in OPENGRAPHAU_41 if au in face.aus)


def test_same_generator_state_gives_the_same_face():
    a = draw_toy_face("fear", np.random.default_rng(7), 100)
    b = draw_toy_face("fear", np.random.default_rng(7), 100)
    c = draw_toy_face("fear", np.random.default_rng(8), 100)
    assert a.aus == b.aus and a.params == b.params
    assert np.array_equal(_pixels(a.image), _pixels(b.image))
    assert not np.array_equal(_pixels(a.image), _pixels(c.image))


def test_params_are_json_and_redraw_the_same_image():
    face = draw_toy_face("anger", np.random.default_rng(11), 100)
    params = json.loads(json.dumps(face.params))
    assert np.array_equal(_pixels(render_toy_face(params, face.aus)), _pixels(face.image))


def test_appearance_varies_between_faces():
    params = [draw_toy_face("neutral", np.random.default_rng(i), 32).params for i in range(60)]
    assert len({tuple(p["skin"]) for p in params}) > 20
    assert {p["hair_style"] for p in params} == set(toyfaces.HAIR_STYLES)
    assert {p["background"] for p in params} == set(toyfaces.BACKGROUNDS)
    rolls = [p["roll_deg"] for p in params]
    assert max(rolls) > 6 and min(rolls) < -6 and max(abs(r) for r in rolls) <= 12


def test_face_fills_most_of_the_frame_and_stays_centred():
    for i in range(30):
        cx, cy, a, b = face_geometry(draw_toy_face("happy", np.random.default_rng(i), 100).params)
        assert 0.6 <= 2 * b / 100 <= 0.8
        assert abs(cx - 50) < 5 and abs(cy - 53) < 5


# Where each AU must change the picture, in face units (y: -1 top of the face, +1 chin): (y_min, y_max).
AU_REGIONS = {
    "AU1": (-1.0, -0.1), "AU2": (-1.0, -0.1), "AU4": (-1.0, -0.1),  # brows
    "AU5": (-1.0, 0.33), "AU7": (-1.0, 0.33), "AU6": (-0.33, 0.33), "AU9": (-0.33, 0.33),  # eyes, cheeks, nose
    "AU12": (0.25, 2.0), "AU15": (0.33, 2.0), "AU16": (0.33, 2.0), "AU20": (0.33, 2.0), "AU23": (0.33, 2.0),
    "AU25": (0.33, 2.0), "AU26": (0.33, 2.0),  # mouth and jaw: the lower third
}


def test_every_drawn_au_has_a_region():
    assert set(AU_REGIONS) == set(DRAWN_AUS)


@pytest.mark.parametrize("au", DRAWN_AUS)
def test_each_au_changes_pixels_only_in_its_own_region(au):
    lo, hi = AU_REGIONS[au]
    for seed in range(6):
        # Same generator state: the same person, with and without the AU.
        plain = draw_toy_face("neutral", np.random.default_rng(seed), 128, aus=())
        moved = draw_toy_face("neutral", np.random.default_rng(seed), 128, aus=(au,))
        assert plain.params == moved.params
        diff = np.abs(_pixels(moved.image) - _pixels(plain.image)).sum(axis=-1)
        _, fy = _face_coords(plain.params)
        inside = diff[(fy >= lo) & (fy <= hi)].sum() / diff.sum()
        assert (diff > 30).sum() >= 25, "the change must be visible, not a faint tint"
        assert inside > 0.9, f"{au}: only {inside:.0%} of the change is in face rows {lo}..{hi}"


def test_smile_changes_the_lower_third_and_sad_brows_the_upper_part():
    seed = 21
    plain = draw_toy_face("happy", np.random.default_rng(seed), 128, aus=())
    smile = draw_toy_face("happy", np.random.default_rng(seed), 128, aus=("AU12",))
    brows = draw_toy_face("sad", np.random.default_rng(seed), 128, aus=("AU1", "AU4"))
    _, fy = _face_coords(plain.params)
    smile_diff = np.abs(_pixels(smile.image) - _pixels(plain.image)).sum(-1)
    brow_diff = np.abs(_pixels(brows.image) - _pixels(plain.image)).sum(-1)
    assert smile_diff[fy > 1 / 3].sum() / smile_diff.sum() > 0.9
    assert brow_diff[fy < 0].sum() / brow_diff.sum() > 0.95


def test_mouth_opening_darkens_the_mouth_region():
    plain = draw_toy_face("surprise", np.random.default_rng(5), 128, aus=())
    open_ = draw_toy_face("surprise", np.random.default_rng(5), 128, aus=("AU25", "AU26"))
    fx, fy = _face_coords(plain.params)
    mouth = (np.abs(fx) < 0.2) & (fy > 0.5) & (fy < 0.75)
    grey = lambda im: _pixels(im.convert("L"))  # noqa: E731
    assert grey(open_.image)[mouth].min() < grey(plain.image)[mouth].min() - 20


# ---- dataset layouts -------------------------------------------------------------------------------------------

def test_rafdb_layout_parses_as_rafdb(rafdb):
    lines = (rafdb / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()
    assert len(lines) == 31
    names = []
    for line in lines:
        match = re.fullmatch(r"((train)_(\d{5})|(test)_(\d{4}))\.jpg ([1-7])", line)
        assert match, line
        names.append(line.split()[0])
    assert names[:3] == ["train_00001.jpg", "train_00002.jpg", "train_00003.jpg"]
    assert names[21:23] == ["test_0001.jpg", "test_0002.jpg"]
    on_disk = sorted(p.name for p in (rafdb / "Image" / "aligned").iterdir())
    assert on_disk == sorted(n.replace(".jpg", "_aligned.jpg") for n in names)
    with Image.open(rafdb / "Image" / "aligned" / "train_00001_aligned.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (100, 100)


def test_rafdb_codes_map_back_to_the_drawn_expression(rafdb):
    labels = dict(line.split() for line in (rafdb / "EmoLabel" / "list_patition_label.txt").read_text().splitlines())
    rows = _read_au_csv(rafdb / "synfer_toy_aus.csv")
    assert [r["image"] for r in rows] == list(labels)
    for row in rows:
        assert RAFDB_NAMES[int(labels[row["image"]])] == row["expression"]


def test_rafdb_classes_are_balanced(rafdb):
    rows = _read_au_csv(rafdb / "synfer_toy_aus.csv")
    train = Counter(r["expression"] for r in rows if r["image"].startswith("train"))
    test = Counter(r["expression"] for r in rows if r["image"].startswith("test"))
    assert train == {e: 3 for e in EXPRESSIONS_7}
    assert set(test) == set(EXPRESSIONS_7) and max(test.values()) - min(test.values()) <= 1


def test_au_csv_is_the_drawn_ground_truth(rafdb):
    rows = _read_au_csv(rafdb / "synfer_toy_aus.csv")
    for row in rows:
        aus = tuple(row["aus"].split())
        assert set(aus) <= set(DRAWN_AUS) and set(DEFINING_AUS[row["expression"]]) <= set(aus)
        assert au_vector(aus).sum() == len(aus)
    # Redraw two files from their documented generator: the stored image is the csv's AUs, not another set.
    for row, stream, index in ((rows[0], 1, 1), (rows[21], 2, 1)):
        with Image.open(rafdb / "Image" / "aligned" / row["image"].replace(".jpg", "_aligned.jpg")) as im:
            stored = _pixels(im.convert("RGB"))
        redraw = lambda aus: _pixels(draw_toy_face(  # noqa: E731
            row["expression"], np.random.default_rng([3, stream, index]), 100, aus=aus).image)
        as_listed = np.abs(redraw(tuple(row["aus"].split())) - stored).mean()
        assert as_listed < 3.0  # JPEG error only
        if row["aus"]:
            assert np.abs(redraw(()) - stored).mean() > as_listed + 0.3


def test_unlabelled_folder_is_ffhq_like(tmp_path):
    root = write_unlabelled_folder(tmp_path / "ffhq", n=9, size=64, seed=2)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert files == [f"00000/{i:05d}.png" for i in range(9)]
    rows = _read_au_csv(root / "synfer_toy_aus.csv")
    assert [r["image"] for r in rows] == files
    assert Counter(r["expression"] for r in rows).most_common()[0][1] == 2  # 9 over 7 classes: 2 or 1 each
    with Image.open(root / files[0]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)


def test_unlabelled_folder_groups_a_thousand_per_subfolder(tmp_path, monkeypatch):
    tiny = Image.new("RGB", (4, 4))
    # Drawing is not under test here, only the FFHQ folder numbering.
    monkeypatch.setattr(toyfaces, "draw_toy_face", lambda expression, rng, size: ToyFace(tiny, expression, (), {}))
    root = write_unlabelled_folder(tmp_path / "ffhq", n=1002, size=4, ext="jpg")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["00000", "01000"]
    assert len(list((root / "00000").iterdir())) == 1000
    assert sorted(p.name for p in (root / "01000").iterdir()) == ["01000.jpg", "01001.jpg"]


def test_same_seed_writes_byte_identical_files(tmp_path):
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    small = dict(n_train=14, n_test=7, n_hr=7)
    first = snapshot(tmp_path / "a") if write_demo_data(tmp_path / "a", seed=4, **small) else None
    second = snapshot(tmp_path / "b") if write_demo_data(tmp_path / "b", seed=4, **small) else None
    other = snapshot(tmp_path / "c") if write_demo_data(tmp_path / "c", seed=5, **small) else None
    assert len(first) == 14 + 7 + 2 + 7 + 1
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_datasets_appear_complete_and_never_overwrite(tmp_path):
    root = write_unlabelled_folder(tmp_path / "ffhq", n=3, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffhq"]  # no staging folder left behind
    with pytest.raises(FileExistsError):
        write_unlabelled_folder(root, n=3, size=32)
    with pytest.raises(FileExistsError):
        write_rafdb_layout(root, n_train=7, n_test=7, size=32)
    assert len(_read_au_csv(root / "synfer_toy_aus.csv")) == 3
    (tmp_path / "empty").mkdir()
    assert len(list(write_rafdb_layout(tmp_path / "empty", 7, 0, size=32).rglob("*.jpg"))) == 7


def test_demo_data_defaults_are_small_and_fast(tmp_path):
    start = time.perf_counter()
    paths = write_demo_data(tmp_path)
    elapsed = time.perf_counter() - start
    assert set(paths) == {"rafdb", "ffhq"}
    assert len(list((paths["rafdb"] / "Image" / "aligned").glob("train_*_aligned.jpg"))) == 140
    assert len(list((paths["rafdb"] / "Image" / "aligned").glob("test_*_aligned.jpg"))) == 70
    assert len(list(paths["ffhq"].rglob("*.png"))) == 112
    with Image.open(next(paths["ffhq"].rglob("*.png"))) as im:
        assert im.size == (256, 256)
    assert elapsed < 20, f"demo data took {elapsed:.1f} s"  # ~3 s on one core; loose for shared CI machines
