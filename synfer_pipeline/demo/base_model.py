"""The demo's base diffusion model: a small Stable Diffusion whose parts can learn toy faces on a CPU in minutes.

What makes it learn, and why:
- the autoencoder is trained on toy faces (`demo.autoencoder`), the stand-in for SD's pretrained VAE, frozen during
  fine-tuning as SD's is; at 64 px it downsamples 4x (16x16x4 latents), which keeps the expression;
- the tokenizer has a word-level vocabulary (CLIP BPE whose merges make every caption word one token, characters
  for anything else) and 128 positions, so a whole FEText caption reaches the UNet: with one token per character 77
  positions held only the first sentence, and the AU descriptions never arrived;
- UNet and text encoder are small and random: stage 1 teaches the UNet the faces and their expressions (the base
  row of the ablation is this untrained model, the paper's "SD" row at demo scale).
Built once by `synfer demo-data`; the folder is an ordinary diffusers pipeline that `from_pretrained` loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synfer_pipeline.curation.faces import aligned_box, crop_face
from synfer_pipeline.demo.autoencoder import AutoencoderSettings, train_autoencoder, train_tiny_decoder
from synfer_pipeline.demo.toyfaces import draw_toy_face
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7, OPENGRAPHAU_41

TEXT_POSITIONS = 128
TINY_DECODER = "tiny_decoder"  # the AutoencoderTiny beside the pipeline's folders
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


@settings
class BaseModelSettings:
    """faces: toy faces drawn to train the autoencoder (its own data, as SD's VAE never saw FEText), cropped as the
    demo's ingest crops its aligned sources (`face_crop`, see `IngestSettings.aligned_crop`; None: whole frame);
    unet_blocks / text_width / text_layers: sizes of the random UNet and text encoder; text_pretrain_steps: the text
    encoder's stand-in for CLIP pretraining (`pretrain_text_encoder`; 0: left random); tiny_decoder_steps: training
    of the tiny autoencoder that decodes x0 for guidance (`tiny_decoder/` beside the pipeline; 0: none);
    autoencoder: its settings."""

    faces: int = 1200
    face_crop: tuple[float, float, float] | None = (0.5, 0.53, 0.72)
    unet_blocks: tuple[int, ...] = (16, 32, 64)
    text_width: int = 64
    text_layers: int = 2
    text_pretrain_steps: int = 300
    tiny_decoder_steps: int = 150
    autoencoder: AutoencoderSettings = AutoencoderSettings()
    seed: int = 0


def caption_words() -> list[str]:
    """Every word the demo's captions and prompts use: the template captioner's phrases for every expression and AU
    subset, the caption validator's expression lexicon, and the generation prompt's words."""
    from synfer_pipeline.curation.captions.lexicon import EXPRESSION_TERMS
    from synfer_pipeline.curation.captions.template import TemplateCaptioner

    texts = []
    for seed in range(3):
        captioner = TemplateCaptioner(seed)
        for expression in EXPRESSIONS_7:
            aus = EXPRESSION_AUS[expression]
            for k in range(2 ** len(aus)):
                chosen = [a for i, a in enumerate(aus) if k >> i & 1]
                for key in range(4):
                    texts.append(captioner.caption(expression, chosen, key=f"{expression}{k}{key}"))
    texts += [phrase for terms in EXPRESSION_TERMS.values() for phrase in terms]
    texts.append("A close-up photo of a face. The person in the image is displaying a facial expression. "
                 "an angry surprised fearful disgusted happy sad neutral")
    normalise = CLIPTokenizer(vocab={s: i for i, s in enumerate(SPECIAL)}, merges=[]).backend_tokenizer
    return sorted({w for text in texts for w, _ in normalise.pre_tokenizer.pre_tokenize_str(
        normalise.normalizer.normalize_str(text))})


def word_tokenizer(words: Iterable[str], max_length: int = TEXT_POSITIONS) -> CLIPTokenizer:
    """A CLIP tokenizer whose BPE merges make each of `words` a single token; any other word falls back to its
    byte-level characters (every character is in the vocabulary, alone and word-final)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, special_tokens=SPECIAL,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(sorted(set(words)), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in state["merges"]], model_max_length=max_length)


