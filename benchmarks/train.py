"""Training-loop benchmark: `python benchmarks/train.py [--workers N] [--repeats N]`.

Measures optimizer steps per second of `train_unet` (streaming FEText shards, tokenising, accelerate, the
resumable bookkeeping) against a minimal plain diffusers loop on the same tiny model, batch size and data, with
that data held in memory as tensors (plain AdamW + noise-prediction loss + the same clipping, nothing else), on
the GPU when there is one, else on the CPU with one compute thread each. Both run in this process after a warm-up,
alternating, keeping the best of a few repeats (the tiny model's step is bound by Python on the host, whose speed
varies from run to run by more than the difference measured). Checkpointing is off for the measurement
(checkpointing_steps=None). Both loops clip gradients at norm 1 (train_unet's default) and compute the same loss;
caption dropout stays on in `train_unet` (it costs nothing). `train_unet` decodes in `--workers` DataLoader
workers (prefetch). Ends with `train_ratio: X` = ours / plain; the goal is >= 0.95 (streaming and bookkeeping
cost under 5%).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # the toy FEText writer the tests use
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the parent has tokenised

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fetext_fixtures import write_toy_fetext  # noqa: E402

from synfer_pipeline.demo.tiny_sd import save_tiny_sd  # noqa: E402
from synfer_pipeline.generation.data import BatchFeed, StreamSpec  # noqa: E402
from synfer_pipeline.generation.settings import TrainSettings  # noqa: E402
from synfer_pipeline.generation.train import (
    load_components,  # noqa: E402
    train_unet,  # noqa: E402
)

BATCH, WARMUP, STEPS = 4, 10, 100
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def in_memory_batches(urls: list[str], tokenizer) -> list[dict]:
    """Every sample of the shards decoded once into (pixel_values, input_ids) batches of BATCH, on DEVICE."""
    spec = StreamSpec(tuple(urls), resolution=64, batch_size=BATCH)
    feed = BatchFeed(spec, tokenizer)
    batches = []
    for batch in feed:
        if batch["epoch"] > 0 or len(batch["keys"]) < BATCH:
            break
        batches.append({k: batch[k].to(DEVICE) for k in ("pixel_values", "input_ids")})
    feed.close()
    return batches


def plain_steps_per_s(base: str, batches: list[dict], max_grad_norm: float | None = 1.0) -> float:
    """A minimal diffusers fine-tuning loop: frozen VAE/text encoder, AdamW on the UNet, epsilon MSE, and the
    same gradient clipping as train_unet's settings (the same arithmetic; what differs is the bookkeeping)."""
    parts = load_components(base)
    vae, text_encoder, unet, scheduler = parts.vae, parts.text_encoder, parts.unet, parts.noise_scheduler
    vae.requires_grad_(False).to(DEVICE)
    text_encoder.requires_grad_(False).to(DEVICE)
    unet.train().to(DEVICE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    start = 0.0
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            _sync()
            start = time.perf_counter()
        batch = batches[step % len(batches)]
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            text = text_encoder(batch["input_ids"], return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=DEVICE)
        pred = unet(scheduler.add_noise(latents, noise, t), t, text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return STEPS / (time.perf_counter() - start)


def ours_steps_per_s(base: str, urls: list[str], work: Path, run: int, workers: int,
                     max_grad_norm: float | None = 1.0) -> float:
    """`train_unet` from the shards; steps/s from the end of warm-up step WARMUP to the last step."""
    stamps: dict[int, float] = {}
    settings = TrainSettings(resolution=64, train_batch_size=BATCH, max_train_steps=WARMUP + STEPS,
                             learning_rate=1e-4, lr_warmup_steps=5, checkpointing_steps=None,
                             dataloader_num_workers=workers, max_grad_norm=max_grad_norm)
    # log runs after each step's loss reached the host, so its timestamps are synchronised with the device
    train_unet(settings, urls, base, work / f"out{run}", work / f"state{run}",
               log=lambda record: stamps.__setitem__(record["step"], time.perf_counter()))
    return STEPS / (stamps[WARMUP + STEPS] - stamps[WARMUP])


def main() -> None:
    """Run both loops `--repeats` times and print the summary lines, `train_ratio` last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of train_unet (prefetch)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)  # both loops compute on one thread; the shared machine's other core stays free
    with tempfile.TemporaryDirectory(prefix="synfer-train-bench-") as tmp:
        work = Path(tmp)
        base = str(save_tiny_sd(work / "base"))
        urls = write_toy_fetext(work / "fetext", n=64, per_shard=16)
        batches = in_memory_batches(urls, load_components(base).tokenizer)
        plain, ours = [], []
        for run in range(args.repeats):  # alternate, so a busy moment on the machine hits both
            plain.append(plain_steps_per_s(base, batches))
            ours.append(ours_steps_per_s(base, urls, work, run, args.workers))
            print(f"# repeat {run}: plain {plain[-1]:.2f} steps/s, train_unet {ours[-1]:.2f} steps/s", flush=True)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"# device: {name}; tiny SD at 64 px, batch {BATCH}, {STEPS} timed steps after {WARMUP} warm-up, "
          f"best of {args.repeats}")
    print(f"# train_unet: shards streamed, decoded in {args.workers} DataLoader worker(s), checkpointing OFF "
          "(checkpointing_steps=None), grad clipping 1.0, caption dropout 0.1")
    print("# plain: pre-decoded tensors in memory, AdamW, epsilon MSE, grad clipping 1.0, no accelerate")
    paired = sorted(o / p for o, p in zip(ours, plain))
    print(f"# median of the {args.repeats} paired ratios: {paired[len(paired) // 2]:.3f} (shows the machine's noise)")
    print(f"plain_steps_per_s: {max(plain):.3f}")
    print(f"train_unet_steps_per_s: {max(ours):.3f}")
    print(f"train_ratio: {max(ours) / max(plain):.3f}")


if __name__ == "__main__":
    main()
