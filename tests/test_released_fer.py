"""POSTER++ and APViT as released: the checkpoints' exact layout, safe loading, class orders, gradients to the input.

The expected key names, shapes and counts below were read from the public code (Talented-Q/POSTER_V2 at 18de559:
`models/PosterV2_7cls.py`, `vit_model.py`, `ir50.py`, `mobilefacenet.py`; youqingxiaozhua/APViT at 9efaf97:
`configs/apvit/RAF.py`, `irse.py`, `vit_siam_merge.py`, `vit_pooling.py`, `linear_head.py`) and counted on the
original classes instantiated with their training-only imports (timm, thop, mmcv) stubbed out.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from synfer_pipeline.fer.apvit import build_apvit
from synfer_pipeline.fer.poster import build_poster
from synfer_pipeline.fer.released import (
    APVIT_RAFDB,
    POSTER_AFFECTNET7,
    POSTER_AFFECTNET8,
    POSTER_RAFDB,
    RELEASED_SPECS,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    check_state_dict,
    load_apvit_checkpoint,
    load_poster_checkpoint,
    read_checkpoint,
)
from synfer_pipeline.vocab import EXPRESSIONS, canonical_expression, map_class_order

POSTER_KEYS = 747
POSTER_PARAMS_7 = 58_316_594  # the README's 43.7M leaves out the registered-but-unused layers kept here
POSTER_KEYS_PER_SUBMODULE = {
    "face_landback": 333, "VIT": 46, "ir_back": 304, "attn1": 6, "attn2": 6, "attn3": 6, "window1": 2, "window2": 2,
    "window3": 2, "conv1": 2, "conv2": 2, "conv3": 2, "ffn1": 8, "ffn2": 8, "ffn3": 8, "last_face_conv": 2,
    "embed_q": 4, "embed_k": 2, "embed_v": 2,
}
POSTER_PARAMS_PER_SUBMODULE = {
    "face_landback": 1_007_248, "VIT": 17_097_300, "ir_back": 30_459_584, "attn1": 18_530, "attn2": 52_452,
    "attn3": 198_728, "window1": 128, "window2": 256, "window3": 512, "conv1": 36_928, "conv2": 147_584,
    "conv3": 590_080, "ffn1": 33_344, "ffn2": 132_224, "ffn3": 526_592, "last_face_conv": 1_179_904,
    "embed_q": 5_752_320, "embed_k": 885_504, "embed_v": 197_376,
}
POSTER_SHAPES = {
    "face_landback.conv1.conv.weight": (64, 3, 3, 3),
    "face_landback.conv2_dw.conv.weight": (64, 1, 3, 3),
    "face_landback.conv_23.conv_dw.conv.weight": (128, 1, 3, 3),
    "face_landback.conv_3.model.3.project.bn.running_var": (64,),
    "face_landback.conv_6_sep.prelu.weight": (512,),
    "face_landback.output_layer.conv_6_dw.conv.weight": (512, 1, 7, 7),
    "face_landback.output_layer.linear.weight": (136, 512),
    "face_landback.output_layer.bn.num_batches_tracked": (),
    "ir_back.input_layer.0.weight": (64, 3, 3, 3),
    "ir_back.output_layer.3.weight": (512, 25088),
    "ir_back.output_layer.4.running_mean": (512,),
    "ir_back.body1.0.res_layer.1.weight": (64, 64, 3, 3),
    "ir_back.body2.0.shortcut_layer.0.weight": (128, 64, 1, 1),
    "ir_back.body3.13.res_layer.4.num_batches_tracked": (),
    "attn1.relative_position_bias_table": (3025, 2),
    "attn1.relative_position_index": (784, 784),
    "attn3.relative_position_bias_table": (169, 8),
    "attn3.qkv.weight": (512, 256),
    "window2.norm.weight": (128,),
    "conv1.weight": (64, 64, 3, 3),
    "ffn1.mlp.fc1.weight": (256, 64),
    "ffn3.gamma1": (256,),
    "last_face_conv.weight": (256, 512, 3, 3),
    "embed_q.1.weight": (768, 768, 3, 3),
    "embed_k.0.weight": (768, 128, 3, 3),
    "embed_v.proj.weight": (768, 256, 1, 1),
    "VIT.cls_token": (1, 1, 768),
    "VIT.pos_embed": (1, 148, 768),
    "VIT.se_block.linear2.weight": (768, 768),
    "VIT.patch_embed.proj.weight": (768, 256, 1, 1),
    "VIT.eca_block.conv.weight": (1, 1, 5),
    "VIT.CON1.weight": (768, 256, 1, 1),
    "VIT.IRLinear1.weight": (768, 1024),
    "VIT.blocks.1.conv.weight": (148, 148, 1),
    "VIT.blocks.0.attn.qkv.weight": (2304, 768),
    "VIT.blocks.0.attn.qkv.bias": (2304,),
    "VIT.blocks.1.mlp.fc1.weight": (3072, 768),
    "VIT.norm.bias": (768,),
    "VIT.head.linear.weight": (7, 768),
}
POSTER_ABSENT = ("ir_back.body4.0.res_layer.0.weight", "ir_back.body1.0.shortcut_layer.0.weight", "VIT.dist_token",
                 "VIT.head_dist.weight", "attn1.qkv_global.weight")

APVIT_KEYS = 389
APVIT_PARAMS_7 = 65_209_543  # the APViT paper's 65.2M
APVIT_KEYS_PER_SUBMODULE = {"extractor": 292, "vit": 95, "head": 2}
APVIT_PARAMS_PER_SUBMODULE = {"extractor": 17_611_968, "vit": 47_592_192, "head": 5_383}
APVIT_SHAPES = {
    "extractor.input_layer.0.weight": (64, 3, 3, 3),
    "extractor.input_layer.2.weight": (64,),
    "extractor.body.0.2.res_layer.4.running_var": (64,),
    "extractor.body.1.0.shortcut_layer.0.weight": (128, 64, 1, 1),
    "extractor.body.2.13.res_layer.3.weight": (256, 256, 3, 3),
    "extractor.body.2.13.res_layer.4.num_batches_tracked": (),
    "vit.cls_token": (1, 1, 768),
    "vit.patch_pos_embed": (1, 196, 768),
    "vit.cls_pos_embed": (1, 1, 768),
    "vit.projs.0.weight": (768, 256, 1, 1),
    "vit.projs.0.bias": (768,),
    "vit.blocks.7.attn.qkv.weight": (2304, 768),
    "vit.blocks.0.mlp.fc1.weight": (2304, 768),
    "vit.blocks.0.mlp.fc2.weight": (768, 2304),
    "vit.norm.weight": (768,),
    "head.fc.weight": (7, 768),
    "head.fc.bias": (7,),
}
APVIT_ABSENT = ("vit.blocks.0.attn.qkv.bias", "extractor.output_layer.0.weight", "extractor.body.3.0.res_layer.1.weight",
                "vit.pos_embed", "vit.alpha", "backbone.input_layer.0.weight", "neck.fc.weight")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every float weight and set BatchNorm statistics away from 0/1, so loading them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def poster():
    return randomize_(build_poster(7), seed=1)


@pytest.fixture(scope="module")
def apvit():
    return randomize_(build_apvit(7), seed=2)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def per_submodule(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    keys = {n: len(c.state_dict()) for n, c in model.named_children()}
    params = {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()}
    return keys, params


def test_poster_state_dict_has_the_released_keys_and_shapes(poster):
    found = shapes(poster)
    assert len(found) == POSTER_KEYS
    assert sum(p.numel() for p in poster.parameters()) == POSTER_PARAMS_7
    assert per_submodule(poster) == (POSTER_KEYS_PER_SUBMODULE, POSTER_PARAMS_PER_SUBMODULE)
    assert {k: found.get(k) for k in POSTER_SHAPES} == POSTER_SHAPES
    assert not [k for k in POSTER_ABSENT if k in found]
    assert poster.state_dict()["attn1.relative_position_index"].dtype == torch.int64
    eight = shapes(build_poster(8))
    assert len(eight) == POSTER_KEYS and eight["VIT.head.linear.weight"] == (8, 768)
    assert {k for k in found if found[k] != eight[k]} == {"VIT.head.linear.weight", "VIT.head.linear.bias"}


def test_poster_landmark_branch_is_frozen_and_the_rest_trainable(poster):
    assert not any(p.requires_grad for p in poster.face_landback.parameters())
    assert all(p.requires_grad for p in poster.ir_back.parameters())


def test_apvit_state_dict_has_the_released_keys_and_shapes(apvit):
    found = shapes(apvit)
    assert len(found) == APVIT_KEYS
    assert sum(p.numel() for p in apvit.parameters()) == APVIT_PARAMS_7
    assert per_submodule(apvit) == (APVIT_KEYS_PER_SUBMODULE, APVIT_PARAMS_PER_SUBMODULE)
    assert {k: found.get(k) for k in APVIT_SHAPES} == APVIT_SHAPES
    assert not [k for k in APVIT_ABSENT if k in found]


class RecorderMeter:
    """Stands in for POSTER main.py's training log, pickled (as the original is) as `__main__.RecorderMeter`."""

    def __init__(self, epochs: int) -> None:
        self.total_epoch, self.current_epoch = epochs, 2
        self.epoch_losses = np.arange(epochs * 2, dtype=np.float32).reshape(epochs, 2)
        self.y_pred = np.array([3, 1, 6], dtype=np.int64)


