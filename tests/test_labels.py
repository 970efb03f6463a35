"""Labels: the cross-attention recorder, FERAnno on the UNet's features, and label voting."""

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel

from synfer_pipeline.demo.autoencoder import AutoencoderSettings
from synfer_pipeline.demo.base_model import BaseModelSettings, build_base_model, training_faces
from synfer_pipeline.demo.tiny_sd import build_tiny_sd
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.labels.attention import CrossAttentionRecorder
from synfer_pipeline.labels.feranno import FERAnno, FERAnnoSettings, UNetProbe, train_feranno
from synfer_pipeline.labels.voting import VotingSettings, probability_table, vote, vote_summary
from synfer_pipeline.vocab import EXPRESSIONS, EXPRESSIONS_7


def _two_level_unet() -> UNet2DConditionModel:
    """Cross-attention at two resolutions (full and half), so every level's map size is checked."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    ).eval()


def _expected_side(layer: str, side: int) -> int:
    """Full resolution in down block 0 and up block 1 of this UNet, half elsewhere."""
    return side if layer.startswith(("down_blocks.0", "up_blocks.1")) else side // 2


@pytest.mark.parametrize("hw", [(8, 8), (8, 16)])
def test_recorder_maps_every_cross_attention_layer_and_leaves_the_output_unchanged(hw):
    unet = _two_level_unet()
    latents = torch.randn(2, 4, *hw)
    text = torch.randn(2, 7, 32)
    t = torch.tensor([10])
    with torch.no_grad():
        before = unet(latents, t, text).sample
        recorder = CrossAttentionRecorder().attach(unet)
        recorder.expect(hw)
        during = unet(latents, t, text).sample
        layers = list(recorder.layers)
        recorder.detach()
        after = unet(latents, t, text).sample
    cross = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert layers == cross and len(cross) == 7  # 2 down + 1 mid + 2 x 2 up transformer blocks
    assert torch.equal(before, during) and torch.equal(before, after)
    for name in cross:
        maps = recorder.maps[name]
        h, w = _expected_side(name, hw[0]), _expected_side(name, hw[1])
        assert maps.shape == (2, 7, h, w), name
        # attention probabilities: over the text tokens they sum to 1 at every position
        torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, h, w))
    # the processors are the originals again
    assert all(type(p).__name__ != "RecordingProcessor" for p in unet.attn_processors.values())


def test_recorder_pools_to_a_grid_and_refuses_a_unet_without_cross_attention():
    unet = _two_level_unet()
    with torch.no_grad(), CrossAttentionRecorder(grid=2).attach(unet) as recorder:
        recorder.expect((8, 8))
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 5, 32))
        assert {tuple(m.shape) for m in recorder.maps.values()} == {(1, 5, 2, 2)}
    plain = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 mid_block_type=None, cross_attention_dim=32)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        CrossAttentionRecorder().attach(plain)


def _sampler() -> SynferSampler:
    pipe = build_tiny_sd(seed=0)
    return SynferSampler(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory) -> SynferSampler:
    """The demo's base model (an autoencoder trained on toy faces, 4x: 16x16 latents), on a small budget."""
    cfg = BaseModelSettings(faces=56, autoencoder=AutoencoderSettings(steps=80, batch_size=8, blocks=(8, 16, 16)),
                            text_pretrain_steps=1, tiny_decoder_steps=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the autoencoder's training draws from the global generator: fixed, whatever ran before
        path, _ = build_base_model(tmp_path_factory.mktemp("base") / "base-sd", cfg)
    return SynferSampler.from_pretrained(path)


def _toy_faces(n: int, seed: int):
    """Cropped toy faces as the demo's datasets hold them; face i shows expression i mod 7."""
    return training_faces(n, seed, 64, BaseModelSettings().face_crop), [EXPRESSIONS_7[i % 7] for i in range(n)]


def test_probe_is_deterministic_and_independent_of_batching():
    probe = UNetProbe(_sampler(), timestep=1, grid=2, seed=0)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    whole = probe.features(x, ["a face"] * 4)
    parts = probe.extract(x, ["a face"] * 4, batch_size=3)
    torch.testing.assert_close(whole.features, parts.features)
    torch.testing.assert_close(whole.attention, parts.attention)
    assert whole.features.shape[0] == 4 and sum(whole.channels) == whole.features.shape[1]
    assert whole.attention.shape[1] % probe.sampler.tokenizer.model_max_length == 0


def test_feranno_learns_toy_expressions_above_chance_and_round_trips(tmp_path, demo_base):
    """The UNet stays frozen; the head alone learns to read the expression from the UNet's features."""
    sampler = demo_base
    unet_before = {k: v.clone() for k, v in sampler.unet.state_dict().items()}
    train_x, train_y = _toy_faces(280, seed=1)
    test_x, test_y = _toy_faces(140, seed=2)
    cfg = FERAnnoSettings(grid=4, width=64, heads=4, epochs=60, lr=2e-3, batch_size=32)
    model, metrics = train_feranno(sampler, train_x, train_y, cfg)
    predicted = model.predict(test_x)
    accuracy = np.mean([p == t for p, t in zip(predicted, test_y)])
    # chance is 14.3% (3 points of standard error on 140 faces); the UNet here is random, only its autoencoder
    # learned faces: 31-38% measured over three autoencoder seeds (the demo's trained UNet: 60%)
    assert accuracy > 0.24, accuracy
    assert metrics["attention_layers"] == len(
        [n for n in sampler.unet.attn_processors if n.endswith("attn2.processor")]) and metrics["n_train"] == len(train_x)
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    assert all(torch.equal(unet_before[k], v) for k, v in sampler.unet.state_dict().items())
    probs = model.predict_proba(test_x[:5])
    assert probs.shape == (5, len(EXPRESSIONS)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.all(probs[:, EXPRESSIONS.index("contempt")] == 0)  # not a class it was trained on
    model.save(tmp_path / "feranno")
    again = FERAnno.load(tmp_path / "feranno", sampler)
    np.testing.assert_allclose(again.predict_proba(test_x[:5]), probs, atol=1e-6)
    with torch.no_grad():
        next(sampler.unet.parameters()).add_(1.0)
    try:
        with pytest.raises(ValueError, match="another UNet"):
            FERAnno.load(tmp_path / "feranno", sampler)
    finally:
        with torch.no_grad():
            next(sampler.unet.parameters()).sub_(1.0)


def test_caption_conditioning_needs_a_prompt_per_image():
    model = FERAnno.__new__(FERAnno)
    model.cfg = FERAnnoSettings(conditioning="caption")
    with pytest.raises(ValueError, match="one prompt per image"):
        model.prompts_for(3, ["a", "b"])
    assert model.prompts_for(2, ["a", "b"]) == ["a", "b"]
    model.cfg = FERAnnoSettings(conditioning="fixed", prompt="a face")
    assert model.prompts_for(2, None) == ["a face", "a face"]


# -- voting on hand-made probability tables ------------------------------------------------------------------------

def _p(**classes) -> list[float]:
    row = [0.0] * len(EXPRESSIONS)
    for c, v in classes.items():
        row[EXPRESSIONS.index(c)] = v
    return row


def _table(rows: dict[str, list[list[float]]], intended: list[str]) -> pd.DataFrame:
    keys = [f"s{i}" for i in range(len(intended))]
    return probability_table(keys, intended, {v: np.array(p) for v, p in rows.items()})


def test_vote_averages_and_relabels_where_the_voters_disagree_with_the_intended_label():
    table = _table({
        "a": [_p(happy=0.9, sad=0.1), _p(sad=0.8, happy=0.2), _p(anger=0.6, fear=0.4)],
        "b": [_p(happy=0.7, sad=0.3), _p(sad=0.6, neutral=0.4), _p(fear=0.9, anger=0.1)],
    }, ["happy", "happy", "anger"])
    out = vote(table)
    assert out["voted"].tolist() == ["happy", "sad", "fear"]
    assert out["relabelled"].tolist() == [False, True, True]
    assert out["intended"].tolist() == ["happy", "happy", "anger"]  # both labels are kept
    np.testing.assert_allclose(out["confidence"], [0.8, 0.7, 0.65], atol=1e-6)
    np.testing.assert_allclose(out["intended_probability"], [0.8, 0.1, 0.35], atol=1e-6)
    assert out["call:a"].tolist() == ["happy", "sad", "anger"] and out["call:b"].tolist() == ["happy", "sad", "fear"]
    summary = vote_summary(out)
    assert summary["agreement_rate"] == pytest.approx(1 / 3) and summary["relabel_rate"] == pytest.approx(2 / 3)
    assert summary["counts_voted"]["sad"] == 1 and summary["counts_intended"]["happy"] == 2
    assert summary["voter_agreement_with_intended"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    confusion = np.array(summary["confusion"])
    assert confusion[EXPRESSIONS_7.index("happy"), EXPRESSIONS_7.index("sad")] == 1 and confusion.sum() == 3


def test_ties_keep_the_intended_label_or_fall_to_canonical_order():
    table = _table({"a": [_p(happy=0.5, sad=0.5), _p(happy=0.5, sad=0.5)]}, ["sad", "anger"])
    out = vote(table)
    assert out["voted"].tolist() == ["sad", "happy"]  # intended among the tied; else the first tied class
    assert out["relabelled"].tolist() == [False, True]


def test_weights_change_the_vote_and_zero_weight_leaves_a_voter_out():
    table = _table({"a": [_p(happy=0.9, sad=0.1)], "b": [_p(sad=0.6, happy=0.4)], "c": [_p(sad=1.0)]}, ["happy"])
    assert vote(table)["voted"].tolist() == ["sad"]                                  # (0.9+0.4+0)/3 < (0.1+0.6+1)/3
    assert vote(table, VotingSettings(weights={"a": 3.0}))["voted"].tolist() == ["happy"]  # 3.1/5 > 1.9/5
    assert vote(table, VotingSettings(weights={"c": 0.0}))["voted"].tolist() == ["happy"]
    assert vote(table, voters=["b", "c"])["voted"].tolist() == ["sad"]
    with pytest.raises(ValueError, match="not in the probability table"):
        vote(table, VotingSettings(weights={"feranno": 1.0}))
    with pytest.raises(ValueError, match="sum to 0"):
        vote(table, VotingSettings(weights={"a": 0.0, "b": 0.0, "c": 0.0}))
    with pytest.raises(ValueError, match=">= 0"):
        VotingSettings(weights={"a": -1.0})


def test_a_confidence_threshold_drops_samples_but_records_them():
    table = _table({"a": [_p(happy=0.9, sad=0.1), _p(sad=0.4, happy=0.35, neutral=0.25)]}, ["happy", "sad"])
    out = vote(table, VotingSettings(min_confidence=0.5))
    assert len(out) == 2 and out["kept"].tolist() == [True, False]
    assert out["drop_reason"].tolist()[0] == "" and "0.400 < min_confidence 0.5" in out["drop_reason"].tolist()[1]
    summary = vote_summary(out)
    assert summary["drop_rate"] == 0.5 and summary["kept"] == 1 and summary["counts_kept"]["sad"] == 0


def test_probability_tables_refuse_bad_shapes_and_unknown_labels():
    with pytest.raises(ValueError, match="expected"):
        probability_table(["k"], ["happy"], {"a": np.zeros((1, 7))})
    with pytest.raises(ValueError, match="not canonical"):
        probability_table(["k"], ["joy"], {"a": np.zeros((1, 8))})
