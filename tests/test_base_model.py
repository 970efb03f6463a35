"""The demo's base model: a word-level tokenizer that keeps a whole FEText caption, and an autoencoder trained on
toy faces, saved as an ordinary diffusers folder."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from synfer_pipeline.curation.captions.template import TemplateCaptioner
from synfer_pipeline.demo.autoencoder import AutoencoderSettings, build_autoencoder, images_tensor
from synfer_pipeline.demo.base_model import (BaseModelSettings, build_base_model, caption_words, training_faces,
                                             word_tokenizer)
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(caption_words())


def _longest_template_captions(n=20):
    captioner = TemplateCaptioner(0)
    captions = [captioner.caption(e, list(EXPRESSION_AUS[e]), key=f"{e}{i}") for e in EXPRESSIONS_7 for i in range(6)]
    return sorted(captions, key=len)[-n:]


def test_every_word_of_an_fetext_caption_is_one_token_and_the_whole_caption_fits(tokenizer):
    for caption in _longest_template_captions():
        ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
        words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(
            tokenizer.backend_tokenizer.normalizer.normalize_str(caption))
        assert len(ids) == len(words) + 2 <= tokenizer.model_max_length  # one id per word, plus start and end
        assert ids[-1] == tokenizer.eos_token_id  # not truncated: the end token is there
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(w for w, _ in words)
        # The AU descriptions (the caption's last sentences) reach the text encoder.
        assert tokenizer.convert_tokens_to_ids(words[-1][0] + "</w>") in ids


def test_an_unknown_word_falls_back_to_characters_not_to_unk(tokenizer):
    ids = tokenizer("zxqv", add_special_tokens=False).input_ids
    assert len(ids) == 4 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "zxqv"


def test_training_faces_are_cropped_to_the_face_square():
    """(0.5, 0.53, 0.72) of a 100 px toy face is the square (14, 17)-(86, 89): the faces are that square at 64 px."""
    whole = training_faces(2, 0, 100)
    cropped = training_faces(2, 0, 64, crop=(0.5, 0.53, 0.72))
    assert whole[0].size == (100, 100) and cropped[0].size == (64, 64)
    for full, face in zip(whole, cropped):
        expected = np.asarray(full.crop((14, 17, 86, 89)).resize((64, 64), Image.BOX), float)
        frame = np.asarray(full.resize((64, 64), Image.BOX), float)
        assert np.abs(np.asarray(face, float) - expected).mean() < 4 < np.abs(np.asarray(face, float) - frame).mean()


def test_the_base_model_is_a_diffusers_folder_whose_autoencoder_learned_toy_faces(tmp_path):
    cfg = BaseModelSettings(faces=28, autoencoder=AutoencoderSettings(steps=120, batch_size=4, blocks=(8, 16, 16)),
                            text_pretrain_steps=30)
    seen = []
    path, report = build_base_model(tmp_path / "base", cfg, lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(1, 121))
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    faces = images_tensor(training_faces(7, 99, 64, cfg.face_crop), 64)

    def psnr(vae):
        with torch.no_grad():
            recon = vae.decode(vae.encode(faces).latent_dist.mean).sample.clamp(-1, 1)
        return float(10 * torch.log10(4 / (recon - faces).pow(2).mean()))
    untrained = build_autoencoder(cfg.autoencoder)
    assert psnr(pipe.vae) > psnr(untrained) + 3  # trained: clearly better than its own random init
    assert report["autoencoder"]["psnr_db"] > 10 and report["autoencoder"]["steps"] == 120
    assert report["text_encoder"]["steps"] == 30
    assert pipe.unet.config.sample_size == 16  # 4x: 64 px -> 16x16 latents
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    # Scaled latents of toy faces have about unit variance, as Stable Diffusion's scaling factor gives.
    with torch.no_grad():
        latents = pipe.vae.encode(faces).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.5 < float(latents.std()) < 2.0


def test_text_pretraining_makes_the_states_name_the_expression():
    """The stand-in for CLIP pretraining: after it, a caption's mean text state tells its expression (a nearest-
    centroid read on held-out captions), which the random encoder's states do far less."""
    from synfer_pipeline.demo.base_model import _text_encoder, pretrain_text_encoder

    tokenizer = word_tokenizer(caption_words())
    captioner = TemplateCaptioner(3)
    rng = np.random.default_rng(0)
    labels = [EXPRESSIONS_7[i % 7] for i in range(140)]
    texts = [captioner.caption(e, [a for a in EXPRESSION_AUS[e] if rng.random() < 0.5], key=f"t{i}")
             for i, e in enumerate(labels)]

    def readout(encoder):
        batch = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            states = encoder(batch.input_ids)[0]
        mask = batch.attention_mask.unsqueeze(-1).float()
        pooled = ((states * mask).sum(1) / mask.sum(1)).numpy()
        train, test = slice(0, 70), slice(70, 140)
        centroids = {e: pooled[train][[lab == e for lab in labels[train]]].mean(0) for e in EXPRESSIONS_7}
        guess = [min(centroids, key=lambda e: np.linalg.norm(v - centroids[e])) for v in pooled[test]]
        return np.mean([g == t for g, t in zip(guess, labels[test])])

    torch.manual_seed(0)
    encoder = _text_encoder(tokenizer, BaseModelSettings())
    before = readout(encoder)
    report = pretrain_text_encoder(encoder, tokenizer, steps=60)
    assert readout(encoder) >= 0.95 > before and report["steps"] == 60
