"""Downstream evaluation sets and the export for other trainers."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from synfer_pipeline.evaluation.downstream import (
    BOTH,
    INTENDED,
    NO_FERANNO,
    REAL,
    SYNTHETIC,
    DownstreamSettings,
    evaluate_sets,
    format_table,
    training_sets,
)
from synfer_pipeline.evaluation.export import export_voted
from synfer_pipeline.fer.training import FERTrainSettings
from synfer_pipeline.io.images import encode_png
from synfer_pipeline.labels.voting import VotingSettings, probability_table, vote
from synfer_pipeline.vocab import EXPRESSIONS


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def _votes(intended, calls_a, calls_b, min_confidence=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A vote of two voters (one named feranno) with one-hot calls, and the same vote without FERAnno."""
    def onehot(calls, p=0.9):
        out = np.full((len(calls), len(EXPRESSIONS)), (1 - p) / (len(EXPRESSIONS) - 1))
        for i, c in enumerate(calls):
            out[i, EXPRESSIONS.index(c)] = p
        return out
    keys = [f"syn{i}" for i in range(len(intended))]
    table = probability_table(keys, intended, {"resnet": onehot(calls_a, 0.9), "feranno": onehot(calls_b, 0.6)})
    cfg = VotingSettings(min_confidence=min_confidence)
    return vote(table, cfg), vote(table, cfg, voters=["resnet"])


def test_each_training_sees_exactly_its_samples_with_its_labels():
    intended = ["happy", "sad", "anger", "fear"]
    # syn0: the voters disagree (mean 0.48 < 0.5: dropped); syn2: both say disgust, not anger (relabelled);
    # syn1 and syn3: both say the intended class.
    voted, without = _votes(intended, ["happy", "sad", "disgust", "fear"], ["neutral", "sad", "disgust", "fear"],
                            min_confidence=0.5)
    assert voted["kept"].tolist() == [False, True, True, True]
    assert voted["relabelled"].tolist() == [False, False, True, False]
    synthetic = {f"syn{i}": _image(i) for i in range(4)}
    real_keys, real_labels = ["rafdb/a", "rafdb/b"], ["neutral", "happy"]
    real_images = [_image(10), _image(11)]
    sets = {s.name: s for s in training_sets(real_keys, real_images, real_labels, synthetic, voted, without,
                                             DownstreamSettings())}
    assert list(sets) == [REAL, SYNTHETIC, BOTH, NO_FERANNO, INTENDED]
    assert sets[REAL].keys == real_keys and sets[REAL].labels == real_labels
    assert sets[SYNTHETIC].keys == ["syn1", "syn2", "syn3"]              # the dropped sample stays out
    assert sets[SYNTHETIC].labels == ["sad", "disgust", "fear"]           # voted labels, not intended
    assert sets[SYNTHETIC].images[0] is synthetic["syn1"]
    assert sets[BOTH].keys == real_keys + ["syn1", "syn2", "syn3"]
    assert sets[BOTH].labels == real_labels + ["sad", "disgust", "fear"]
    assert sets[NO_FERANNO].keys == ["syn0", "syn1", "syn2", "syn3"]      # resnet alone is confident on all four
    assert sets[NO_FERANNO].labels == ["happy", "sad", "disgust", "fear"]
    assert sets[INTENDED].keys == ["syn0", "syn1", "syn2", "syn3"] and sets[INTENDED].labels == intended
    # the fingerprint names the samples and their labels, whatever their order
    assert sets[SYNTHETIC].fingerprint() != sets[INTENDED].fingerprint()
    reordered = training_sets(real_keys[::-1], real_images[::-1], real_labels[::-1], synthetic, voted, without,
                              DownstreamSettings())
    assert reordered[0].fingerprint() == sets[REAL].fingerprint()
    # ablations can be turned off; a vote over images that are missing is refused
    assert [s.name for s in training_sets(real_keys, real_images, real_labels, synthetic, voted, None,
                                          DownstreamSettings(intended_ablation=False))] == [REAL, SYNTHETIC, BOTH]
    with pytest.raises(KeyError, match="no synthetic image"):
        training_sets(real_keys, real_images, real_labels, {"syn0": _image(0)}, voted, without, DownstreamSettings())


