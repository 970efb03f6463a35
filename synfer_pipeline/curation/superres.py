"""Super-resolution of low-resolution face crops to the training resolution (FEText's "super-resolved" subsets).

Native high-resolution sources (FFHQ, CelebA-HQ) pass through untouched: their bytes are copied when they are
already at the training resolution, or resized down with Lanczos when larger. Low-resolution sources go through
the configured upscaler, batched, then to the exact resolution with Lanczos. Upscalers (the `superres` model role):

    {kind: transformers, id: caidas/swin2SR-classical-sr-x2-64}    Swin2SRForImageSuperResolution family
    {kind: diffusers, id: stabilityai/stable-diffusion-x4-upscaler, prompt: "a photo of a face", steps: 20}
    {kind: lanczos}                                                 classical resampling (the demo's honest fallback)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import Field, TypeAdapter

from synfer_pipeline.io.datasets import Sample, image_member, open_image
from synfer_pipeline.io.images import encode_jpeg
from synfer_pipeline.io.versions import model_fingerprint
from synfer_pipeline.settings import settings
from synfer_pipeline.torch_utils import resolve_device, resolve_dtype


@settings
class SuperResSettings:
    resolution: int = 512     # side of every output image, pixels (the diffusion training resolution)
    batch_size: int = 8
    jpeg_quality: int = 95


class Upscaler(Protocol):
    def upscale(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Larger versions of the images (any factor); the caller resizes to the exact resolution."""

    def describe(self) -> dict: ...


class LanczosUpscaler:
    """No model: the final Lanczos resize is the whole upscaling. Named as what it is in every record."""

    def upscale(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        return list(images)

    def describe(self) -> dict:
        return {"kind": "lanczos", "model": None}


class TransformersUpscaler:
    """Swin2SR-family models through transformers (`Swin2SRForImageSuperResolution` + its image processor)."""

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32", local_files_only: bool = False):
        from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

        self.model_id, self.device = model_id, resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_id, local_files_only=local_files_only)
            self.model = Swin2SRForImageSuperResolution.from_pretrained(model_id, local_files_only=local_files_only)
        except OSError as e:
            raise OSError(f"super-resolution model {model_id!r} could not be loaded: {e}") from e
        self.model.to(self.device, self.dtype).eval()
        self.scale = int(self.model.config.upscale)

    @torch.inference_mode()
    def upscale(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        if not images:
            return []
        sizes = [im.size for im in images]
        if len(set(sizes)) > 1:  # a batch must share one size; crops of one source normally do
            return [im for group in images for im in self.upscale([group])]
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        out = self.model(pixel_values=pixels).reconstruction.float().clamp(0, 1)
        w, h = sizes[0]
        out = out[:, :, : h * self.scale, : w * self.scale]  # the processor pads to the window size: crop it off
        arr = (out.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    def describe(self) -> dict:
        return {"kind": "transformers", "model": self.model_id, "weights": model_fingerprint(self.model_id),
                "scale": self.scale, "dtype": str(self.dtype)}


class DiffusersUpscaler:
    """A diffusers upscaling pipeline (e.g. stable-diffusion-x4-upscaler), text-conditioned by a fixed prompt."""

    def __init__(self, model_id: str, device: str = "cpu", dtype: str = "float32", prompt: str = "a photo of a face",
                 steps: int = 20, seed: int = 0, local_files_only: bool = False):
        from diffusers import DiffusionPipeline

        self.model_id, self.prompt, self.steps, self.seed = model_id, prompt, steps, seed
        self.device = resolve_device(device)
        try:
            self.pipe = DiffusionPipeline.from_pretrained(model_id, torch_dtype=resolve_dtype(dtype, self.device),
                                                          local_files_only=local_files_only)
        except OSError as e:
            raise OSError(f"super-resolution pipeline {model_id!r} could not be loaded: {e}") from e
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def upscale(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        if not images:
            return []
        generator = torch.Generator(self.device).manual_seed(self.seed)
        out = self.pipe(prompt=[self.prompt] * len(images), image=list(images), num_inference_steps=self.steps,
                        generator=generator)
        return list(out.images)

    def describe(self) -> dict:
        return {"kind": "diffusers", "model": self.model_id, "weights": model_fingerprint(self.model_id),
                "prompt": self.prompt, "steps": self.steps, "seed": self.seed}


@settings
class LanczosSpec:
    """No model: classical resampling, named as such in every record."""

    kind: Literal["lanczos"] = "lanczos"


@settings
class TransformersSRSpec:
    """A Swin2SR-family model by hub id or local folder."""

    id: str
    kind: Literal["transformers"] = "transformers"
    local_files_only: bool = False


@settings
class DiffusersSRSpec:
    """A diffusers upscaling pipeline by hub id or local folder, conditioned by a fixed prompt."""

    id: str
    kind: Literal["diffusers"] = "diffusers"
    prompt: str = "a photo of a face"
    steps: int = Field(20, ge=1)
    seed: int = 0
    local_files_only: bool = False


UpscalerSpec = Annotated[LanczosSpec | TransformersSRSpec | DiffusersSRSpec, Field(discriminator="kind")]
_UPSCALER_SPEC = TypeAdapter(UpscalerSpec)


def load_upscaler(spec: UpscalerSpec | dict | None, device: str = "cpu", dtype: str = "float32") -> Upscaler:
    """The `superres` model role from its profile entry (see the module docstring); a dict is validated first."""
    spec = _UPSCALER_SPEC.validate_python(spec if spec is not None else {"kind": "lanczos"})
    if isinstance(spec, TransformersSRSpec):
        return TransformersUpscaler(spec.id, device, dtype, local_files_only=spec.local_files_only)
    if isinstance(spec, DiffusersSRSpec):
        return DiffusersUpscaler(spec.id, device, dtype, prompt=spec.prompt, steps=spec.steps, seed=spec.seed,
                                 local_files_only=spec.local_files_only)
    return LanczosUpscaler()


def superresolve_samples(samples: list[Sample], upscaler: Upscaler, settings: SuperResSettings, native_hr: bool):
    """Raw face samples -> training-resolution samples (key, members, index row), in batches."""
    out, method = [], upscaler.describe()
    for start in range(0, len(samples), settings.batch_size):
        batch = samples[start:start + settings.batch_size]
        images = [open_image(image_member(m)) for _, m in batch]
        needs_sr = [not native_hr and min(im.size) < settings.resolution for im in images]
        upscaled = iter(upscaler.upscale([im for im, sr in zip(images, needs_sr) if sr]))
        for (key, members), img, sr in zip(batch, images, needs_sr):
            meta = json.loads(members["json"])
            if native_hr and img.size == (settings.resolution, settings.resolution):
                data, how = image_member(members), "untouched"
            else:
                big = next(upscaled) if sr else img
                final = big.resize((settings.resolution, settings.resolution), Image.Resampling.LANCZOS)
                data, how = encode_jpeg(final, settings.jpeg_quality), (method["kind"] if sr else "lanczos-down")
            row = {"sample_id": meta["sample_id"], "source": meta["source"], "split": meta["split"],
                   "label": meta["label"], "label_index": meta["label_index"], "native_hr": native_hr,
                   "input_px": img.size[0], "output_px": settings.resolution, "superres": how}
            new = {"jpg": data, "json": {**meta, **row, "superres_model": method.get("model")}}
            if "cls" in members:
                new["cls"] = members["cls"]
            out.append((key, new, row))
    return out
