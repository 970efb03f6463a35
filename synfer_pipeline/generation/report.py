"""What a training run shows at its end: the loss curve (PNG drawn with PIL) and samples from fixed prompts."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from synfer_pipeline.io.preview import grid_image

_BG, _AXIS, _RAW, _SMOOTH = (255, 255, 255), (90, 90, 90), (170, 190, 230), (30, 70, 170)


def _smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def loss_curve_png(losses: Sequence[float], width: int = 480, height: int = 240) -> bytes:
    """The loss per step as a PNG (bytes): raw values in light blue, an exponential moving average in dark blue,
    the y range and step count written on the axes. Non-finite losses are left out; no losses gives empty axes."""
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 10, height - 22
    d.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS)
    points = [(i, float(v)) for i, v in enumerate(losses) if math.isfinite(float(v))]
    if points:
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span = (hi - lo) or 1.0
        n = max(len(losses) - 1, 1)

        def xy(i: int, v: float) -> tuple[float, float]:
            return left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span

        raw = [xy(i, v) for i, v in points]
        smooth = [xy(i, v) for (i, _), v in zip(points, _smoothed([v for _, v in points]))]
        for line, colour in ((raw, _RAW), (smooth, _SMOOTH)):
            if len(line) > 1:
                d.line(line, fill=colour, width=1 if colour == _RAW else 2)
            else:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        d.text((2, top), f"{hi:.3g}", fill=_AXIS)
        d.text((2, bottom - 10), f"{lo:.3g}", fill=_AXIS)
    d.text((left, bottom + 6), "step 1", fill=_AXIS)
    d.text((right - 60, bottom + 6), f"step {len(losses)}", fill=_AXIS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _au_embeds(au_vectors, n: int, n_aus: int, cfg: bool, device) -> list[torch.Tensor]:
    from synfer_pipeline.generation.au_adapter import unconditional_au

    rows = [torch.full((n_aus,), float("nan")) if v is None else torch.as_tensor(v, dtype=torch.float32)
            for v in (au_vectors if au_vectors is not None else [None] * n)]
    au = torch.stack(rows)
    if au.shape != (n, n_aus):
        raise ValueError(f"au_vectors must give one vector of {n_aus} values per prompt, got shape {tuple(au.shape)}")
    if cfg:  # the pipeline splits [negative, positive]: the negative branch is the learned null condition
        au = torch.cat([unconditional_au(n, n_aus), au])
    return [au[:, None].to(device)]


def sample_grid(model_dir: str | Path, prompts: list[str], seed: int, steps: int = 20,
                au_adapter_dir: str | Path | None = None, au_vectors: Sequence[Sequence[float] | None] | None = None,
                resolution: int = 64, guidance_scale: float = 7.5, columns: int | None = None) -> Image.Image:
    """One image per prompt from the saved pipeline in `model_dir`, pasted into a grid (row-major, `columns` wide;
    default about square). Image i uses its own generator seeded `seed + i`, so it does not depend on the others.

    With `au_adapter_dir`, the AU adapter is loaded onto the UNet and `au_vectors[i]` (0/1 values in the adapter's
    AU order, or None for "no AU condition") conditions image i; classifier-free guidance pairs the empty caption
    with the adapter's null condition. Returns a PIL RGB image of (rows x resolution, columns x resolution) pixels.
    """
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir)).to(device)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if au_adapter_dir is not None:
        extra["ip_adapter_image_embeds"] = _adapter_embeds(pipe, Path(au_adapter_dir), au_vectors, len(prompts),
                                                           guidance_scale > 1, device)
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution,
                  guidance_scale=guidance_scale, generator=generators, **extra).images
    return grid_image(images, thumb=None, columns=columns or math.ceil(math.sqrt(len(images))))


def _adapter_embeds(pipe, folder: Path, au_vectors, n: int, cfg: bool, device) -> list[torch.Tensor]:
    from synfer_pipeline.generation.au_adapter import BASE_MODEL_JSON, base_unet_sha256, load_au_adapter

    base_file = folder / BASE_MODEL_JSON
    if base_file.is_file():
        trained_on = json.loads(base_file.read_text()).get("unet_sha256")
        if trained_on and trained_on != base_unet_sha256(pipe.unet):
            warnings.warn(f"the AU adapter in {folder} was trained on another UNet than the one in this pipeline",
                          stacklevel=3)
    projection = load_au_adapter(pipe.unet, folder)
    n_aus = projection.mlp[0].in_features
    return _au_embeds(au_vectors, n, n_aus, cfg, device)