def test_evaluate_sets_trains_and_tests_each_set_and_skips_a_one_class_set():
    rng = np.random.default_rng(0)

    def faces(label, n, seed):
        value = {"happy": 220, "sad": 30}[label]
        return [Image.fromarray(np.clip(rng.normal(value, 20, (16, 16, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]
    real = faces("happy", 12, 0) + faces("sad", 12, 1)
    labels = ["happy"] * 12 + ["sad"] * 12
    synthetic = {f"syn{i}": im for i, im in enumerate(faces("happy", 4, 2))}
    voted, _ = _votes(["happy"] * 4, ["happy"] * 4, ["happy"] * 4)
    sets = training_sets([f"r{i}" for i in range(24)], real, labels, synthetic, voted, None,
                         DownstreamSettings(intended_ablation=False))
    cfg = DownstreamSettings(train=FERTrainSettings(image_size=16, epochs=12, batch_size=8, augment=False, lr=5e-3,
                                                    resnet_widths=(8, 8, 8, 8), resnet_embedding=8))
    test = faces("happy", 5, 3) + faces("sad", 5, 4)
    rows = evaluate_sets(sets, test, ["happy"] * 5 + ["sad"] * 5, cfg)
    assert rows[REAL]["test_accuracy"] >= 0.9 and rows[REAL]["n_train"] == 24
    assert rows[SYNTHETIC]["test_accuracy"] is None and "1 class" in rows[SYNTHETIC]["skipped"]
    assert rows[BOTH]["n_train"] == 28 and rows[BOTH]["label_counts"]["happy"] == 16
    text = format_table(rows, 10)
    assert "real+synthetic" in text and "(tested on 10 real test faces)" in text


def _shard_samples(n: int):
    samples = []
    for i in range(n):
        meta = {"label": EXPRESSIONS[i % 7], "seed": str(100 + i), "prompt": f"prompt {i}"}
        samples.append((f"syn{i}", {"png": encode_png(_image(i)), "json": json.dumps(meta).encode()},
                        {"artifact": "mem://synthetic_shards/x", "round": "2026-11-30", "shard": 0}))
    return samples


def test_export_round_trips_as_imagefolder_and_webdataset(tmp_path):
    samples = _shard_samples(5)
    intended = [json.loads(m["json"])["label"] for _, m, _ in samples]
    voted, _ = _votes(intended, ["neutral", "sad", "sad", "surprise", "fear"], ["neutral", "sad", "sad", "surprise", "fear"])
    voted.loc[4, "kept"] = False  # a dropped sample is not exported
    real = {"train": ([_image(50)], ["anger"], ["rafdb/train_1"]), "test": ([_image(51)], ["sad"], ["rafdb/test_1"])}
    manifest = export_voted(samples, voted, tmp_path / "export", real=real, shard_size=3)
    root = tmp_path / "export"
    # ImageFolder: images under their voted class, provenance beside each
    pngs = sorted(p.relative_to(root / "imagefolder").as_posix() for p in (root / "imagefolder").rglob("*.png"))
    assert pngs == ["test/sad/real_rafdb_test_1.png", "train/anger/real_rafdb_train_1.png", "train/neutral/syn0.png",
                    "train/sad/syn1.png", "train/sad/syn2.png", "train/surprise/syn3.png"]
    provenance = json.loads((root / "imagefolder/train/sad/syn1.json").read_text())
    assert provenance["intended"] == "happy" and provenance["voted"] == "sad" and provenance["relabelled"] is True
    assert provenance["generation"]["seed"] == "101" and provenance["round"] == "2026-11-30"
    assert provenance["voter_calls"] == {"resnet": "sad", "feranno": "sad"}
    assert Image.open(root / "imagefolder/train/sad/syn1.png").tobytes() == _image(1).tobytes()
    # WebDataset: .png + .cls (canonical index, classes.txt) + .json; the train split only
    classes = (root / "webdataset/classes.txt").read_text().split()
    assert classes == list(EXPRESSIONS)
    tars = sorted(str(p) for p in (root / "webdataset").glob("export-*.tar"))
    assert len(tars) == 2  # 5 train samples in shards of 3
    read = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert sorted(read) == ["real_rafdb_train_1", "syn0", "syn1", "syn2", "syn3"]
    assert classes[int(read["syn1"]["cls"])] == "sad" and classes[int(read["real_rafdb_train_1"]["cls"])] == "anger"
    assert Image.open(io.BytesIO(read["syn3"]["png"])).tobytes() == _image(3).tobytes()
    assert json.loads(read["syn3"]["json"])["voted"] == "surprise"
    assert manifest["synthetic"] == 4 and manifest["counts"]["imagefolder"]["train"]["sad"] == 2
    # a published export is never overwritten
    with pytest.raises(FileExistsError):
        export_voted(samples, voted, root)
    assert len(list((root / "imagefolder").rglob("*.png"))) == 6


def test_export_refuses_unknown_formats_and_missing_samples(tmp_path):
    samples = _shard_samples(2)
    voted, _ = _votes(["neutral", "happy"], ["neutral", "happy"], ["neutral", "happy"])
    with pytest.raises(ValueError, match="export formats"):
        export_voted(samples, voted, tmp_path / "a", formats=("tfrecord",))
    with pytest.raises(KeyError, match="not found in the synthetic shards"):
        export_voted(samples[:1], voted, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing half-written is left under the target name
