"""The SynFER sampler: text + AU conditioned latent diffusion with classifier-free and semantic guidance.

It reads like a diffusers pipeline's `__call__`, with the paper's additions as numbered steps of the loop rather
than hooks: AU injection (the adapter's tokens, its learned "no AU" condition in the unconditional branch) and
semantic guidance in the last K steps (`generation.guidance`). The loop is our own because diffusers' `__call__`
runs under `no_grad` and its callback sees neither the noise prediction nor x0. Every model is frozen
(`requires_grad_(False)`): a guided step's backward pass computes gradients for its input only.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline

from synfer_pipeline.generation.au_adapter import (BASE_MODEL_JSON, au_condition, base_unet_sha256, load_au_adapter,
                                                   unconditional_au)
from synfer_pipeline.generation.guidance import GuidanceSettings, semantic_guidance


@dataclass
class SamplerOutput:
    """images: (N, 3, H, W) float32 in [-1, 1]; text_shift: per sample, how far guidance moved the text embedding
    (L2 norm, 0 without guidance); guided_steps: the denoising steps guidance ran at; seconds: wall time."""

    images: torch.Tensor
    text_shift: torch.Tensor
    guided_steps: list[int]
    seconds: float


def _warn_if_other_base(unet, adapter_dir: Path) -> None:
    base_file = adapter_dir / BASE_MODEL_JSON
    if base_file.is_file():
        trained_on = json.loads(base_file.read_text()).get("unet_sha256")
        if trained_on and trained_on != base_unet_sha256(unet):
            warnings.warn(f"the AU adapter in {adapter_dir} was trained on another UNet than the one it is loaded on",
                          stacklevel=3)


class SynferSampler:
    """Frozen UNet (+ optional AU adapter), VAE, text encoder and tokenizer of a diffusers folder, and a scheduler.

    tiny_decoder: an `AutoencoderTiny` decoding the UNet's latents directly (scaling factor 1.0), an optional
    fast decoder for guidance's x0; the final images always come from the full VAE.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, n_aus: int | None = None, tiny_decoder=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.n_aus, self.tiny_decoder = scheduler, n_aus, tiny_decoder
        for module in (unet, vae, text_encoder, tiny_decoder):
            if module is not None:
                module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, adapter_dir: str | Path | None = None,
                        tiny_decoder_dir: str | Path | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> SynferSampler:
        """A diffusers folder (stage 2), optionally with the AU adapter and a tiny decoder; DDIM from its config."""
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        n_aus = None
        if adapter_dir is not None:
            _warn_if_other_base(pipe.unet, Path(adapter_dir))
            n_aus = load_au_adapter(pipe.unet, adapter_dir).mlp[0].in_features
        tiny = None
        if tiny_decoder_dir is not None:
            from diffusers import AutoencoderTiny

            tiny = AutoencoderTiny.from_pretrained(str(tiny_decoder_dir), torch_dtype=dtype).to(device)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device), pipe.tokenizer, scheduler,
                   n_aus, tiny)

    @property
    def resolution(self) -> int:
        """The image side the UNet's sample size decodes to (px)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(N, T, D) text embeddings (the text encoder's last hidden state, as Stable Diffusion conditions on)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def initial_latents(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """(N, C, h, w) standard normal latents, sample i drawn from its own generator seeded `seeds[i]`."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (self.unet.config.in_channels, height // factor, width // factor)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
            self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (N, 3, H, W) images in [-1, 1] through the full VAE."""
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def __call__(self, prompts: list[str], seeds: list[int], au: torch.Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, guide: torch.nn.Module | None = None, targets: torch.Tensor | None = None,
                 guidance: GuidanceSettings | None = None, latents: torch.Tensor | None = None) -> SamplerOutput:
        """Generate one image per prompt.

        prompts: N texts; seeds: N ints (image i's starting noise depends on seeds[i] only); au: (N, n_aus) AU
        vectors in the adapter's order (rows of NaN: no AU condition), required when an adapter is attached;
        guide/targets/guidance: semantic guidance by a differentiable classifier (images in [-1, 1] -> logits over
        `vocab.EXPRESSIONS`) towards target class indices (N,); latents: starting latents (layout initialisation)
        instead of fresh noise. Returns the images with what guidance did.
        """
        started = time.perf_counter()
        # 1. Check inputs.
        n = len(prompts)
        if len(seeds) != n:
            raise ValueError(f"{n} prompts but {len(seeds)} seeds")
        if self.n_aus is not None and (au is None or tuple(au.shape) != (n, self.n_aus)):
            raise ValueError(f"this sampler's AU adapter needs au of shape ({n}, {self.n_aus})")
        guidance = guidance or GuidanceSettings(scale=0.0)
        if guide is not None and guidance.scale and (targets is None or len(targets) != n):
            raise ValueError("semantic guidance needs one target class per prompt")
        height, width = height or self.resolution, width or self.resolution

        # 2. Encode the prompts, and the empty prompt for the unconditional branch of classifier-free guidance.
        text = self.encode_prompts(list(prompts))
        empty = self.encode_prompts([""]).expand(n, -1, -1)
        text_start = text.clone()

        # 3. AU conditions: the vectors for the conditional branch, the adapter's learned null for the other.
        au_pair = None
        if self.n_aus is not None:
            au = au.to(self.device, torch.float32)
            au_pair = torch.cat([unconditional_au(n, self.n_aus, self.device), au])

        # 4. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps

        # 5. Starting latents.
        latents = self.initial_latents(seeds, height, width) if latents is None else latents.to(self.device)
        latents = latents * self.scheduler.init_noise_sigma

        # 6. The denoising loop.
        guided_steps = []
        for i, t in enumerate(timesteps):
            # 6a. Semantic guidance (last K steps): move the text conditioning (or the latents) against the guide's
            #     cross-entropy to the target, computed on the decoded x0 of the conditional noise prediction.
            if guide is not None and guidance.scale and i >= len(timesteps) - guidance.last_steps:
                text, latents = semantic_guidance(self, latents, t, text, au, guide, targets, guidance)
                guided_steps.append(i)
            with torch.no_grad():
                # 6b. Classifier-free guidance: one UNet call on [unconditional; conditional].
                noise = self.noise(torch.cat([latents, latents]), t, torch.cat([empty, text]), au_pair)
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
                # 6c. The scheduler step.
                latents = self.scheduler.step(noise, t, latents).prev_sample

        # 7. Decode.
        images = self.decode(latents)
        shift = (text - text_start).flatten(1).norm(dim=1)
        return SamplerOutput(images, shift, guided_steps, time.perf_counter() - started)

    def noise(self, latents: torch.Tensor, t, text: torch.Tensor, au: torch.Tensor | None) -> torch.Tensor:
        """The UNet's noise prediction, with the AU condition when an adapter is attached."""
        extra = au_condition(au) if au is not None else {}
        return self.unet(self.scheduler.scale_model_input(latents, t), t, text, return_dict=False, **extra)[0]

    def invert(self, images: torch.Tensor, prompts: list[str] | None = None, num_inference_steps: int = 50,
               au: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion (layout initialisation): (N, 3, H, W) images in [-1, 1] -> the latents at the last
        timestep that DDIM denoises back to them, with `prompts` (default: empty) as the conditioning."""
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        inverse.set_timesteps(num_inference_steps, device=self.device)
        if self.n_aus is not None and au is None:
            au = unconditional_au(len(images), self.n_aus, self.device)
        with torch.no_grad():
            latents = self.vae.encode(images.to(self.device)).latent_dist.mean * self.vae.config.scaling_factor
            text = self.encode_prompts(prompts or [""] * len(images))
            for t in inverse.timesteps:
                latents = inverse.step(self.noise(latents, t, text, au), t, latents).prev_sample
        return latents
