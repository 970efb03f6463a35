"""MLLMCaptioner: FEText captions from a multimodal LLM, loaded and run through transformers.

The paper captions FEText with ShareGPT-4V prompted to describe a face's expression. This module runs any
image-text-to-text checkpoint that transformers loads with `AutoModelForImageTextToText` and `AutoProcessor`
(LLaVA, LLaVA-NeXT, Qwen2-VL, ShareGPT-4V in its LLaVA-HF conversion, ...), through the processor's own chat
template, batched, with the generation settings that determine a caption recorded beside every caption.
(In transformers 5.x, processors with a video part, e.g. Qwen2-VL's, load only where torchvision is installed.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from synfer_pipeline.io.versions import model_fingerprint
from synfer_pipeline.settings import settings

# FEText captions (supplementary Fig. 4) open with the expression, walk through the face part by part and close
# with what the expression conveys; the prompt asks for exactly that order.
DEFAULT_PROMPT = (
    "Describe the facial expression of the person in this image in one paragraph. "
    "Begin with the overall expression, for example: \"The woman in the image is displaying a neutral facial "
    "expression.\" Then describe, one by one, the eyes, the nose, the cheeks, the mouth and lips, the eyebrows and "
    "the direction of the gaze. End with what the overall expression conveys (for example neutrality, happiness, "
    "sadness, surprise, fear, disgust or anger). Describe only what is visible on the face."
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that only change a caption when sampling; greedy and beam search ignore them.
_SAMPLING_ONLY = ("temperature", "top_p", "seed")


class CaptionerLoadError(OSError):
    """The captioning model or its processor cannot be loaded or used (the message names the model)."""


@settings
class GenerationSettings:
    """How captions are decoded. Greedy by default (do_sample=False), which makes captions reproducible.

    temperature, top_p and seed act only when do_sample is True (seed: `torch.manual_seed` before each batch);
    batch_size is how many images go through one `generate` call and changes speed, not the captions.
    """

    max_new_tokens: int = 160
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens, num_beams and batch_size must be >= 1: {self}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0: {self}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`; sampling parameters only when sampling."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def caption_fields(self) -> dict:
        """The settings that determine a caption: all but batch_size, and without the sampling-only ones when greedy."""
        fields = asdict(self)
        del fields["batch_size"]
        if not self.do_sample:
            for name in _SAMPLING_ONLY:
                del fields[name]
        return fields


def _short_hash(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _looks_like_path(model_id_or_path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything absolute, relative-dotted or deeper is a folder on disk.
    return (
        os.path.isabs(model_id_or_path) or model_id_or_path.startswith((".", "~"))
        or model_id_or_path.count("/") > 1 or os.sep != "/" and os.sep in model_id_or_path
    )


class MLLMCaptioner:
    """Captions face images with a multimodal LLM: one prompt, one chat turn per image, batched generation.

    Build it with `from_pretrained(model_id_or_path, ...)`, or pass an already loaded model and processor
    (the processor's tokenizer is switched to left padding).
    `caption(images)` returns one stripped string per image; `describe()` is the lineage record to store with
    the captions and `cache_key` identifies what determines them (model, prompt, dtype, generation settings).
    """

    def __init__(
        self,
        model,
        processor,
        model_id: str,
        prompt: str = DEFAULT_PROMPT,
        generation: GenerationSettings = GenerationSettings(),
    ):
        self.model = model.eval()
        self.processor = processor
        self.model_id = str(model_id)
        self.prompt = prompt
        self.generation = generation
        self._fingerprint: str | None = None
        # The weights' dtype, read from the model so that the record cannot disagree with what ran.
        self.torch_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        self._prompt_text = self._render_prompt()
        tokenizer = processor.tokenizer
        # Decoder-only models continue the last position: batched prompts must be padded on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            # Llama-family tokenizers ship without a pad token; padded positions are masked out anyway.
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        prompt: str = DEFAULT_PROMPT,
        generation: GenerationSettings = GenerationSettings(),
        device: str = "cpu",
        dtype: str = "float32",
        local_files_only: bool = False,
        trust_remote_code: bool = False,
    ) -> MLLMCaptioner:
        """Load a hub id or local checkpoint folder with `AutoModelForImageTextToText` and `AutoProcessor`.

        device: a torch device string ("cpu", "cuda", "cuda:1"); dtype: "float32", "float16" or "bfloat16".
        trust_remote_code runs Python code shipped with the checkpoint: off unless asked for.
        Raises `CaptionerLoadError` naming the model when it cannot be loaded or has no chat template.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
        model_id_or_path = str(model_id_or_path)
        source = model_id_or_path
        if _looks_like_path(model_id_or_path):
            source = str(Path(model_id_or_path).expanduser())  # transformers does not expand "~"
            if not Path(source).is_dir():
                raise CaptionerLoadError(f"captioning model {model_id_or_path!r}: no such checkpoint folder")
        options = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
        try:
            processor = AutoProcessor.from_pretrained(source, **options)
        except (OSError, ValueError, KeyError, AttributeError, ImportError) as exc:
            message = f"cannot load the processor of captioning model {model_id_or_path!r}: {exc}"
            raise CaptionerLoadError(message) from exc
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=_DTYPES[dtype], **options)
        except (OSError, ValueError, KeyError, AttributeError, ImportError) as exc:
            raise CaptionerLoadError(f"cannot load captioning model {model_id_or_path!r}: {exc}") from exc
        return cls(model.to(device), processor, model_id_or_path, prompt, generation)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on; inputs are moved there."""
        return next(self.model.parameters()).device

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order: `generation.batch_size` images per `generate` call.

        Images of any mode are converted to RGB; the processor resizes them. Returns the newly generated text
        of each image (prompt excluded, special tokens removed, whitespace stripped).
        """
        size = self.generation.batch_size
        captions: list[str] = []
        for start in range(0, len(images), size):
            captions.extend(self._caption_batch(images[start:start + size]))
        return captions

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        rgb = [image.convert("RGB") for image in images]
        inputs = self.processor(
            images=rgb, text=[self._prompt_text] * len(rgb), padding=True, return_tensors="pt",
        )
        # Pixel values come as float32; a half-precision vision tower needs them in its own dtype.
        inputs = {
            name: value.to(self.device, self.torch_dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in inputs.items()
        }
        if self.generation.do_sample:
            torch.manual_seed(self.generation.seed)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, **self.generation.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
            )
        # Decoder-only models return prompt + continuation; encoder-decoders return only the continuation.
        prompt_length = 0 if self.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _render_prompt(self) -> str:
        """The prompt as one user turn with the image first, in the checkpoint's own chat format."""
        if not getattr(self.processor, "chat_template", None):
            raise CaptionerLoadError(
                f"captioning model {self.model_id!r}: its processor has no chat template, so the prompt cannot be "
                "formatted as the model was trained; use an instruction-tuned checkpoint or add a chat_template"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def describe(self) -> dict:
        """The lineage record stored with every caption: model, prompt (and its hash), generation settings, dtype."""
        return {
            "kind": "mllm",
            "model": self.model_id,
            "weights": self.fingerprint,
            "prompt": self.prompt,
            "prompt_hash": _short_hash(self.prompt),
            "generation": asdict(self.generation),
            "dtype": self.dtype,
            "cache_key": self.cache_key,
        }

    @property
    def fingerprint(self) -> str:
        """The weights' identity (`io.versions.model_fingerprint`): new weights at the same path re-caption."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_id)
        return self._fingerprint

    @property
    def cache_key(self) -> str:
        """A 16-hex-digit hash of what determines a caption: model id and weights, prompt, dtype, `caption_fields()`.

        Changing the batch size (or, when greedy, the sampling-only settings) keeps the key, so images
        captioned before are not captioned again.
        """
        material = {
            "model": self.model_id, "weights": self.fingerprint, "prompt": self.prompt, "dtype": self.dtype,
            "generation": self.generation.caption_fields(),
        }
        return _short_hash(json.dumps(material, sort_keys=True), 16)
