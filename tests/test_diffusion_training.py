"""Diffusion fine-tuning: the tiny base model, FEText streaming, the two stages, resume, checkpoints, reports."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from fetext_fixtures import NATIVE_SOURCE, write_toy_fetext
from PIL import Image
from s3_server import s3_environment
from safetensors import safe_open
from safetensors.torch import load_file

from synfer_pipeline.demo.tiny_sd import save_tiny_sd, tiny_clip_tokenizer
from synfer_pipeline.generation import loop as loop_module
from synfer_pipeline.generation.data import BatchFeed, StreamSpec, epoch_samples, load_image_tensor, sample_table
from synfer_pipeline.generation.report import loss_curve_png
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.generation.train import train_unet
from synfer_pipeline.io.shards import iter_shard
from synfer_pipeline.io.storage import Storage
from synfer_pipeline.io.versions import weights_version
from synfer_pipeline.vocab import OPENGRAPHAU_41

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny") / "base", seed=0))


@pytest.fixture(scope="module")
def fetext(tmp_path_factory) -> list[str]:
    """24 toy FEText samples in 3 shards; even samples are native high resolution."""
    return write_toy_fetext(tmp_path_factory.mktemp("fetext"), n=24, per_shard=8)


def tiny_settings(**overrides) -> TrainSettings:
    values = dict(resolution=64, train_batch_size=4, max_train_steps=4, learning_rate=1e-3, lr_warmup_steps=1,
                  checkpointing_steps=None, caption_dropout=0.1)
    return TrainSettings(**{**values, **overrides})


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / UNET_FILE))


def keys_of(feed: BatchFeed, n: int, close: bool = True) -> list[tuple[int, tuple[str, ...]]]:
    """(epoch, keys) of the next n batches; the feed is closed afterwards unless told otherwise."""
    keys = [(b["epoch"], tuple(b["keys"])) for _, b in zip(range(n), feed)]  # range first: take exactly n
    if close:
        feed.close()
    return keys


# --- the base model ------------------------------------------------------------------------------------------------

def test_tiny_sd_is_deterministic_and_generates_64px(tmp_path, base_model):
    again = save_tiny_sd(tmp_path / "again", seed=0)
    other = save_tiny_sd(tmp_path / "other", seed=1)
    assert weights_version(again) == weights_version(base_model)
    assert weights_version(other) != weights_version(base_model)
    pipe = StableDiffusionPipeline.from_pretrained(base_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a happy face", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert pipe.unet.config.sample_size == 8 and pipe.scheduler.config.steps_offset == 1


# --- FEText streaming ----------------------------------------------------------------------------------------------

def test_images_are_centre_cropped_and_scaled_to_minus_one_one():
    img = Image.new("RGB", (96, 64), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 8, 64))  # a black band at the left edge is cropped away
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = load_image_tensor(buf.getvalue(), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))


def test_batches_carry_tokens_aus_and_dropped_captions(fetext):
    tokenizer = tiny_clip_tokenizer()
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    spec = StreamSpec(tuple(fetext), resolution=64, batch_size=8, seed=3, caption_dropout=0.5, au_names=OPENGRAPHAU_41)
    batches = [b for _, b in zip(range(3), BatchFeed(spec, tokenizer))]
    assert [b["pixel_values"].shape for b in batches] == [(8, 3, 64, 64)] * 3
    assert all(b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1 for b in batches)
    dropped = sum(int(torch.equal(ids, empty)) for b in batches for ids in b["input_ids"])
    assert 4 <= dropped <= 20  # about half of 24 captions replaced by ""
    assert all(b["au"].shape == (8, 41) and set(b["au"].unique().tolist()) <= {0.0, 1.0} for b in batches)
    assert sum(len(b["keys"]) for b in batches) == 24 and len({k for b in batches for k in b["keys"]}) == 24


def test_au_vectors_are_read_by_name_in_the_jobs_order(fetext):
    """The job's AU list may be reordered and shorter than the one FEText was written with: columns follow names."""
    custom = ("AU12", "AU4", "AU1", "AU26")
    spec = StreamSpec(tuple(fetext), resolution=16, batch_size=6, au_names=custom)
    batch = next(iter(BatchFeed(spec, tiny_clip_tokenizer())))
    truth = {key: meta for key, meta in _metas(fetext).items()}
    for key, row in zip(batch["keys"], batch["au"]):
        assert row.tolist() == [1.0 if a in truth[key]["aus"] else 0.0 for a in custom], key
    unet_spec = StreamSpec(tuple(fetext), resolution=16, batch_size=6)  # the UNet stages read no AUs
    assert next(iter(BatchFeed(unet_spec, tiny_clip_tokenizer())))["au"].shape == (6, 0)


