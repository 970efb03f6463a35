"""Semantic guidance (SynFER): steer the last denoising steps towards the target expression with an FER classifier.

At a guided step: predict x0 from the noisy latent and the conditional noise prediction, decode it (full VAE, or a
tiny autoencoder for speed), let the guide classify it (it clamps, resizes and normalises as it expects), take the
cross-entropy to the target label, and move the text conditioning against its gradient by a normalised step:
c <- c - scale * g / ||g||, the norm taken per sample (the paper's form); the moved conditioning is carried into the
later steps. `form: latent` moves the latent instead. The guide is passed in (any differentiable module from images
in [-1, 1] to logits over `vocab.EXPRESSIONS`) and must not be the classifier that judges the result.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from synfer_pipeline.settings import settings


@settings
class GuidanceSettings:
    """scale: the step size lambda (0: no guidance; the paper sweeps it: too large destroys the image); last_steps: K, guidance runs in the last K of the denoising steps
    (the paper: 5 of 50); form: `text` (the paper) or `latent`; decoder: `vae`, or `tiny` (the tiny autoencoder)."""

    scale: float = 1.0
    last_steps: int = 5
    form: Literal["text", "latent"] = "text"
    decoder: Literal["vae", "tiny"] = "vae"


def predicted_x0(scheduler, latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t) for an epsilon-predicting model (a_t: cumulative alpha)."""
    alpha = scheduler.alphas_cumprod[int(t)].to(latents.device, latents.dtype)
    return (latents - (1 - alpha).sqrt() * noise) / alpha.sqrt()


def normalised_step(value: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    """value - scale * grad / ||grad||, the norm per sample (over every dimension but the first)."""
    norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return value - scale * grad / norm


def semantic_guidance(sampler, latents: torch.Tensor, t, text: torch.Tensor, au: torch.Tensor | None,
                      guide: torch.nn.Module, targets: torch.Tensor, cfg: GuidanceSettings):
    """One guided step; returns (text, latents), one of them moved, both detached."""
    if sampler.scheduler.config.prediction_type != "epsilon":
        raise ValueError("semantic guidance needs an epsilon-predicting model")
    with torch.enable_grad():
        text_in = text.detach().requires_grad_(cfg.form == "text")
        latents_in = latents.detach().requires_grad_(cfg.form == "latent")
        noise = sampler.noise(latents_in, t, text_in, au)
        x0 = predicted_x0(sampler.scheduler, latents_in, noise, t)
        if cfg.decoder == "tiny":
            if sampler.tiny_decoder is None:
                raise ValueError("guidance with decoder 'tiny' needs a tiny autoencoder (tiny_decoder_dir)")
            images = sampler.tiny_decoder.decode(x0).sample
        else:
            images = sampler.vae.decode(x0 / sampler.vae.config.scaling_factor).sample
        loss = F.cross_entropy(guide(images.clamp(-1, 1)), targets.to(images.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, text_in if cfg.form == "text" else latents_in)
    if cfg.form == "text":
        return normalised_step(text.detach(), grad, cfg.scale), latents.detach()
    return text.detach(), normalised_step(latents.detach(), grad, cfg.scale)
