"""Captioning a dataset: the captioner role, and a cache that makes reruns skip images already captioned.

The captioner is a multimodal LLM (`{kind: mllm, id: ..., prompt: ..., generation: {...}}`) or, for the demo, the
template captioner (`{kind: template}`), recorded as such in every row. Captions are cached per captioner key (model
and its weights + prompt + generation settings): `{cache}/{key}/part-*.parquet`, append-only, each entry keyed by
the image's content hash (and the context the captioner reads), so a killed or repeated run only captions what is
missing or changed, and a changed prompt gets a new key (and a new captions data version) while the old captions
stay where they are.
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

CAPTION_COLUMNS = ["key", "sample_id", "caption", "image_hash", "context_hash", "captioner", "cache_key"]


class TemplateRole:
    """The template captioner as a captioner role: captions from each image's expression and AUs, not its pixels."""

    needs_images = False
    context_fields = ("key", "expression", "aus")  # what a caption is written from: a change re-captions

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
    context_fields = ()  # pixels only

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
    """Append-only caption parts under `{folder}/{cache_key}/` on the storage, keyed by content.

    An entry is keyed by the sha256 of the image's bytes and, for captioners that read context (the template
    captioner reads the sample key, the expression and the AUs), a hash of that context: a new super-resolved image
    or new AU labels miss the cache and are captioned again; everything else is reused.
    """

    def __init__(self, storage: Storage, folder: str, cache_key: str):
        self.storage, self.folder = storage, f"{folder.rstrip('/')}/{cache_key}"
        self._captions: dict[str, str] | None = None  # entry -> caption, read once

    def _loaded(self) -> dict[str, str]:
        if self._captions is None:
            self._captions = {}
            for part in self.storage.list(self.folder, "part-*.parquet"):
                df = pd.read_parquet(io.BytesIO(self.storage.read_bytes(part)))
                if "entry" in df.columns:  # parts of the older key-based format are not content-keyed: ignored
                    for entry, caption in zip(df["entry"], df["caption"]):
                        self._captions.setdefault(entry, caption)
        return self._captions

    def __contains__(self, entry: str) -> bool:
        return entry in self._loaded()

    def get(self, entry: str) -> str:
        return self._loaded()[entry]

    def add(self, entries: Sequence[str], captions: Sequence[str]) -> None:
        if len(entries):
            buf = io.BytesIO()
            pd.DataFrame({"entry": list(entries), "caption": list(captions)}).to_parquet(buf, index=False)
            self.storage.write_bytes(f"{self.folder}/part-{uuid.uuid4().hex}.parquet", buf.getvalue())
            for entry, caption in zip(entries, captions):
                self._loaded().setdefault(entry, caption)


def cache_entry(image: bytes, context: dict | None) -> tuple[str, str, str]:
    """(entry, image_hash, context_hash) of one sample: the image bytes' sha256, and the context's ("" without)."""
    image_hash = hashlib.sha256(image).hexdigest()[:32]
    context_hash = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16] if context else ""
    return f"{image_hash}:{context_hash}", image_hash, context_hash


def _context(captioner, contexts: pd.DataFrame, key: str) -> dict:
    """The fields this captioner reads for one sample (AUs as a plain list)."""
    row = {"key": key, "expression": contexts.at[key, "expression"], "aus": list(contexts.at[key, "aus"])}
    return {f: row[f] for f in captioner.context_fields}


def caption_samples(samples: Sequence[Sample], contexts: pd.DataFrame, captioner, cache: CaptionCache,
                    chunk: int = 64, log: Callable[[str], None] = lambda s: None) -> tuple[pd.DataFrame, int]:
    """Captions for `samples` (rows in CAPTION_COLUMNS), reusing cached ones; returns (table, newly captioned).

    `contexts` is indexed by key with `sample_id`, `expression` and `aus` (what the template captioner writes
    from). Call it once per shard: only one shard's images are in memory at a time.
    """
    keyed = [(k, m, _context(captioner, contexts, k)) for k, m in samples]
    entries = [cache_entry(image_member(m), ctx) for k, m, ctx in keyed]
    todo = [(item, entry) for item, entry in zip(keyed, entries) if entry[0] not in cache]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        images = [open_image(image_member(m)) for (_, m, _), _ in part] if captioner.needs_images else [None] * len(part)
        ctx = [{"key": k, "expression": contexts.at[k, "expression"], "aus": list(contexts.at[k, "aus"])}
               for (k, _, _), _ in part]
        cache.add([e for _, (e, _, _) in part], captioner.caption(images, ctx))  # a killed run loses one chunk
        log(f"captioned {min(start + chunk, len(todo))}/{len(todo)}")
    keys = [k for k, _ in samples]
    table = pd.DataFrame({"key": keys, "sample_id": [contexts.at[k, "sample_id"] for k in keys],
                          "caption": [cache.get(e) for e, _, _ in entries],
                          "image_hash": [h for _, h, _ in entries], "context_hash": [c for _, _, c in entries],
                          "captioner": json.dumps(captioner.describe(), sort_keys=True),
                          "cache_key": captioner.cache_key})
    return table[CAPTION_COLUMNS], len(todo)