def test_an_au_the_fetext_samples_do_not_name_is_a_clear_error(fetext):
    spec = StreamSpec(tuple(fetext), resolution=16, batch_size=4, au_names=("AU12", "AU99"))
    with pytest.raises(ValueError, match=r"has no value for \['AU99'\].*rebuild fetext"):
        next(iter(BatchFeed(spec, tiny_clip_tokenizer())))


def _metas(urls) -> dict:
    storage = Storage(str(Path(urls[0]).parent))
    return {k: json.loads(m["json"]) for u in urls for k, m in iter_shard(storage, u)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_stage2_streams_share_few_native_shards_and_see_each_native_sample_once(tmp_path, world_size):
    """Ten shards, two of them native high resolution, eight streams in all: every stream gets native samples,
    batches mix the two native shards, and one epoch covers every native sample exactly once."""
    urls = write_toy_fetext(tmp_path, n=60, per_shard=6, native_every=1)  # shards 0..9
    mixed = write_toy_fetext(tmp_path / "superres", n=54, per_shard=6, seed=1, native_every=55)[1:]  # no natives
    urls = [urls[0], *mixed[:4], urls[5], *mixed[4:]]  # natives: 2 shards of 6 samples among 10 shards
    native = {k for k, m in _metas(urls).items() if m["native_hr"]}
    assert len(native) == 12
    streams = 8 // world_size
    seen, per_stream = [], []
    for rank in range(world_size):
        spec = StreamSpec(tuple(urls), resolution=16, batch_size=2, native_hr_only=True, rank=rank,
                          world_size=world_size, num_streams=streams)
        table = sample_table(spec)
        for stream in range(streams):
            rows = epoch_samples(spec, len(table), 0, stream)
            keys = table["key"].iloc[rows].tolist()
            per_stream.append(len(keys))
            seen += keys
    assert sorted(seen) == sorted(native)  # each native sample once per epoch, nothing else
    assert min(per_stream) >= 1 and max(per_stream) - min(per_stream) <= 1  # no stream empty or ending early
    one = StreamSpec(tuple(urls), resolution=16, batch_size=6, native_hr_only=True)
    table = sample_table(one)
    rows = epoch_samples(one, len(table), 0, 0)
    assert all(table["url"].iloc[rows[i:i + 6]].nunique() == 2 for i in (0, 6))  # every batch mixes both shards
    feed = BatchFeed(StreamSpec(tuple(urls), resolution=16, batch_size=3, native_hr_only=True, num_streams=2,
                                seed=1), tiny_clip_tokenizer(), num_workers=2)
    epoch0 = [k for e, ks in keys_of(feed, 4) for k in ks if e == 0]
    assert sorted(epoch0) == sorted(native)  # through the DataLoader workers as well


def test_too_few_kept_samples_for_the_streams_is_a_clear_error(fetext):
    spec = StreamSpec(tuple(fetext[:1]), resolution=16, batch_size=2, native_hr_only=True, num_streams=3, world_size=2)
    with pytest.raises(ValueError, match="4 FEText samples kept .* cannot feed 2 process\\(es\\) x 3 stream"):
        next(iter(BatchFeed(spec, tiny_clip_tokenizer(), num_workers=3)))


def test_native_hr_filter_keeps_only_native_samples(fetext):
    spec = StreamSpec(tuple(fetext), resolution=64, batch_size=4, native_hr_only=True)
    batches = [b for _, b in zip(range(3), BatchFeed(spec, tiny_clip_tokenizer()))]
    assert all(all(b["native_hr"]) and set(b["sources"]) == {NATIVE_SOURCE} for b in batches)
    assert len({k for b in batches for k in b["keys"]}) == 12  # one epoch = the 12 native samples


@pytest.mark.parametrize("workers", [0, 2])
def test_feed_resumed_at_any_batch_continues_the_same_sequence(fetext, workers):
    tokenizer = tiny_clip_tokenizer()
    spec = StreamSpec(tuple(fetext), resolution=16, batch_size=5, seed=7,
                      num_streams=max(1, workers))
    full = keys_of(BatchFeed(spec, tokenizer, workers), 12)  # 24 samples in batches of 5: epochs 0, 1 and 2
    # One stream: 24 samples = 5 batches an epoch. Two streams: 12 samples each = 3 batches each an epoch.
    epochs = [e for e, _ in full]
    assert epochs == ([0] * 5 + [1] * 5 + [2] * 2 if not workers else [0] * 6 + [1] * 6)
    assert set(full[0][1]) != set(full[6][1])
    assert keys_of(BatchFeed(spec, tokenizer, workers), 12) == full  # same seed: same order
    for k in (1, 4, 7) if workers else (1, 3, 5, 6, 9):
        feed = BatchFeed(spec, tokenizer, workers)
        keys_of(feed, k, close=False)
        position = copy.deepcopy(feed.position)
        feed.close()
        assert keys_of(BatchFeed(spec, tokenizer, workers, position=position), 12 - k) == full[k:], k


def test_feed_streams_s3_shards_in_the_same_order_as_local_ones(fetext, tmp_path, monkeypatch):
    with s3_environment(monkeypatch):
        s3_urls = write_toy_fetext("s3://synfer/fetext", n=24, per_shard=8)
        assert [u.rsplit("/", 1)[1] for u in s3_urls] == [Path(u).name for u in fetext]
        tokenizer = tiny_clip_tokenizer()
        specs = [StreamSpec(tuple(urls), resolution=16, batch_size=5, seed=2, num_streams=2)
                 for urls in (s3_urls, fetext)]
        assert keys_of(BatchFeed(specs[0], tokenizer, 2), 6) == keys_of(BatchFeed(specs[1], tokenizer, 2), 6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_noise_loss_regresses_on_the_schedulers_target(base_model, kind):
    from diffusers import DDPMScheduler

    from synfer_pipeline.generation.loop import SampleRandomness
    from synfer_pipeline.generation.train import NoiseLoss, load_components

    parts = load_components(base_model)
    scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type=kind)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "input_ids": parts.tokenizer(["a happy face", ""], padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids}
    seen = {}

    def zero_unet(noisy, t, text, return_dict=False):
        seen.update(noisy=noisy, t=t, text=text)
        return (torch.zeros_like(noisy),)

    keys = ["a", "b"]
    loss = NoiseLoss(parts.vae, parts.text_encoder, scheduler)(zero_unet, batch, SampleRandomness(0, 3, 0, keys))
    # The same draws in the same order, per sample: VAE sample, noise, timestep.
    draws = SampleRandomness(0, 3, 0, keys)
    with torch.no_grad():
        posterior = parts.vae.encode(batch["pixel_values"]).latent_dist
    shape = tuple(posterior.mean.shape[1:])
    latents = (posterior.mean + posterior.std * draws.randn(shape, "cpu")) * parts.vae.config.scaling_factor
    noise = draws.randn(shape, "cpu")
    t = draws.randint(1000, "cpu")
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert torch.equal(seen["t"], t) and torch.allclose(seen["noisy"], scheduler.add_noise(latents, noise, t))
    assert torch.allclose(loss, (target**2).mean())
    # Min-SNR weighting (Hang et al.): per sample min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction.
    # gamma between the two drawn timesteps' SNRs clamps one sample's weight and not the other's.
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    gamma = float(snr.min() + snr.max()) / 2
    assert (snr > gamma).any() and (snr < gamma).any()
    weights = snr.clamp(max=gamma) / (snr + 1 if kind == "v_prediction" else snr)
    expected = ((target**2).mean(dim=(1, 2, 3)) * weights).mean()
    weighted = NoiseLoss(parts.vae, parts.text_encoder, scheduler, snr_gamma=gamma)(zero_unet, batch,
                                                                                  SampleRandomness(0, 3, 0, keys))
    assert torch.allclose(weighted, expected, rtol=1e-5)
    assert not torch.allclose(weighted, loss)  # the weighting really changed the loss


def test_a_samples_draws_do_not_depend_on_its_batch():
    """What makes N processes equal to one: sample `key` draws the same noise and timestep wherever it is batched."""
    from synfer_pipeline.generation.loop import SampleRandomness

    pair, trio = SampleRandomness(7, 2, 0, ["a", "b"]), SampleRandomness(7, 2, 0, ["c", "b", "a"])
    assert torch.equal(pair.randn((4, 2, 2), "cpu")[[1, 0]], trio.randn((4, 2, 2), "cpu")[[1, 2]])
    assert torch.equal(pair.randint(1000, "cpu")[[1, 0]], trio.randint(1000, "cpu")[[1, 2]])
    # ... and differently at another step, or for another key
    assert not torch.equal(SampleRandomness(7, 3, 0, ["a"]).randn((4,), "cpu"), SampleRandomness(7, 2, 0, ["a"]).randn((4,), "cpu"))
    assert not torch.equal(SampleRandomness(7, 2, 0, ["a"]).randn((4,), "cpu"), SampleRandomness(7, 2, 0, ["b"]).randn((4,), "cpu"))


# --- training ------------------------------------------------------------------------------------------------------

def test_stage1_then_stage2_on_native_hr_only(tmp_path, base_model, fetext):
    stage1 = train_unet(tiny_settings(), fetext, base_model, tmp_path / "stage1", tmp_path / "state1")
    assert stage1.steps == 4 and stage1.samples_seen == 16 and len(stage1.losses) == 4
    assert stage1.resumed_from is None and stage1.final_lr == pytest.approx(1e-3)
    assert stage1.data_version == weights_version(tmp_path / "stage1") and len(stage1.data_version) == 64
    assert set(stage1.samples_by_source) == {"ffhq", "affectnet"}

    stage2 = train_unet(tiny_settings(native_hr_only=True, max_train_steps=3), fetext, str(tmp_path / "stage1"),
                        tmp_path / "stage2", tmp_path / "state2")
    assert stage2.samples_seen == 12 and stage2.native_hr_samples == 12
    assert stage2.samples_by_source == {NATIVE_SOURCE: 12}

    base_w, w1, w2 = unet_weights(base_model), unet_weights(tmp_path / "stage1"), unet_weights(tmp_path / "stage2")
    assert any(not torch.equal(base_w[k], w1[k]) for k in w1) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert all(t.dtype == torch.float32 for t in w2.values())
    # Frozen parts are copied through unchanged.
    enc = "text_encoder/model.safetensors"
    assert load_file(str(Path(base_model) / enc)).keys() == load_file(str(tmp_path / "stage2" / enc)).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(Path(base_model) / enc)).values(),
                                                 load_file(str(tmp_path / "stage2" / enc)).values()))
    meta = json.loads((tmp_path / "stage2" / "training.json").read_text())
    assert meta["base_model"] == str(tmp_path / "stage1") and meta["settings"]["native_hr_only"] is True

    for folder in ("stage1", "stage2"):
        out = SynferSampler.from_pretrained(tmp_path / folder)(["a happy face", "a sad face"], [0, 1], num_inference_steps=2)
        assert out.images.shape == (2, 3, 64, 64) and torch.isfinite(out.images).all()


