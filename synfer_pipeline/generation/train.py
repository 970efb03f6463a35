"""Fine-tuning the Stable Diffusion UNet on FEText (SynFER's two stages) with the usual noise-prediction loss.

Stage 1 trains on all of FEText; stage 2 continues from stage 1's output folder with `native_hr_only=True`
(CelebA-HQ and FFHQ in the paper). VAE and text encoder are frozen. The output is a complete diffusers folder
(the base pipeline's other components + the trained UNet, float32 safetensors) that
`StableDiffusionPipeline.from_pretrained(output_dir)` loads as is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from transformers import CLIPTextModel, CLIPTokenizer

from synfer_pipeline.generation.loop import SampleRandomness, TrainJob, run_training
from synfer_pipeline.generation.settings import TrainReport, TrainSettings
from synfer_pipeline.io.storage import atomic_folder
from synfer_pipeline.io.versions import model_fingerprint, weights_version

__all__ = ["SDComponents", "NoiseLoss", "TrainReport", "TrainSettings", "from_main_process", "load_components",
           "train_unet"]


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion checkpoint that training needs (all float32, on CPU, as loaded)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_components(base_model: str) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler from a diffusers folder or hub id.

    The training scheduler takes the base scheduler's config (noise schedule, prediction_type), whatever its class.
    """
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", torch_dtype=torch.float32),
        unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", torch_dtype=torch.float32),
        noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
    )


@dataclass
class NoiseLoss:
    """The noise-prediction loss of latent diffusion, for one micro-batch.

    Encodes images with the frozen VAE (sampled latents x scaling_factor) and captions with the frozen text encoder,
    noises the latents at uniform random timesteps, and regresses the UNet output on the scheduler's target:
    the noise (prediction_type "epsilon") or the velocity ("v_prediction"). MSE, optionally min-SNR weighted.
    `extra_inputs(batch)` adds UNet keyword arguments (the AU adapter's `added_cond_kwargs`).
    """

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    scheduler: DDPMScheduler
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    extra_inputs: Callable[[dict], dict] | None = None

    def __call__(self, unet: torch.nn.Module, batch: dict, randomness: SampleRandomness) -> torch.Tensor:
        device = batch["pixel_values"].device
        with torch.no_grad():
            # the first parameter's dtype: `vae.dtype` walks every module, a visible cost per step on small models
            pixels = batch["pixel_values"].to(next(self.vae.parameters()).dtype)
            posterior = self.vae.encode(pixels).latent_dist
            shape = tuple(posterior.mean.shape[1:])
            latents = (posterior.mean + posterior.std * randomness.randn(shape, device).to(posterior.mean.dtype)).float()
            latents = latents * self.vae.config.scaling_factor
            text = self.text_encoder(batch["input_ids"], return_dict=False)[0]
        c = latents.shape[1]
        noise = randomness.randn(shape, device)
        if self.noise_offset:
            noise = noise + self.noise_offset * randomness.randn((c, 1, 1), device)
        timesteps = randomness.randint(self.scheduler.config.num_train_timesteps, device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = self._target(latents, noise, timesteps)
        extra = self.extra_inputs(batch) if self.extra_inputs is not None else {}
        prediction = unet(noisy, timesteps, text, return_dict=False, **extra)[0].float()
        if self.snr_gamma is None:
            return F.mse_loss(prediction, target)
        return self._min_snr_loss(prediction, target, timesteps)

    def _target(self, latents, noise, timesteps) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")

    def _min_snr_loss(self, prediction, target, timesteps) -> torch.Tensor:
        # Min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction.
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.clamp(snr, max=self.snr_gamma)
        weights = weights / (snr + 1 if self.scheduler.config.prediction_type == "v_prediction" else snr)
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=list(range(1, prediction.ndim)))
        return (per_sample * weights).mean()


def train_unet(settings: TrainSettings, shard_urls: list[str], base_model: str, output_dir: Path, state_dir: Path,
               on_checkpoint: Callable[[Path], None] | None = None,
               log: Callable[[dict], None] | None = None) -> TrainReport:
    """Fine-tune the UNet of `base_model` (hub id or local diffusers folder) on FEText shards.

    shard_urls: FEText tar shards (local paths or s3:// urls); state_dir: where resumable checkpoints live (the run
    resumes from the newest complete one there); output_dir: receives the finished diffusers folder — base
    components + trained UNet in float32 safetensors (with EMA: `unet/` holds the EMA weights, `unet_nonema/` the
    raw ones) + `training.json`. `on_checkpoint(folder)` / `log(record)` run on the main process.
    Returns the TrainReport; its data_version is the sha256 over the output's safetensors files.
    """
    set_seed(settings.seed)
    parts = load_components(base_model)
    parts.unet.train()
    parts.unet.requires_grad_(True)
    loss = NoiseLoss(parts.vae, parts.text_encoder, parts.noise_scheduler, settings.noise_offset, settings.snr_gamma)
    job = TrainJob(model=parts.unet, parameters=[p for p in parts.unet.parameters()],
                   frozen=[parts.vae, parts.text_encoder], loss=loss, tokenizer=parts.tokenizer,
                   fingerprint={"base_model": model_fingerprint(base_model), "job": "unet"})
    result = run_training(settings, job, shard_urls, Path(state_dir), on_checkpoint, log)
    accelerator, unet = result.accelerator, result.model
    data_version = ""
    if accelerator.is_main_process:
        with atomic_folder(output_dir) as tmp:
            _write_pipeline(tmp, base_model, unet, result.ema)
            meta = {"base_model": str(base_model), "shard_urls": list(shard_urls), "settings": settings.to_dict(),
                    "steps": result.report.steps, "samples_seen": result.report.samples_seen}
            (tmp / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        data_version = weights_version(output_dir)
    data_version = from_main_process(accelerator, data_version)
    return replace(result.report, data_version=data_version, output_dir=str(output_dir))


def from_main_process(accelerator, value):
    """`value` as the main process has it, on every process (after all of them got here)."""
    accelerator.wait_for_everyone()
    return broadcast_object_list([value])[0] if accelerator.num_processes > 1 else value


def _write_pipeline(folder: Path, base_model: str, unet: UNet2DConditionModel, ema) -> None:
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.float()  # master weights are float32 under autocast; this makes the saved dtype a guarantee
    if ema is not None:
        unet.save_pretrained(folder / "unet_nonema", safe_serialization=True)
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        # The other components come from the base checkpoint (float32), not the half-precision training copies.
        pipe = StableDiffusionPipeline.from_pretrained(base_model, unet=unet, dtype=torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        if ema is not None:
            ema.restore(unet.parameters())
