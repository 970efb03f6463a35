"""Tiny random-weight checkpoints for tests and benchmarks, built from configs on this machine (no download).

Each `save_tiny_*` writes a folder laid out like a real hub checkpoint (config, safetensors, processor files), so
the code under test loads it through the same `Auto*.from_pretrained(path)` calls a real model takes:

- `save_tiny_llava`: LLaVA (tiny CLIP vision tower + tiny Llama) with a `LlavaProcessor` and a chat template.
- `save_tiny_swin2sr`: Swin2SR super-resolution with its image processor.

The weights are random: these models produce word salad, which is all a test of the plumbing needs.

No tiny Qwen2-VL: with transformers 5.x and no torchvision, `Qwen2VLProcessor` can be neither built nor loaded
(its video-processor attribute needs `VideoProcessorMixin`, which only exists with torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Special tokens shared by the tiny tokenizers; ids follow this order.
PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"

# Words of the chat templates, the FEText prompt and FEText captions: the prompt tokenises without <unk>,
# and what a tiny model "says" reads like words of a caption (other words become <unk>).
_WORDS = """
user assistant system you are a helpful describe the facial expression of person in this image detail and
their his her eyes nose cheeks mouth lips eyebrows brows gaze overall expression is are displaying showing
neutral happy sad surprised fearful disgusted angry contempt happiness sadness surprise fear disgust anger
open closed wide focused relaxed raised lowered furrowed straight slightly puffed parted smile smiling teeth
visible directed ahead left right down downwards up camera at to as if about speak sense conveys suggests
state calm neither nor but rather or with which that it one sentence each paragraph write say what how where
man woman face look looks appears be not no any from on for by an image picture photo describe region
begin then end only example direction neutrality first next finally
""".split()
_PUNCTUATION = list(".,:;!?'\"()-")

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT:". Newlines are written as {{ '\n' }}
# because transformers renders templates with trim_blocks, which eats a newline right after a block tag.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_word_tokenizer(extra_special: tuple[str, ...] = (IMAGE,)) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over a small FEText vocabulary, with pad/bos/eos/unk and `extra_special`.

    Special tokens are added tokens, so "<image>" stays one token instead of being split at punctuation.
    """
    specials = [PAD, BOS, EOS, UNK, *extra_special]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *_PUNCTUATION, *_WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(extra_special),
    )
    return tokenizer


def save_tiny_llava(
    path: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """Save a random-weight LLaVA checkpoint (CLIP vision tower + Llama) and its `LlavaProcessor` under `path`.

    hidden_size / num_layers size the Llama (the vision tower stays tiny); image_size / patch_size give
    (image_size // patch_size) ** 2 image tokens per image. Loads with `AutoModelForImageTextToText` and
    `AutoProcessor`. Returns the folder.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = tiny_word_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        # "default" drops the CLS token, as LLaVA-1.5 does; vision_feature_layer -2 needs >= 2 vision layers.
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        # CLIP adds a CLS token to the patches; "default" removes it again: 1 - 1 = no extra image tokens.
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path



def save_tiny_swin2sr(path: str | Path, upscale: int = 2, seed: int = 0) -> Path:
    """Save a random-weight `Swin2SRForImageSuperResolution` (x`upscale`) and its image processor under `path`.

    A 16x16 pixel_values tensor comes out (16 * upscale) pixels square. The image processor pads height and width
    to the next multiple of its size_divisor (the window, 4) *strictly above* the size (16 -> 20), as with real
    checkpoints (8), so callers crop the output back to upscale * input size.
    Returns the folder.
    """
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessorPil

    path = Path(path)
    config = Swin2SRConfig(
        image_size=16, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0,
        upscale=upscale, upsampler="pixelshuffle", drop_path_rate=0.0,
    )
    torch.manual_seed(seed)
    Swin2SRForImageSuperResolution(config).eval().save_pretrained(path)
    Swin2SRImageProcessorPil(size_divisor=config.window_size).save_pretrained(path)
    return path
