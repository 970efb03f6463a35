"""A tiny Stable Diffusion built from configs with random weights: the demo's base model and the tests' model.

Nothing is downloaded: the UNet, VAE, CLIP text encoder, scheduler and the demo's word-level CLIP tokenizer are
all constructed locally, then saved as an ordinary diffusers folder (safetensors) that
`StableDiffusionPipeline.from_pretrained(path, local_files_only=True)` loads like any hub checkpoint. It is the
tests' model: fast, and random, so it draws noise; the demo's base model (`demo.base_model`) learns faces.
Sizes: 64 px images -> 8x8x4 latents (8x VAE), 128 text tokens of width 32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synfer_pipeline.demo.base_model import caption_words, word_tokenizer

TINY_RESOLUTION = 64  # pixels; the VAE downsamples 8x to the UNet's sample_size 8


@functools.lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    return tuple(caption_words())


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """The demo's word-level CLIP tokenizer (`demo.base_model.word_tokenizer`): a caption word is one token, and a
    whole FEText caption fits in its 128 positions."""
    return word_tokenizer(_words())


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks = three 2x downsamplings = 8x, as in Stable Diffusion's VAE (64 px -> 8x8 latents).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _tiny_scheduler() -> DDIMScheduler:
    # Stable Diffusion v1's noise schedule; steps_offset=1 as in its released config (and no deprecation warning).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tiny_sd(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline in memory (float32, CPU, no safety checker); same seed -> same weights."""
    tokenizer = tiny_clip_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # the components draw their random init from the global generator
        unet, vae, text_encoder = _tiny_unet(), _tiny_vae(), _tiny_text_encoder(tokenizer)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's random stream untouched
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny Stable Diffusion with random weights from `seed` and save it as a diffusers folder.

    Returns `path` (created if needed); the folder holds model_index.json and unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ with float32 safetensors weights (about 3 MB in all). Deterministic given the seed.
    """
    path = Path(path)
    build_tiny_sd(seed).save_pretrained(path, safe_serialization=True)
    return path
