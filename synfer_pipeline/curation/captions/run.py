"""Captioning a dataset: the captioner role, and a cache that makes reruns skip images already captioned.

The captioner is a multimodal LLM (`{kind: mllm, id: ..., prompt: ..., generation: {...}}`) or, for the demo, the
template captioner (`{kind: template}`), recorded as such in every row. Captions are cached per captioner key (model +
prompt + generation settings): `{cache}/{key}/part-*.parquet`, append-only, so a killed or repeated run only
captions what is missing, and a changed prompt gets a new key (and a new captions data version) while the old
captions stay where they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field, TypeAdapter

from synfer_pipeline.curation.captions.mllm import DEFAULT_PROMPT, GenerationSettings
from synfer_pipeline.curation.captions.template import TemplateCaptioner
from synfer_pipeline.io.datasets import Sample, image_member, open_image
from synfer_pipeline.io.storage import Storage
from synfer_pipeline.settings import settings

CAPTION_COLUMNS = ["key", "sample_id", "caption", "captioner", "cache_key"]


class TemplateRole:
    """The template captioner as a captioner role: captions from each image's expression and AUs, not its pixels."""

    needs_images = False

    def __init__(self, seed: int = 0, subject: str = "person"):
        self.template, self.subject = TemplateCaptioner(seed), subject

    def describe(self) -> dict:
        return {**self.template.describe(), "subject": self.subject}

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def caption(self, images, contexts: Sequence[dict]) -> list[str]:
        return [self.template.caption(c["expression"], c["aus"], subject=self.subject, key=c["key"]) for c in contexts]


class MLLMRole:
    """A multimodal LLM (transformers) as the captioner role; it reads only the pixels."""

    needs_images = True

    def __init__(self, captioner):
        self.captioner = captioner

    def describe(self) -> dict:
        return self.captioner.describe()

    @property
    def cache_key(self) -> str:
        return self.captioner.cache_key

    def caption(self, images, contexts: Sequence[dict]) -> list[str]:
        return self.captioner.caption(images)


@settings
class TemplateSpec:
    """The template captioner (demo): writes from each image's expression and AUs."""

    kind: Literal["template"] = "template"
    seed: int = 0
    subject: str = "person"


@settings
class MLLMSpec:
    """A multimodal LLM by hub id or local folder (`AutoModelForImageTextToText` + `AutoProcessor`)."""

    id: str
    kind: Literal["mllm"] = "mllm"
    prompt: str = DEFAULT_PROMPT
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    local_files_only: bool = False
    trust_remote_code: bool = False  # never on by default: it runs the checkpoint's own Python code


CaptionerSpec = Annotated[TemplateSpec | MLLMSpec, Field(discriminator="kind")]
_CAPTIONER_SPEC = TypeAdapter(CaptionerSpec)


def load_captioner(spec: CaptionerSpec | dict, device: str = "cpu", dtype: str = "float32"):
    """The captioner role from its profile entry (a dict is validated first)."""
    spec = _CAPTIONER_SPEC.validate_python(spec)
    if isinstance(spec, TemplateSpec):
        return TemplateRole(spec.seed, spec.subject)
    from synfer_pipeline.curation.captions.mllm import MLLMCaptioner

    return MLLMRole(MLLMCaptioner.from_pretrained(spec.id, prompt=spec.prompt, generation=spec.generation, device=device,
                                                  dtype=dtype, local_files_only=spec.local_files_only,
                                                  trust_remote_code=spec.trust_remote_code))


class CaptionCache:
    """Append-only caption parts under `{folder}/{cache_key}/` on the storage."""

    def __init__(self, storage: Storage, folder: str, cache_key: str):
        self.storage, self.folder = storage, f"{folder.rstrip('/')}/{cache_key}"
        self._captions: dict[str, tuple[str, str]] | None = None  # key -> (sample_id, caption), read once

    def _loaded(self) -> dict[str, tuple[str, str]]:
        if self._captions is None:
            self._captions = {}
            for part in self.storage.list(self.folder, "part-*.parquet"):
                df = pd.read_parquet(io.BytesIO(self.storage.read_bytes(part)))
                for key, sid, caption in zip(df["key"], df["sample_id"], df["caption"]):
                    self._captions.setdefault(key, (sid, caption))
        return self._captions

    def __contains__(self, key: str) -> bool:
        return key in self._loaded()

    def get(self, key: str) -> tuple[str, str]:
        return self._loaded()[key]

    def add(self, df: pd.DataFrame) -> None:
        if len(df):
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            self.storage.write_bytes(f"{self.folder}/part-{uuid.uuid4().hex}.parquet", buf.getvalue())
            for key, sid, caption in zip(df["key"], df["sample_id"], df["caption"]):
                self._loaded().setdefault(key, (sid, caption))


def caption_samples(samples: Sequence[Sample], contexts: pd.DataFrame, captioner, cache: CaptionCache,
                    chunk: int = 64, log: Callable[[str], None] = lambda s: None) -> tuple[pd.DataFrame, int]:
    """Captions for `samples` (rows in CAPTION_COLUMNS), reusing cached ones; returns (table, newly captioned).

    `contexts` is indexed by key with `expression` and `aus` (what the template captioner writes from). Call it
    once per shard: only one shard's images are in memory at a time.
    """
    todo = [(k, m) for k, m in samples if k not in cache]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        images = [open_image(image_member(m)) for _, m in part] if captioner.needs_images else [None] * len(part)
        ctx = [{"key": k, "expression": contexts.at[k, "expression"], "aus": list(contexts.at[k, "aus"])} for k, _ in part]
        texts = captioner.caption(images, ctx)
        cache.add(pd.DataFrame({"key": [k for k, _ in part], "sample_id": [contexts.at[k, "sample_id"] for k, _ in part],
                                "caption": texts}))  # saved per chunk: a killed run loses at most one chunk of work
        log(f"captioned {min(start + chunk, len(todo))}/{len(todo)}")
    keys = [k for k, _ in samples]
    described = json.dumps(captioner.describe(), sort_keys=True)
    table = pd.DataFrame({"key": keys, "sample_id": [cache.get(k)[0] for k in keys],
                          "caption": [cache.get(k)[1] for k in keys], "captioner": described,
                          "cache_key": captioner.cache_key})
    return table[CAPTION_COLUMNS], len(todo)
