"""Sampler throughput against diffusers, and the cost of semantic guidance, with one tiny model in one process.

    python benchmarks/generate.py [--n 8] [--steps 50] [--repeats 3] [--device cpu]

In the same process, on the same tiny Stable Diffusion (random weights, `demo.tiny_sd`), the same starting latents
and the same DDIM steps with classifier-free guidance:
  baseline   -- diffusers' `StableDiffusionPipeline.__call__`
  ours       -- `SynferSampler` without AUs or guidance
  guided     -- ours with semantic guidance in the last 5 of 50 steps (the paper's K), x0 decoded by the full VAE,
                then by a tiny autoencoder (`AutoencoderTiny`, scaling factor 1.0)
Each measurement alternates with its baseline `--repeats` times and keeps the median (machines here are noisy).
Ends with `sampler_ratio: X` (ours images/s over diffusers', goal >= 1.0), `guidance_overhead: Y` (guided with the
tiny autoencoder over unguided, goal <= 1.25) and `guidance_overhead_vae: Z` (with the full VAE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderTiny, StableDiffusionPipeline  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification  # noqa: E402

from synfer_pipeline.demo.tiny_sd import save_tiny_sd  # noqa: E402
from synfer_pipeline.fer.role import FERClassifier  # noqa: E402
from synfer_pipeline.generation.guidance import GuidanceSettings  # noqa: E402
from synfer_pipeline.generation.sampler import SynferSampler  # noqa: E402
from synfer_pipeline.vocab import EXPRESSIONS_7  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="images per call")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--last-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_sd(Path(tmp) / "sd")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        halvings = len(pipe.vae.config.block_out_channels) - 1
        tiny = AutoencoderTiny(encoder_block_out_channels=(16,) * (halvings + 1), num_encoder_blocks=(1,) * (halvings + 1),
                               decoder_block_out_channels=(32,) * (halvings + 1), num_decoder_blocks=(1,) * (halvings + 1),
                               latent_channels=pipe.vae.config.latent_channels).to(args.device)
        sampler = SynferSampler.from_pretrained(folder, device=args.device)
        sampler.tiny_decoder = tiny.requires_grad_(False).eval()
    net = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                    num_labels=7))
    guide = FERClassifier(net, EXPRESSIONS_7, 64, name="guide").frozen().to(args.device)

    prompts = ["a close-up photo of a face showing a happy expression"] * args.n
    seeds = list(range(args.n))
    latents = sampler.initial_latents(seeds, sampler.resolution, sampler.resolution)
    targets = torch.tensor([1] * args.n)

    def diffusers_call():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, latents=latents.clone(), output_type="pt")

    def ours(guidance=None):
        return lambda: sampler(prompts, seeds, num_inference_steps=args.steps, guidance_scale=7.5,
                               latents=latents.clone(), guide=guide if guidance else None, targets=targets,
                               guidance=guidance)

    vae_guided = GuidanceSettings(scale=0.05, last_steps=args.last_steps, decoder="vae")
    tiny_guided = GuidanceSettings(scale=0.05, last_steps=args.last_steps, decoder="tiny")
    # Same images: our loop draws what diffusers draws from the same latents (a sanity check, not a timing).
    with torch.no_grad():
        reference = pipe(prompts[:2], num_inference_steps=4, guidance_scale=7.5, latents=latents[:2].clone(),
                         output_type="pt").images
    ours_images = sampler(prompts[:2], seeds[:2], num_inference_steps=4, guidance_scale=7.5,
                          latents=latents[:2].clone()).images
    max_diff = float(((ours_images + 1) / 2 - reference.cpu()).abs().max())

    diffusers_call(), ours()(), ours(vae_guided)(), ours(tiny_guided)()  # warm-up
    times = {"diffusers": [], "ours": [], "guided_vae": [], "guided_tiny": []}
    for _ in range(args.repeats):
        times["diffusers"].append(_timed(diffusers_call))
        times["ours"].append(_timed(ours()))
        times["guided_vae"].append(_timed(ours(vae_guided)))
        times["guided_tiny"].append(_timed(ours(tiny_guided)))
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, seconds in median.items():
        print(f"{name:12s} {seconds:7.3f} s per call of {args.n} images, {args.steps} steps "
              f"({args.n / seconds:6.2f} images/s)")
    print(f"images: ours against diffusers on the same latents, max |difference| {max_diff:.2e} (pixels in [0, 1])")
    print(f"sampler_ratio: {median['diffusers'] / median['ours']:.3f}")
    print(f"guidance_overhead: {median['guided_tiny'] / median['ours']:.3f}")
    print(f"guidance_overhead_vae: {median['guided_vae'] / median['ours']:.3f}")


if __name__ == "__main__":
    main()