@pytest.fixture
def main_recorder(monkeypatch):
    """RecorderMeter as pickle sees a class defined in a script run as __main__."""
    monkeypatch.setattr(RecorderMeter, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "RecorderMeter", RecorderMeter, raising=False)
    return RecorderMeter


def poster_checkpoint(state: dict, recorder) -> dict:
    """The dict POSTER_V2 main.py saves: DataParallel keys, SAM/Adam state, a tensor best_acc, the recorders."""
    return {
        "epoch": 37,
        "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items()),
        "best_acc": torch.tensor([92.21]),
        "optimizer": {"state": {0: {"old_p": torch.zeros(3), "step": torch.tensor(37.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"rho": 0.05, "adaptive": False, "lr": 3.5e-5, "betas": (0.9, 0.999),
                                        "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "foreach": None,
                                        "params": [0]}]},
        "recorder1": recorder(200),
        "recorder": recorder(200),
        "args": argparse.Namespace(data="/home/Dataset/RAF", lr=3.5e-5, batch_size=144),
        "lr_now": np.float64(3.2e-5),
    }


def test_poster_released_checkpoint_loads_and_gives_the_same_logits(poster, main_recorder, tmp_path):
    path = tmp_path / "raf-db-model_best.pth"
    torch.save(poster_checkpoint(poster.state_dict(), main_recorder), path)
    loaded = load_poster_checkpoint(path, spec=POSTER_RAFDB)
    assert loaded.num_classes == 7 and not loaded.training
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = poster(x), loaded(x)
    assert torch.isfinite(expected).all() and expected.std() > 0
    assert torch.equal(got, expected)


def test_training_objects_in_a_poster_checkpoint_arrive_as_plain_data(main_recorder, tmp_path):
    path = tmp_path / "small.pth"
    torch.save(poster_checkpoint({"VIT.head.linear.weight": torch.ones(7, 768)}, main_recorder), path)
    loaded = read_checkpoint(path)
    assert loaded["recorder"].epoch_losses[3, 1] == 7.0 and loaded["recorder1"].y_pred.tolist() == [3, 1, 6]
    assert not hasattr(loaded["recorder"], "update")  # attributes only: none of the training code came with them
    assert loaded["args"].batch_size == 144 and loaded["lr_now"] == pytest.approx(3.2e-5)
    assert loaded["best_acc"].item() == pytest.approx(92.21)
    assert list(loaded["state_dict"]) == ["module.VIT.head.linear.weight"]


def test_apvit_mmcls_checkpoint_loads_and_gives_the_same_logits(apvit, tmp_path):
    path = tmp_path / "APViT_RAF-3eeecf7d.pth"
    meta = {"mmcls_version": "0.12.0", "config": "model = dict(type='PoolingVitClassifier', ...)",
            "CLASSES": ["Anger", "Disgust", "Fear", "Sadness", "Happiness", "Surprise", "Neutral"],
            "epoch": 40, "iter": 4800, "seed": None, "time": "Tue Mar 14 10:00:00 2023",
            "hook_msgs": {"best_score": np.float64(91.98), "last_ckpt": "work_dirs/RAF/epoch_40.pth"}}
    torch.save({"meta": meta, "state_dict": apvit.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = load_apvit_checkpoint(path, spec=APVIT_RAFDB)
    assert loaded.num_classes == 7 and not loaded.training
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = apvit(x), loaded(x)
    assert torch.isfinite(expected).all() and expected.std() > 0
    assert torch.equal(got, expected)


def test_apvit_meta_classes_disagreeing_with_the_spec_are_refused(tmp_path):
    path = tmp_path / "apvit-other-order.pth"
    meta = {"CLASSES": ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]}
    torch.save({"meta": meta, "state_dict": {"head.fc.weight": torch.zeros(7, 768)}}, path)
    with pytest.raises(CheckpointMismatchError, match="records classes"):
        load_apvit_checkpoint(path, spec=APVIT_RAFDB)


class _Reduce:
    """An object whose unpickling calls `func(*args)`: the shape of every pickle exploit."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker) -> dict:
    return {
        "posix.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.eval": _Reduce(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("offender", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_a_tampered_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path, offender, legacy_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.pth"
    evil = {"epoch": 1, "state_dict": {"module.VIT.head.linear.weight": torch.zeros(7, 768)},
            "recorder": payloads(marker)[offender]}
    torch.save(evil, path, _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_poster_checkpoint(path)
    assert str(path) in str(refused.value) and offender in str(refused.value)
    assert not marker.exists()


def test_a_file_without_model_weights_is_refused_saying_so(tmp_path):
    path = tmp_path / "optimizer_only.pth"  # what POSTER's save_checkpoint writes as model_best: the optimizer state
    torch.save({"state": {}, "param_groups": [{"lr": 1e-6, "params": []}]}, path)
    with pytest.raises(CheckpointMismatchError, match="no 'state_dict'"):
        load_poster_checkpoint(path)


def test_a_missing_unexpected_or_misshapen_key_is_refused_naming_it(apvit, tmp_path):
    good = apvit.state_dict()
    missing = {k: v for k, v in good.items() if k != "vit.norm.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): vit\.norm\.bias"):
        check_state_dict(apvit, missing, "missing.pth")
    misshapen = dict(good, **{"vit.patch_pos_embed": torch.zeros(1, 197, 768)})
    with pytest.raises(CheckpointMismatchError, match=r"vit\.patch_pos_embed: checkpoint \(1, 197, 768\), model "
                                                      r"\(1, 196, 768\)"):
        check_state_dict(apvit, misshapen, "misshapen.pth")
    extra = dict(good, **{"neck.fc.weight": torch.zeros(7, 768)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): neck\.fc\.weight"):
        check_state_dict(apvit, extra, "extra.pth")
    check_state_dict(apvit, good, "good.pth")

    path = tmp_path / "truncated.pth"
    torch.save({"meta": {}, "state_dict": missing}, path)
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(path)) + r".*\n.*missing \(1\): vit\.norm\.bias"):
        load_apvit_checkpoint(path)


def test_asking_for_another_class_count_than_the_checkpoint_has_is_refused(tmp_path):
    path = tmp_path / "affectnet8.pth"
    torch.save({"state_dict": {"module.VIT.head.linear.weight": torch.zeros(8, 768)}}, path)
    with pytest.raises(CheckpointMismatchError, match="has 8 classes, 7 were asked for"):
        load_poster_checkpoint(path, num_classes=7)
    with pytest.raises(CheckpointMismatchError, match="spec poster_affectnet7 names 7"):
        load_poster_checkpoint(path, spec=POSTER_AFFECTNET7)


def test_class_orders_map_to_the_canonical_classes():
    # canonical EXPRESSIONS: neutral, happy, sad, surprise, fear, disgust, anger, contempt
    assert EXPRESSIONS == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
    # RAF-DB label ids 1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral
    assert map_class_order(POSTER_RAFDB.class_names).tolist() == [6, 3, 4, 0, 1, 2, 5, -1]
    assert POSTER_RAFDB.class_names.index("happy") == 3
    # AffectNet ids are the canonical order itself; the 7-class model has no contempt
    assert map_class_order(POSTER_AFFECTNET8.class_names).tolist() == list(range(8))
    assert map_class_order(POSTER_AFFECTNET7.class_names).tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    # APViT's FER_CLASSES: anger, disgust, fear, sadness, happiness (index 4, as its demo prints), surprise, neutral
    assert map_class_order(APVIT_RAFDB.class_names).tolist() == [6, 4, 3, 5, 2, 1, 0, -1]
    assert APVIT_RAFDB.class_names.index("happy") == 4
    for spec in RELEASED_SPECS.values():
        assert len({canonical_expression(c) for c in spec.class_names}) == spec.num_classes
        assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert {s.input_size for s in RELEASED_SPECS.values() if s.architecture == "poster"} == {224}
    assert APVIT_RAFDB.input_size == 112


def test_logits_are_differentiable_with_respect_to_the_input_image(poster, apvit):
    for model, spec in ((poster, POSTER_RAFDB), (apvit, APVIT_RAFDB)):
        image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(5), requires_grad=True)
        logits = model(spec.preprocess(image))
        assert logits.shape == (1, spec.num_classes)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([spec.class_names.index("happy")]))
        (grad,) = torch.autograd.grad(loss, image)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the frozen landmark branch alone still carries a gradient back to its input
    face = torch.randn(1, 3, 112, 112, requires_grad=True)
    (grad,) = torch.autograd.grad(poster.face_landback(face)[2].sum(), face)
    assert grad.abs().sum() > 0


# -- as roles (guide, judge, voter) --------------------------------------------------------------------------------

def _canonical(logits: torch.Tensor, class_names) -> torch.Tensor:
    """The module's logits reordered to `vocab.EXPRESSIONS`, classes it lacks at MISSING_LOGIT."""
    from synfer_pipeline.fer.role import MISSING_LOGIT

    out = torch.full((logits.shape[0], len(EXPRESSIONS)), MISSING_LOGIT)
    for j, name in enumerate(class_names):
        out[:, EXPRESSIONS.index(canonical_expression(name))] = logits[:, j]
    return out


def test_released_checkpoints_become_roles_with_their_preprocessing_and_class_order(poster, apvit, main_recorder,
                                                                                    tmp_path):
    from synfer_pipeline.fer.classifiers import load_fer_classifier

    poster_file, apvit_file = tmp_path / "raf-db-model_best.pth", tmp_path / "APViT_RAF.pth"
    torch.save(poster_checkpoint(poster.state_dict(), main_recorder), poster_file)
    torch.save({"state_dict": apvit.state_dict()}, apvit_file)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    for model, spec, path in ((poster, POSTER_RAFDB, poster_file), (apvit, APVIT_RAFDB, apvit_file)):
        role = load_fer_classifier({"kind": "released", "model": spec.name, "path": str(path)}, "voter")
        assert role.input_size == spec.input_size and role.antialias == spec.antialias
        assert role.info["kind"] == "released" and role.info["fingerprint"]
        with torch.no_grad():
            expected = _canonical(model(spec.preprocess((images + 1) / 2)), spec.class_names)
            got = role(images)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert role.predict_proba(images).shape == (2, len(EXPRESSIONS))
    # a user who knows the checkpoint's own class order overrides the spec's; a wrong count is refused
    order = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
    role = load_fer_classifier({"kind": "released", "model": "poster_rafdb", "path": str(poster_file),
                                "class_names": list(order)})
    assert role.class_names == order
    with pytest.raises(ValueError, match="answers 7 classes"):
        load_fer_classifier({"kind": "released", "model": "poster_rafdb", "path": str(poster_file),
                             "class_names": ["happy", "sad"]})
    with pytest.raises(Exception, match="poster_rafdb"):
        load_fer_classifier({"kind": "released", "model": "poster_v3", "path": str(poster_file)})


def test_semantic_guidance_through_poster_moves_the_text_embedding(poster):
    """POSTER++ as the guide on a tiny model's 64 px x0 (resized to 224 inside the role): a gradient reaches the text
    embedding and guidance moves it, finitely."""
    from synfer_pipeline.demo.tiny_sd import build_tiny_sd
    from synfer_pipeline.fer.role import FERClassifier
    from synfer_pipeline.generation.guidance import GuidanceSettings, semantic_guidance
    from synfer_pipeline.generation.sampler import SynferSampler

    pipe = build_tiny_sd(seed=0)
    sampler = SynferSampler(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    import copy

    poster = copy.deepcopy(poster)  # frozen below; the module's fixture stays as the other tests expect it
    guide = FERClassifier(poster, POSTER_RAFDB.class_names, POSTER_RAFDB.input_size, POSTER_RAFDB.mean,
                          POSTER_RAFDB.std, name="poster").frozen()
    sampler.scheduler.set_timesteps(4)
    t = sampler.scheduler.timesteps[-1]
    text = sampler.encode_prompts(["a happy face"])
    latents = sampler.initial_latents([1], 64, 64)
    targets = torch.tensor([EXPRESSIONS.index("happy")])
    moved, same = semantic_guidance(sampler, latents, t, text, None, guide, targets, GuidanceSettings(scale=0.5))
    shift = (moved - text).flatten(1).norm(dim=1)
    assert torch.isfinite(moved).all() and torch.equal(same, latents)
    torch.testing.assert_close(shift, torch.tensor([0.5]), rtol=1e-4, atol=1e-5)  # a normalised step of lambda
    assert all(p.grad is None for p in poster.parameters())  # only the input got a gradient
