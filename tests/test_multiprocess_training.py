"""One training loop on two processes (torch.distributed.run, gloo on CPU) against the same loop on one process with
the same global batch: the multi-GPU path of the training assets, reached on a CPU.

Each sample draws its noise and timestep from (seed, step, key) and the two ranks split every global batch between
them, so the two runs compute the same gradients; only the all-reduce's float rounding differs. Adam divides by
sqrt(v), which can turn a 1e-9 gradient difference on a near-zero gradient into a visible step difference, so the
tolerances are stated below: the largest single weight difference within half an Adam step, and the distance between
the two UNets within 1% of the distance training moved them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fetext_fixtures import write_toy_fetext
from safetensors.torch import load_file

from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.generation.au_adapter import AUAdapterConfig
from synfer_pipeline.generation.launch import LaunchJob, train
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.io.versions import weights_version

WEIGHT_TOLERANCE = 5e-4  # half of one Adam step (lr 1e-3); measured: 8.5e-5 (UNet), 2.2e-8 (adapter)
DISPLACEMENT_TOLERANCE = 0.01  # of the distance training moved the UNet; measured: 4e-4
LOSS_TOLERANCE = 1e-5  # measured: 1.2e-7


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    return {"fetext": write_toy_fetext(root / "fetext", n=16, per_shard=8), "sd": str(save_tiny_sd(root / "sd"))}


def _settings(batch: int) -> dict:
    return dataclasses.asdict(TrainSettings(resolution=64, train_batch_size=batch, max_train_steps=3,
                                            learning_rate=1e-3, lr_warmup_steps=1, checkpointing_steps=2,
                                            caption_dropout=0.2, seed=5))


def _weights(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.rglob("*.safetensors"))
    if kind == "unet":
        files = [f for f in files if f.parent.name == "unet"]
    assert files, f"no weights under {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("kind", ["unet", "au_adapter"])
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(inputs, tmp_path, kind):
    adapter = AUAdapterConfig(num_tokens=2, hidden_dim=16, au_dropout=0.2).to_dict() if kind == "au_adapter" else None

    def job(name: str, batch: int) -> LaunchJob:
        return LaunchJob(kind, _settings(batch), inputs["fetext"], inputs["sd"], str(tmp_path / name / "out"),
                         str(tmp_path / name / "state"), adapter)

    one = train(job("one", 4), num_processes=1)
    checkpoints, records, lines = [], [], []
    two = train(job("two", 2), num_processes=2, on_checkpoint=checkpoints.append, log=records.append,
                output=lines.append, device="cpu")

    # the same samples, the same losses, the same weights
    assert two.steps == one.steps == 3 and two.samples_seen == one.samples_seen == 12
    assert two.samples_by_source == one.samples_by_source
    assert max(abs(a - b) for a, b in zip(one.losses, two.losses, strict=True)) < LOSS_TOLERANCE
    w1, w2 = _weights(tmp_path / "one" / "out", kind), _weights(tmp_path / "two" / "out", kind)
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    if kind == "unet":  # against how far training moved the weights: the runs agree on the displacement
        base = load_file(str(Path(inputs["sd"]) / "unet" / "diffusion_pytorch_model.safetensors"))
        moved = sum(float((w1[k] - base[k.split(":", 1)[1]]).square().sum()) for k in w1) ** 0.5
        apart = sum(float((w1[k] - w2[k]).square().sum()) for k in w1) ** 0.5
        assert moved > 0.1 and apart / moved < DISPLACEMENT_TOLERANCE, (moved, apart)
    assert worst < WEIGHT_TOLERANCE, f"weights differ by {worst}"
    assert two.data_version == weights_version(tmp_path / "two" / "out")  # rank 0's hash of the files it wrote
    # Rank 0 alone reports: each checkpoint once, each step's log record once, in order.
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-3"]
    assert all(p.is_dir() for p in checkpoints)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any(line.startswith("@@synfer-event") for line in lines)


def test_a_failing_rank_fails_the_launch_with_its_output(inputs, tmp_path):
    bad = LaunchJob("unet", _settings(2), inputs["fetext"], str(tmp_path / "no-such-model"), str(tmp_path / "out"),
                    str(tmp_path / "state"))
    with pytest.raises(RuntimeError, match=r"training on 2 processes failed .*\n(.|\n)*no-such-model"):
        train(bad, num_processes=2, output=lambda line: None, device="cpu")
    assert not (tmp_path / "out").exists()  # nothing published


def _ranks_alive() -> list[str]:
    """Command lines of this machine's training ranks and launchers (their control folders are synfer-launch-*)."""
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "synfer_pipeline.generation.launch" in text and "synfer-launch-" in text:
            alive.append(text)
    return alive


class Killed(BaseException):
    """Raised from the step's checkpoint callback: the step dies while its ranks wait for it."""


def test_a_killed_two_process_run_stops_its_ranks_and_resumes_from_its_checkpoint(inputs, tmp_path):
    def job(name: str) -> LaunchJob:
        return LaunchJob("unet", _settings(2), inputs["fetext"], inputs["sd"], str(tmp_path / name / "out"),
                         str(tmp_path / name / "state"))

    def die(folder: Path) -> None:
        raise Killed(folder)

    with pytest.raises(Killed):
        train(job("run"), num_processes=2, on_checkpoint=die, output=lambda line: None, device="cpu")
    assert _ranks_alive() == []  # the launcher and both ranks were stopped with the step
    assert not (tmp_path / "run" / "out").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "state").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train(job("run"), num_processes=2, output=lambda line: None, device="cpu")
    assert (resumed.resumed_from, resumed.steps, resumed.steps_this_run) == (2, 3, 1)
    whole = train(job("whole"), num_processes=2, output=lambda line: None, device="cpu")
    assert resumed.losses == pytest.approx(whole.losses, abs=LOSS_TOLERANCE)
    w1, w2 = _weights(tmp_path / "run" / "out", "unet"), _weights(tmp_path / "whole" / "out", "unet")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOLERANCE


def test_the_stage1_asset_trains_on_compute_num_processes(tmp_path):
    """A profile's `compute.num_processes: 2` makes the training asset launch two ranks; the step publishes once."""
    from dagster import DagsterInstance
    from generator_helpers import curate, gen_profile, latest, make_sources, run_assets

    profile = gen_profile(tmp_path, make_sources(tmp_path / "sources"), "Describe the face.",
                          compute={"device": "cpu", "num_processes": 2})
    assert profile.compute.num_processes == 2
    instance = DagsterInstance.ephemeral()
    curate(profile, instance)
    run_assets(profile, instance, ["fetext", "diffusion_stage1"])
    record = latest(instance, "diffusion_stage1")
    meta = record.asset_materialization.metadata
    assert meta["steps"].value == 3 and meta["samples_seen"].value == 3 * 2 * 2  # steps x batch x processes
    training = json.loads(Path(meta["uri"].value, "training.json").read_text())
    assert training["samples_seen"] == 12
    logs = [e.user_message for e in instance.all_logs(record.event_log_entry.run_id)]
    assert any("one training loop on 2 processes" in m for m in logs)