def _text_encoder(tokenizer: CLIPTokenizer, cfg: BaseModelSettings) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def pretrain_text_encoder(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, steps: int, seed: int = 0,
                          batch_size: int = 32, lr: float = 3e-3) -> dict:
    """Give the random text encoder what CLIP's pretraining gives Stable Diffusion's: text states that carry the
    visual concepts a caption names. A linear head on the mean of the last hidden states learns the expression
    (cross-entropy) and the AUs (binary cross-entropy) of toy captions drawn like FEText's; the head is discarded.
    Returns {"steps", "expression_acc"} (the last batch's accuracy)."""
    from synfer_pipeline.curation.captions.template import TemplateCaptioner
    aus = sorted({a for pool in EXPRESSION_AUS.values() for a in pool}, key=OPENGRAPHAU_41.index)
    width = text_encoder.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(width, len(EXPRESSIONS_7) + len(aus))
        params = list(text_encoder.parameters()) + list(head.parameters())
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        rng = np.random.default_rng([seed, 11])
        captioner = TemplateCaptioner(seed)
        text_encoder.train()
        acc = 0.0
        for step in range(steps):
            labels = rng.integers(len(EXPRESSIONS_7), size=batch_size)
            chosen = [[a for a in EXPRESSION_AUS[EXPRESSIONS_7[k]] if rng.random() < 0.6] for k in labels]
            texts = [captioner.caption(EXPRESSIONS_7[k], c, key=f"pre{step}-{i}") for i, (k, c) in
                     enumerate(zip(labels, chosen))]
            batch = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt")
            states = text_encoder(batch.input_ids)[0]
            mask = batch.attention_mask.unsqueeze(-1).float()
            out = head((states * mask).sum(1) / mask.sum(1))
            target_aus = torch.tensor([[float(a in c) for a in aus] for c in chosen])
            target = torch.from_numpy(labels)
            loss = torch.nn.functional.cross_entropy(out[:, :len(EXPRESSIONS_7)], target) + \
                torch.nn.functional.binary_cross_entropy_with_logits(out[:, len(EXPRESSIONS_7):], target_aus)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            acc = float((out[:, :len(EXPRESSIONS_7)].argmax(1) == target).float().mean())
        text_encoder.eval()
    return {"steps": steps, "expression_acc": round(acc, 3)}


def _unet(cfg: BaseModelSettings, latent_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.autoencoder.latent_channels, out_channels=cfg.autoencoder.latent_channels,
        block_out_channels=tuple(cfg.unet_blocks), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_blocks) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(cfg.unet_blocks) - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=8)


def _scheduler() -> DDIMScheduler:
    # Stable Diffusion v1's noise schedule; steps_offset=1 as in its released config.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def training_faces(n: int, seed: int, size: int, crop: tuple[float, float, float] | None = None) -> list:
    """`n` toy faces of all expressions at `size` px (their own seeds: not the demo datasets' faces), cropped to
    `crop` as ingest crops aligned sources."""
    drawn = [draw_toy_face(EXPRESSIONS_7[i % 7], np.random.default_rng([seed, 7, i]), 100).image for i in range(n)]
    if crop is None:
        return [im.resize((size, size), Image.LANCZOS) for im in drawn]
    return [crop_face(np.asarray(im), aligned_box(*im.size, crop), size, margin=0.0) for im in drawn]


def build_base_model(path: str | Path, cfg: BaseModelSettings = BaseModelSettings(),
                     progress: Callable[[int, float], None] = lambda step, loss: None) -> tuple[Path, dict]:
    """Train the autoencoder, assemble the pipeline around it and save it as a diffusers folder at `path`.

    Returns (path, report): {"autoencoder": its PSNR and training time, "text_encoder": its pretraining}."""
    resolution = cfg.autoencoder.resolution
    faces = training_faces(cfg.faces, cfg.seed, resolution, cfg.face_crop)
    vae, report = train_autoencoder(faces, cfg.autoencoder, progress)
    tokenizer = word_tokenizer(caption_words())
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)  # the random parts' init
        text_encoder, unet = _text_encoder(tokenizer, cfg), _unet(cfg, resolution // 2 ** (len(cfg.autoencoder.blocks) - 1))
    finally:
        torch.random.set_rng_state(state)
    report = {"autoencoder": report, "text_encoder": pretrain_text_encoder(text_encoder, tokenizer,
                                                                           cfg.text_pretrain_steps, cfg.seed)}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    if cfg.tiny_decoder_steps:
        tiny, report["tiny_decoder"] = train_tiny_decoder(vae, faces, cfg.tiny_decoder_steps, seed=cfg.seed)
        tiny.save_pretrained(path / TINY_DECODER, safe_serialization=True)
    (path / "synfer_base_model.json").write_text(json.dumps({**report, "vocabulary": len(tokenizer)}, indent=2))
    return path, report
