"""Generation rounds as a library: uniform labels and valid AU subsets, shards that cover a round once, keys without
dots, and semantic guidance that is exactly off at lambda = 0 or K = 0 and raises the guide's target probability."""

from collections import Counter

import numpy as np
import pytest
import torch

from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.fer.role import FERClassifier
from synfer_pipeline.generation.conditions import TemplatePrompts, sample_label_and_aus
from synfer_pipeline.generation.guidance import GuidanceSettings
from synfer_pipeline.generation.rounds import (RoundSettings, generate_images, round_size, sample_key,
                                               shard_conditions, shard_range)
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSION_INDEX, EXPRESSIONS_7, OPENGRAPHAU_41


def test_labels_are_uniform_and_aus_are_non_empty_subsets_of_the_labels_set():
    draws = [sample_label_and_aus(seed) for seed in range(7000)]
    counts = Counter(label for label, _ in draws)
    assert set(counts) == set(EXPRESSIONS_7)
    for c in EXPRESSIONS_7:  # 1000 expected each; 5 standard deviations is about 150
        assert abs(counts[c] - 1000) < 150, counts
    subsets = Counter()
    for label, aus in draws:
        assert set(aus) <= set(EXPRESSION_AUS[label])
        assert bool(aus) == (label != "neutral")
        if label == "happy":
            subsets[aus] += 1
    # happy's set has 3 non-empty subsets, each about a third of the happy draws
    assert set(subsets) == {("AU6",), ("AU12",), ("AU6", "AU12")}
    assert max(subsets.values()) / min(subsets.values()) < 1.3


def test_shards_cover_a_round_exactly_once_and_keys_have_no_dots():
    total, shards = 103, 4
    indices = [i for k in range(shards) for i in shard_range(total, shards, k)]
    assert indices == list(range(total))
    assert [len(shard_range(total, shards, k)) for k in range(shards)] == [26, 26, 26, 25]
    assert "." not in sample_key("2026.11.23", 3, 7)
    assert round_size(RoundSettings(), 490) == 2450  # the paper's 5x the labelled training set
    assert round_size(RoundSettings(images=140), 490) == 140
    with pytest.raises(ValueError, match="set generation.images"):
        round_size(RoundSettings(), 0)


def test_a_shards_conditions_follow_from_round_shard_and_index_only():
    a = shard_conditions("2026-11-23", 2, range(52, 60), OPENGRAPHAU_41, TemplatePrompts(0))
    b = shard_conditions("2026-11-23", 2, range(52, 60), OPENGRAPHAU_41, TemplatePrompts(0))
    other_round = shard_conditions("2026-11-30", 2, range(52, 60), OPENGRAPHAU_41, TemplatePrompts(0))
    assert a == b and [c.seed for c in a] != [c.seed for c in other_round]
    assert len({c.seed for c in a}) == 8


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    return SynferSampler.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd"))


