"""The AU adapter: exact no-op at scale 0, a learned null condition, save/load, and adapter-only training."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from fetext_fixtures import write_toy_fetext
from safetensors.torch import load_file

from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.generation import au_adapter as au_module
from synfer_pipeline.generation.au_adapter import (
    ADAPTER_WEIGHTS,
    AUAdapterConfig,
    AUProjection,
    adapter_parameters,
    attach_au_adapter,
    au_condition,
    base_unet_sha256,
    load_au_adapter,
    mark_unconditional,
    save_au_adapter,
    set_au_scale,
    train_au_adapter,
    unconditional_au,
)
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.io.versions import weights_version
from synfer_pipeline.vocab import au_vector

CONFIG = AUAdapterConfig(num_tokens=4, hidden_dim=16, au_dropout=0.3)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny") / "base", seed=0))


def fresh_unet(base_model: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(base_model, subfolder="unet").eval()


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    au = torch.stack([torch.from_numpy(au_vector(a)) for a in (["AU6", "AU12"], ["AU1", "AU4", "AU15"], [])])
    return latents, torch.tensor([10, 400, 900]), text, au


@torch.no_grad()
def run(unet, inputs, au=None) -> torch.Tensor:
    latents, t, text, default_au = inputs
    return unet(latents, t, text, **au_condition(default_au if au is None else au)).sample


def test_scale_zero_is_exactly_the_base_unet_and_scale_one_is_not(base_model, unet_inputs):
    latents, t, text, _ = unet_inputs
    with torch.no_grad():
        plain = fresh_unet(base_model)(latents, t, text).sample
    unet = fresh_unet(base_model)
    attach_au_adapter(unet, CONFIG)
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"
    set_au_scale(unet, 0.0)
    assert torch.equal(run(unet, unet_inputs), plain)
    set_au_scale(unet, 1.0)
    assert (run(unet, unet_inputs) - plain).abs().max() > 1e-3


def test_ip_projections_start_as_copies_of_the_text_projections(base_model):
    unet = fresh_unet(base_model)
    attach_au_adapter(unet, CONFIG)
    cross = [(n, p) for n, p in unet.attn_processors.items() if isinstance(p, au_module.IPAdapterAttnProcessor2_0)]
    # Every cross-attention (attn2) layer, self-attention (attn1) untouched: 1 down, 1 mid, 2 up blocks' worth.
    assert sorted(n for n, _ in cross) == sorted(n for n in unet.attn_processors if ".attn2." in n) and len(cross) == 4
    assert all(isinstance(p, au_module.AttnProcessor2_0) for n, p in unet.attn_processors.items() if ".attn1." in n)
    for name, proc in cross:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)


def test_null_condition_is_learned_and_differs_from_all_zero_aus(base_model, unet_inputs):
    projection = AUProjection(41, 4, 16, 32)
    zeros, nulls = torch.zeros(2, 41), unconditional_au(2, 41)
    assert torch.equal(projection(nulls), projection.null_tokens.expand(2, 4, 32))
    assert not torch.allclose(projection(zeros), projection(nulls))
    mixed = mark_unconditional(torch.ones(2, 41), torch.tensor([True, False]))
    out = projection(mixed)
    assert torch.equal(out[0], projection.null_tokens) and torch.equal(out[1], projection(torch.ones(2, 41))[1])
    out.sum().backward()  # NaN rows give finite gradients, and reach the null tokens
    assert all(torch.isfinite(p.grad).all() for p in projection.parameters())
    assert projection.null_tokens.grad.abs().sum() > 0

    unet = fresh_unet(base_model)
    attach_au_adapter(unet, CONFIG)
    all_zero, null = run(unet, unet_inputs, torch.zeros(3, 41)), run(unet, unet_inputs, unconditional_au(3, 41))
    assert not torch.allclose(all_zero, null)


def test_saved_adapter_on_a_fresh_unet_reproduces_outputs(tmp_path, base_model, unet_inputs):
    unet = fresh_unet(base_model)
    projection = attach_au_adapter(unet, CONFIG)
    with torch.no_grad():
        for p in adapter_parameters(unet).values():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values, so the load really restores something
    save_au_adapter(unet, projection, CONFIG, tmp_path / "adapter")
    assert set(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))) == set(adapter_parameters(unet))

    other = fresh_unet(base_model)
    loaded = load_au_adapter(other, tmp_path / "adapter")
    assert isinstance(loaded, AUProjection)
    assert torch.equal(run(other, unet_inputs), run(unet, unet_inputs))
    nulls = unconditional_au(3, 41)
    assert torch.equal(run(other, unet_inputs, nulls), run(unet, unet_inputs, nulls))


def test_loading_onto_another_architecture_names_the_folder(tmp_path, base_model):
    unet = fresh_unet(base_model)
    save_au_adapter(unet, attach_au_adapter(unet, CONFIG), CONFIG, tmp_path / "adapter")
    wider = UNet2DConditionModel(**{**dict(fresh_unet(base_model).config), "cross_attention_dim": 16})
    with pytest.raises(ValueError, match=str(tmp_path / "adapter")):
        load_au_adapter(wider, tmp_path / "adapter")
    deeper = UNet2DConditionModel(**{**dict(fresh_unet(base_model).config), "block_out_channels": (32, 32)})
    with pytest.raises(ValueError, match="does not fit"):
        load_au_adapter(deeper, tmp_path / "adapter")


def adapter_settings(**overrides) -> TrainSettings:
    values = dict(resolution=64, train_batch_size=4, max_train_steps=4, learning_rate=1e-3, lr_warmup_steps=1,
                  checkpointing_steps=2, deterministic=True)
    return TrainSettings(**{**values, **overrides})


def test_adapter_training_updates_only_the_adapter_and_resumes_exactly(tmp_path, base_model, monkeypatch):
    shards = write_toy_fetext(tmp_path / "fetext", n=16, per_shard=8)
    trainable_during = []
    real_run = au_module.run_training

    def spy(settings, job, *args, **kw):
        trainable_during.append({n for n, p in job.model.named_parameters() if p.requires_grad})
        return real_run(settings, job, *args, **kw)

    monkeypatch.setattr(au_module, "run_training", spy)
    straight = train_au_adapter(adapter_settings(), CONFIG, shards, base_model, tmp_path / "a", tmp_path / "sa")

    adapter = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    assert trainable_during[0] == set(adapter)
    assert straight.trainable_parameters == sum(t.numel() for t in adapter.values())
    base_hash = base_unet_sha256(fresh_unet(base_model))
    assert straight.extra == {"base_unet_sha256_before": base_hash, "base_unet_sha256_after": base_hash}
    assert (tmp_path / "a" / "base_model.txt").read_text().strip() == base_model
    assert json.loads((tmp_path / "a" / "base_model.json").read_text())["unet_sha256"] == base_hash
    assert straight.data_version == weights_version(tmp_path / "a")
    fresh = fresh_unet(base_model)
    attach_au_adapter(fresh, CONFIG)
    assert any(not torch.equal(adapter[n], p) for n, p in adapter_parameters(fresh).items())  # it trained
    assert {p.name for p in (tmp_path / "sa" / "checkpoint-2").iterdir()} >= {"trainable.safetensors", "optimizer.bin"}
    assert not (tmp_path / "sa" / "checkpoint-2" / "model.safetensors").exists()  # no copy of the frozen UNet

    class Killed(Exception):
        pass

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train_au_adapter(adapter_settings(), CONFIG, shards, base_model, tmp_path / "b", tmp_path / "sb", log=kill_at_3)
    resumed = train_au_adapter(adapter_settings(), CONFIG, shards, base_model, tmp_path / "b", tmp_path / "sb")
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    b = load_file(str(tmp_path / "b" / ADAPTER_WEIGHTS))
    assert all(torch.equal(adapter[k], b[k]) for k in adapter)

    sampler = SynferSampler.from_pretrained(base_model, adapter_dir=tmp_path / "a")
    au = torch.stack([torch.from_numpy(au_vector(["AU6", "AU12"])), torch.full((len(au_vector([])),), float("nan"))])
    images = sampler(["a happy face", "a sad face"], [0, 1], au=au, num_inference_steps=2).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
