"""The demo's autoencoder: a small AutoencoderKL trained on toy faces, the stand-in for Stable Diffusion's pretrained VAE.

Stable Diffusion fine-tuning keeps its VAE frozen, so whatever the demo's generator learns is capped by how well the
autoencoder keeps an expression. At 64 px an 8x autoencoder (8x8 latents) loses it; this one downsamples 4x
(16x16x4 latents), has no mid-block attention, starts its log-variance near zero variance (bias -6) and is trained
with MSE plus a half-weighted L1 that counts the face's centre (eyes, brows, mouth) more than the background, and a
tiny KL term. Its `scaling_factor` is set so that scaled latents of toy faces have unit variance, as SD's is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from synfer_pipeline.settings import settings


@settings
class AutoencoderSettings:
    """resolution: image side (px); blocks: channels per encoder block (len(blocks) - 1 halvings); steps, batch_size,
    lr: AdamW training; kl_weight: weight of the KL term; centre_weight: extra loss weight at the face centre."""

    resolution: int = 64
    blocks: tuple[int, ...] = (8, 16, 32)
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 8
    lr: float = 2e-3
    kl_weight: float = 1e-6
    centre_weight: float = 2.0
    seed: int = 0


def build_autoencoder(cfg: AutoencoderSettings) -> AutoencoderKL:
    """A fresh AutoencoderKL downsampling 2^(len(blocks)-1) times, without mid-block attention."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(cfg.blocks),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.blocks), block_out_channels=tuple(cfg.blocks),
        layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=cfg.resolution,
        mid_block_add_attention=False,
    )
    with torch.no_grad():  # log-variance starts near zero variance: early latents are nearly deterministic
        vae.encoder.conv_out.bias[cfg.latent_channels:] = -6.0
    return vae


def _centre_weight(resolution: int, extra: float) -> torch.Tensor:
    """(1, 1, R, R) weights: 1 everywhere plus `extra` in a Gaussian over the face's centre."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    bump = torch.exp(-((xx / 0.45) ** 2 + ((yy - 0.05) / 0.5) ** 2))
    weight = 1 + extra * bump
    return (weight / weight.mean())[None, None]


def images_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) float32 in [-1, 1] (bicubic resize)."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_autoencoder(images: Sequence[Image.Image], cfg: AutoencoderSettings,
                      progress: Callable[[int, float], None] = lambda step, loss: None) -> tuple[AutoencoderKL, dict]:
    """Train the autoencoder on `images`; returns (vae with its scaling_factor set, report {loss, psnr, seconds})."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_autoencoder(cfg)
        data = images_tensor(images, cfg.resolution)
        weight = _centre_weight(cfg.resolution, cfg.centre_weight)
        optimiser = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
        gen = torch.Generator().manual_seed(cfg.seed)
        vae.train()
        for step in range(cfg.steps):
            batch = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]
            batch = torch.where(torch.rand(len(batch), 1, 1, 1, generator=gen) < 0.5, batch.flip(-1), batch)
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            err = recon - batch
            loss = (weight * (err**2 + 0.5 * err.abs())).mean() + cfg.kl_weight * posterior.kl().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            progress(step + 1, loss.item())
        vae.eval()
        with torch.no_grad():
            latents = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
            recon = torch.cat([vae.decode(latents[i:i + 64]).sample for i in range(0, len(latents), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    mse = float(((recon.clamp(-1, 1) - data) / 2).pow(2).mean())
    return vae, {"psnr_db": round(10 * math.log10(1 / mse), 2), "steps": cfg.steps,
                 "seconds": round(time.perf_counter() - started, 1), "scaling_factor": vae.config.scaling_factor}


def train_tiny_decoder(vae: AutoencoderKL, images: Sequence[Image.Image], steps: int = 150, batch_size: int = 8,
                       lr: float = 2e-3, seed: int = 0):
    """The demo's `AutoencoderTiny` (TAESD's architecture, small): its decoder learns to map the autoencoder's
    scaled latents (as the UNet sees them; scaling factor 1.0) to the images, the fast x0 decoder of semantic
    guidance. Returns (AutoencoderTiny, report {psnr_db, steps, seconds}); its encoder is left untrained."""
    from diffusers import AutoencoderTiny

    started = time.perf_counter()
    halvings = len(vae.config.block_out_channels) - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # One block per level and 24 channels (TAESD's decoder keeps one width throughout): about 50k parameters.
        tiny = AutoencoderTiny(encoder_block_out_channels=(8,) * (halvings + 1), num_encoder_blocks=(1,) * (halvings + 1),
                               decoder_block_out_channels=(24,) * (halvings + 1), num_decoder_blocks=(1,) * (halvings + 1),
                               latent_channels=vae.config.latent_channels)
        data = images_tensor(images, vae.config.sample_size)
        with torch.no_grad():
            latents = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
        latents = latents * vae.config.scaling_factor
        optimiser = torch.optim.AdamW(tiny.decoder.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        tiny.train()
        for _ in range(steps):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            loss = (tiny.decode(latents[idx]).sample - data[idx]).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        tiny.eval()
        with torch.no_grad():
            recon = torch.cat([tiny.decode(latents[i:i + 64]).sample for i in range(0, len(latents), 64)])
    tiny.requires_grad_(False)
    mse = float(((recon.clamp(-1, 1) - data) / 2).pow(2).mean())
    return tiny, {"psnr_db": round(10 * math.log10(1 / mse), 2), "steps": steps,
                  "seconds": round(time.perf_counter() - started, 1)}