def test_killed_run_resumes_to_the_same_weights(tmp_path, base_model, fetext):
    # EMA, accumulation, a cosine schedule and epochs crossing: everything a resume has to restore. Bit for bit on
    # the CPU; `deterministic` makes it so on a GPU as well (atomics in CUDA kernels otherwise reorder sums).
    settings = tiny_settings(max_train_steps=6, gradient_accumulation_steps=2, checkpointing_steps=2, use_ema=True,
                             ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=2, deterministic=True)
    straight = train_unet(settings, fetext, base_model, tmp_path / "straight", tmp_path / "state_a")

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train_unet(settings, fetext, base_model, tmp_path / "resumed", tmp_path / "state_b", log=kill_at_5)
    assert not (tmp_path / "resumed").exists()
    leftover = tmp_path / "state_b" / ".tmp-checkpoint-6"
    leftover.mkdir()  # as if a crash had interrupted the next checkpoint
    (leftover / "model.safetensors").write_bytes(b"partial")
    resumed = train_unet(settings, fetext, base_model, tmp_path / "resumed", tmp_path / "state_b")

    assert resumed.resumed_from == 4 and resumed.steps_this_run == 2 and not leftover.exists()
    assert resumed.losses == straight.losses and resumed.samples_seen == straight.samples_seen == 48
    for sub in ("unet", "unet_nonema"):  # EMA weights and raw weights, bit for bit
        a = load_file(str(tmp_path / "straight" / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / sub / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.data_version == straight.data_version
    assert not torch.are_deterministic_algorithms_enabled()  # the run's setting does not leak into the process


def test_checkpoints_appear_only_complete(tmp_path, base_model, fetext, monkeypatch):
    settings = tiny_settings(max_train_steps=5, checkpointing_steps=2, checkpoints_total_limit=2)
    expected = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "progress_0.json"}
    seen = []

    def inspect(folder: Path):
        seen.append(folder.name)
        for ckpt in folder.parent.glob("checkpoint-*"):
            assert expected <= {p.name for p in ckpt.iterdir()}, ckpt

    real_save = loop_module.Accelerator.save_state
    calls = []

    def crashing_save(self, output_dir=None, **kw):
        calls.append(output_dir)
        real_save(self, output_dir, **kw)
        if len(calls) == 2:  # dies after writing the files of checkpoint-4, before the rename
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.Accelerator, "save_state", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_unet(settings, fetext, base_model, tmp_path / "out", tmp_path / "state", on_checkpoint=inspect)
    state = tmp_path / "state"
    assert seen == ["checkpoint-2"] and sorted(p.name for p in state.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]

    monkeypatch.setattr(loop_module.Accelerator, "save_state", real_save)
    report = train_unet(settings, fetext, base_model, tmp_path / "out", tmp_path / "state", on_checkpoint=inspect)
    assert report.resumed_from == 2 and report.steps == 5
    assert seen == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-4", "checkpoint-5"]  # limit 2, no leftovers


def test_resume_with_other_settings_is_refused(tmp_path, base_model, fetext):
    settings = tiny_settings(max_train_steps=2, checkpointing_steps=1)
    train_unet(settings, fetext, base_model, tmp_path / "o", tmp_path / "s")
    with pytest.raises(ValueError, match="settings.train_batch_size"):
        train_unet(tiny_settings(max_train_steps=3, train_batch_size=2, checkpointing_steps=1), fetext, base_model,
                   tmp_path / "o", tmp_path / "s")


def test_bf16_autocast_on_cpu_still_saves_float32(tmp_path, base_model, fetext):
    fp32 = train_unet(tiny_settings(max_train_steps=2), fetext, base_model, tmp_path / "a", tmp_path / "sa")
    bf16 = train_unet(tiny_settings(max_train_steps=2, mixed_precision="bf16"), fetext, base_model, tmp_path / "b",
                      tmp_path / "sb")
    assert bf16.losses != fp32.losses  # autocast really ran in bfloat16
    assert all(abs(a - b) < 0.05 for a, b in zip(bf16.losses, fp32.losses))
    for sub in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if sub == "text_encoder" else "diffusion_pytorch_model.safetensors"
        with safe_open(str(tmp_path / "b" / sub / name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, sub


def test_settings_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="learning_rte"):
        TrainSettings(**{"learning_rte": 1e-4})
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainSettings(mixed_precision="fp8")
    assert TrainSettings(sources=["ffhq"]).sources == ("ffhq",)


def test_loss_curve_is_a_png_of_the_requested_size():
    png = loss_curve_png([1.0, 0.8, float("nan"), 0.5, 0.45], width=320, height=160)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (320, 160)
    assert len(set(img.convert("RGB").getdata())) > 3  # axes, raw and smoothed curves were drawn
    assert Image.open(io.BytesIO(loss_curve_png([]))).size == (480, 240)