class _ColourReader(torch.nn.Module):
    """A guide whose reading moves visibly with the image (the tiny SD's images are noise): logits from the mean
    colour of each image quadrant, through fixed random weights."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(12, 7)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(7, 12, generator=torch.Generator().manual_seed(3)) * 8)

    def forward(self, x):
        quadrants = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.head(quadrants)


@pytest.fixture(scope="module")
def guide():
    return FERClassifier(_ColourReader(), EXPRESSIONS_7, 32, name="guide").frozen()


def _conditions(n=6):
    return shard_conditions("r", 0, range(n), OPENGRAPHAU_41, TemplatePrompts(0))


def _run(sampler, guide, scale, last_steps, form="text", steps=6):
    cfg = RoundSettings(steps=steps, batch_size=3, guidance=GuidanceSettings(scale=scale, last_steps=last_steps, form=form))
    return generate_images(sampler, _conditions(), cfg, guide)


def test_lambda_zero_or_k_zero_gives_exactly_the_unguided_images(sampler, guide):
    unguided = generate_images(sampler, _conditions(), RoundSettings(steps=6, batch_size=3), None)
    for scale, k in ((0.0, 3), (2.0, 0)):
        out = _run(sampler, guide, scale, k)
        assert torch.equal(out.images, unguided.images)
        assert torch.count_nonzero(out.text_shift) == 0
    guided = _run(sampler, guide, 2.0, 3)
    assert not torch.equal(guided.images, unguided.images)
    assert torch.all(guided.text_shift > 0)


@pytest.mark.parametrize("form", ["text", "latent"])
def test_guidance_raises_the_guides_target_probability_on_average(sampler, guide, form):
    conditions = _conditions()
    targets = torch.tensor([EXPRESSION_INDEX[c.label] for c in conditions])

    def target_probability(images):
        with torch.no_grad():
            return torch.softmax(guide(images), 1)[torch.arange(len(targets)), targets].mean().item()
    before = target_probability(generate_images(sampler, conditions, RoundSettings(steps=6, batch_size=3), None).images)
    # The tiny random SD's text path is weak: moving its text embedding moves the image less than moving the latent.
    after = target_probability(_run(sampler, guide, 100.0 if form == "text" else 2.0, 3, form).images)
    assert after > before + (0.02 if form == "text" else 0.2), (before, after)


def test_a_guided_step_computes_no_weight_gradients(sampler, guide):
    _run(sampler, guide, 1.0, 2)
    for module in (sampler.unet, sampler.vae, sampler.text_encoder, guide):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert np.isfinite(_run(sampler, guide, 1.0, 2).images.numpy()).all()


def test_an_llm_enriches_the_coarse_description_reproducibly(tmp_path):
    """`LLMPrompts`: AutoModelForCausalLM + chat template (a tiny random Llama saved locally), greedy decoding."""
    from tiny_models import LLAVA_CHAT_TEMPLATE, tiny_word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from synfer_pipeline.generation.conditions import LLMPrompts, coarse_description
    from synfer_pipeline.generation.rounds import PromptSettings, make_prompter

    tokenizer = tiny_word_tokenizer(())
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    prompter = make_prompter(PromptSettings(kind="llm", id=str(tmp_path / "llm"), max_new_tokens=8))
    assert isinstance(prompter, LLMPrompts)
    first = shard_conditions("r", 0, range(3), OPENGRAPHAU_41, prompter)
    again = shard_conditions("r", 0, range(3), OPENGRAPHAU_41, prompter)
    assert [c.prompt for c in first] == [c.prompt for c in again] and all(c.prompt for c in first)
    assert "happy" in coarse_description("happy", ["AU6"]) and "AU6" in coarse_description("happy", ["AU6"])
    assert prompter.describe()["model"] == str(tmp_path / "llm")
    with pytest.raises(ValueError, match="need the model's id"):
        PromptSettings(kind="llm")


class _SmoothNoise(torch.nn.Module):
    """Stands in for a trained UNet in the inversion round trip: a smooth noise prediction (0.1 x the latent),
    for which DDIM inversion is nearly exact (a random UNet's prediction is not smooth enough to invert)."""

    def __init__(self, unet):
        super().__init__()
        self.config = unet.config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the sampler reads its device from

    def forward(self, latents, t, text, return_dict=False, **_):
        return (0.1 * latents,)


def test_layout_initialisation_starts_from_an_inverted_fetext_image(sampler):
    """DDIM inversion of an image, denoised back with the same conditioning, lands on that image's latent; with
    `layout_init` each image starts from its layout and records the FEText key it came from."""
    smooth = SynferSampler(_SmoothNoise(sampler.unet), sampler.vae, sampler.text_encoder, sampler.tokenizer,
                           sampler.scheduler)
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, 16:48, 16:48] = 0.8  # a red square on grey
    with torch.no_grad():
        target = smooth.decode(smooth.vae.encode(image).latent_dist.mean * smooth.vae.config.scaling_factor)
    inverted = smooth.invert(image, num_inference_steps=20)
    back = smooth([""], [0], num_inference_steps=20, guidance_scale=1.0, latents=inverted).images
    fresh = smooth([""], [0], num_inference_steps=20, guidance_scale=1.0).images
    assert (back - target).abs().mean() < 0.1 * (fresh - target).abs().mean()
    cfg = RoundSettings(steps=6, batch_size=3, layout_init=True)
    out = generate_images(sampler, _conditions(3), cfg, None, layout=lambda seed: (f"fetext-{seed % 5}", image[0]))
    assert out.layout_sources == [f"fetext-{c.seed % 5}" for c in _conditions(3)]
    plain = generate_images(sampler, _conditions(3), RoundSettings(steps=6, batch_size=3), None)
    assert not torch.equal(out.images, plain.images)


def test_guidance_can_decode_x0_with_a_tiny_autoencoder(sampler, guide):
    """decoder: tiny decodes the predicted x0 with an AutoencoderTiny (scaling factor 1.0) instead of the VAE; a
    sampler without one says so."""
    from diffusers import AutoencoderTiny

    with pytest.raises(ValueError, match="needs a tiny autoencoder"):
        generate_images(sampler, _conditions(3), RoundSettings(steps=4, batch_size=3, guidance=GuidanceSettings(
                scale=2.0, last_steps=2, form="latent", decoder="tiny")), guide)
    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4,
                           decoder_block_out_channels=(8,) * 4, num_decoder_blocks=(1,) * 4)
    with_tiny = SynferSampler(sampler.unet, sampler.vae, sampler.text_encoder, sampler.tokenizer, sampler.scheduler,
                              tiny_decoder=tiny)
    cfg = RoundSettings(steps=6, batch_size=3, guidance=GuidanceSettings(scale=2.0, last_steps=2, form="latent",
                                                                         decoder="tiny"))
    guided = generate_images(with_tiny, _conditions(3), cfg, guide)
    plain = generate_images(with_tiny, _conditions(3), RoundSettings(steps=6, batch_size=3), None)
    assert torch.isfinite(guided.images).all() and not torch.equal(guided.images, plain.images)
    assert all(not p.requires_grad for p in tiny.parameters())
