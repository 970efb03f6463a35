"""MLLMCaptioner: captions from a multimodal LLM loaded as a real checkpoint is (Auto classes, chat template),
batched, deterministic when greedy, with a lineage record and a cache key. Runs a tiny random-weight LLaVA."""

from __future__ import annotations

import hashlib
import inspect
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from conftest import face_like
from tiny_models import save_tiny_llava
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from synfer_pipeline.curation.captions.mllm import (
    DEFAULT_PROMPT,
    CaptionerLoadError,
    GenerationSettings,
    MLLMCaptioner,
)

# Short captions keep the tests fast; the plumbing is the same at 160 tokens.
GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def captioner(llava_path):
    return MLLMCaptioner.from_pretrained(str(llava_path), generation=GREEDY, local_files_only=True)


@pytest.fixture(scope="module")
def faces():
    # Different sizes and contents: the processor resizes, and the captions must depend on the image.
    return [face_like(size=40 + 4 * i, seed=i) for i in range(8)]


class GenerateSpy:
    """Wraps `model.generate`, recording the batch size and the new token ids of every call."""

    def __init__(self, model):
        self.model, self.original = model, model.generate
        self.batch_sizes: list[int] = []
        self.new_tokens: list[torch.Tensor] = []

    def __call__(self, **inputs):
        output = self.original(**inputs)
        self.batch_sizes.append(inputs["input_ids"].shape[0])
        self.new_tokens.extend(output[:, inputs["input_ids"].shape[1]:])
        return output


@pytest.fixture
def spy(captioner, monkeypatch):
    spy = GenerateSpy(captioner.model)
    monkeypatch.setattr(captioner.model, "generate", spy)
    return spy


def with_settings(captioner: MLLMCaptioner, **changes) -> MLLMCaptioner:
    """The same loaded model and processor under other settings (prompt, model_id or generation fields)."""
    prompt = changes.pop("prompt", captioner.prompt)
    model_id = changes.pop("model_id", captioner.model_id)
    generation = replace(captioner.generation, **changes)
    return MLLMCaptioner(captioner.model, captioner.processor, model_id, prompt, generation)


def test_loads_a_saved_checkpoint_through_the_auto_classes(llava_path, captioner):
    assert isinstance(captioner.model, LlavaForConditionalGeneration)
    assert isinstance(captioner.processor, LlavaProcessor)
    # The prompt went through the checkpoint's chat template, image placeholder first.
    assert captioner._prompt_text == f"USER: <image>\n{DEFAULT_PROMPT} ASSISTANT:"
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.device == torch.device("cpu")


def test_eight_images_are_captioned_in_one_generate_call(captioner, faces, spy):
    captions = captioner.caption(faces)
    assert spy.batch_sizes == [8]
    assert len(captions) == 8
    assert all(isinstance(c, str) and c and c == c.strip() for c in captions)
    # Only the continuation is returned: the prompt's words are not echoed at the start.
    assert not any(c.startswith(("USER", "Describe")) for c in captions)
    assert len(set(captions)) > 1, "captions must depend on the image"


def test_batches_follow_batch_size_and_keep_image_order(captioner, faces, spy):
    captions = with_settings(captioner, batch_size=3).caption(faces)
    assert spy.batch_sizes == [3, 3, 2]
    assert captions == captioner.caption(faces)


def test_greedy_captions_repeat_on_a_second_call(captioner, faces):
    assert captioner.caption(faces) == captioner.caption(faces)


def test_greedy_batched_captions_equal_one_at_a_time(captioner, faces, spy):
    batched = captioner.caption(faces)
    batched_tokens = [t.tolist() for t in spy.new_tokens]
    spy.new_tokens.clear()
    single = with_settings(captioner, batch_size=1).caption(faces)
    assert spy.batch_sizes == [8] + [1] * 8
    # Token ids first: a mismatch there is the real failure, text equality follows from it.
    assert [t.tolist() for t in spy.new_tokens] == batched_tokens
    assert single == batched


def test_seeded_sampling_is_reproducible(captioner, faces):
    sampler = with_settings(captioner, do_sample=True, temperature=1.5, seed=3)
    first = sampler.caption(faces[:4])
    assert sampler.caption(faces[:4]) == first
    assert with_settings(sampler, seed=4).caption(faces[:4]) != first


def test_grey_images_and_an_empty_list(captioner, spy):
    assert len(captioner.caption([face_like(48, seed=9).convert("L")])) == 1
    assert captioner.caption([]) == []
    assert spy.batch_sizes == [1]


def test_describe_records_model_prompt_hash_settings_and_dtype(llava_path, captioner):
    record = captioner.describe()
    assert record["kind"] == "mllm"
    assert record["model"] == str(llava_path)
    assert record["prompt"] == DEFAULT_PROMPT
    assert record["prompt_hash"] == hashlib.sha256(DEFAULT_PROMPT.encode()).hexdigest()[:12]
    assert record["generation"] == asdict(GREEDY) == {
        "max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "num_beams": 1,
        "repetition_penalty": 1.0, "seed": 0, "batch_size": 8,
    }
    assert record["dtype"] == "float32"
    assert record["cache_key"] == captioner.cache_key


def test_cache_key_changes_with_what_determines_a_caption(captioner):
    key = captioner.cache_key
    assert len(key) == 16
    assert with_settings(captioner).cache_key == key
    changed = [
        {"prompt": DEFAULT_PROMPT + " Be brief."}, {"model_id": "llava-hf/llava-1.5-7b-hf"},
        {"max_new_tokens": 13}, {"num_beams": 2}, {"repetition_penalty": 1.1}, {"do_sample": True},
    ]
    for change in changed:
        assert with_settings(captioner, **change).cache_key != key, change


def test_cache_key_ignores_batch_size_and_greedy_irrelevant_sampling_settings(captioner):
    key = captioner.cache_key
    for change in ({"batch_size": 1}, {"seed": 5}, {"temperature": 0.7}, {"top_p": 0.9}):
        assert with_settings(captioner, **change).cache_key == key, change
    sampler = with_settings(captioner, do_sample=True)
    for change in ({"seed": 5}, {"temperature": 0.7}, {"top_p": 0.9}):
        assert with_settings(sampler, **change).cache_key != sampler.cache_key, change
    assert with_settings(sampler, batch_size=2).cache_key == sampler.cache_key


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CaptionerLoadError, match="no-such-model"):
        MLLMCaptioner.from_pretrained(str(missing), local_files_only=True)


def test_a_folder_without_a_checkpoint_names_the_folder(tmp_path):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    with pytest.raises(CaptionerLoadError, match="not-a-checkpoint"):
        MLLMCaptioner.from_pretrained(str(folder), local_files_only=True)


def test_a_processor_without_chat_template_is_refused(llava_path, tmp_path):
    copy = shutil.copytree(llava_path, tmp_path / "no-template")
    (copy / "chat_template.jinja").unlink()
    with pytest.raises(CaptionerLoadError, match="no-template.*no chat template"):
        MLLMCaptioner.from_pretrained(str(copy), local_files_only=True)


def test_trust_remote_code_is_off_unless_asked_for(llava_path, monkeypatch):
    assert inspect.signature(MLLMCaptioner.from_pretrained).parameters["trust_remote_code"].default is False
    seen = []
    for auto in (AutoProcessor, AutoModelForImageTextToText):
        original = auto.from_pretrained

        def recording(*args, _original=original, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", recording)
    MLLMCaptioner.from_pretrained(str(llava_path), local_files_only=True)
    assert seen == [False, False]


def test_half_precision_casts_the_image_inputs_and_changes_the_cache_key(llava_path, captioner, faces):
    half = MLLMCaptioner.from_pretrained(str(llava_path), generation=GREEDY, dtype="bfloat16", local_files_only=True)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.describe()["dtype"] == "bfloat16"
    assert len(half.caption(faces[:2])) == 2
    # Half precision can change a greedy caption: it is part of what determines one.
    assert half.cache_key != captioner.cache_key
    with pytest.raises(ValueError, match="dtype"):
        MLLMCaptioner.from_pretrained(str(llava_path), dtype="float8")


def test_default_prompt_asks_for_every_part_of_an_fetext_caption():
    prompt = DEFAULT_PROMPT.lower()
    for part in ("facial expression", "eyes", "nose", "cheeks", "mouth", "eyebrows", "gaze", "overall expression"):
        assert part in prompt, part


def test_generation_settings_reject_impossible_values():
    for bad in ({"batch_size": 0}, {"max_new_tokens": 0}, {"num_beams": 0}, {"temperature": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
    assert GenerationSettings().generate_kwargs() == {
        "max_new_tokens": 160, "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
    }
