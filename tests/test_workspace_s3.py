"""The S3 training workspace: a bounded number of remote checkpoints, resume from the newest one wherever it is,
uploads in the background (one in flight), a work key free of the checkpoint cadence."""

from __future__ import annotations

import shutil
import threading

import pytest
from fetext_fixtures import write_toy_fetext
from s3_server import s3_environment

from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.generation.checkpoints import list_checkpoints
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.generation.train import train_unet
from synfer_pipeline.generation.workspace import COMPLETE, TrainingWorkspace
from synfer_pipeline.io.storage import Storage

SETTINGS = dict(resolution=64, train_batch_size=2, max_train_steps=4, learning_rate=1e-4, lr_warmup_steps=1,
                checkpointing_steps=1, checkpoints_total_limit=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    return {"fetext": write_toy_fetext(root / "fetext", n=8, per_shard=4), "sd": str(save_tiny_sd(root / "sd"))}


class Killed(BaseException):
    """Stands in for a killed machine: nothing in the pipeline may catch it."""


def _remote_steps(storage: Storage, workspace: TrainingWorkspace) -> list[int]:
    return [step for step, _ in workspace._remote_checkpoints()]


def test_remote_checkpoints_are_pruned_to_the_limit(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path / "cache"))
    with s3_environment(monkeypatch):
        storage = Storage("s3://synfer/store")
        workspace = TrainingWorkspace(storage.artifact("diffusion_stage1", "all", "k1"), tmp_path / "work", keep=2)
        train_unet(TrainSettings(**SETTINGS), inputs["fetext"], inputs["sd"], workspace.output_dir,
                   workspace.state_dir, workspace.on_checkpoint)
        workspace.flush()
        assert _remote_steps(storage, workspace) == [3, 4]  # 4 checkpoints made, the newest 2 kept
        names = {p.rsplit("/", 1)[-1] for p in storage.list(workspace.remote_state, "*")}
        assert names == {"checkpoint-3", "checkpoint-4"}  # no partial or unmarked leftovers
        workspace.writer.release()


def test_a_remote_checkpoint_newer_than_the_local_one_is_resumed_from(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path / "cache"))
    with s3_environment(monkeypatch):
        storage = Storage("s3://synfer/store")
        settings = TrainSettings(**{**SETTINGS, "checkpoints_total_limit": 3})
        first = TrainingWorkspace(storage.artifact("diffusion_stage1", "all", "k2"), tmp_path / "machine-a", keep=3)

        def killed_after_step_3(record):
            if record["step"] >= 4:  # logged just before the step-4 checkpoint is written
                raise Killed()

        with pytest.raises(Killed):  # machine A dies after its step-3 checkpoint
            train_unet(settings, inputs["fetext"], inputs["sd"], first.output_dir, first.state_dir,
                       first.on_checkpoint, log=killed_after_step_3)
        first.flush()
        first.writer.release()
        assert _remote_steps(storage, first) == [1, 2, 3]
        # Machine B has an older local state (step 1 only) and trains on to step 4.
        work_b = tmp_path / "machine-b"
        local_b = work_b / "diffusion_stage1" / "all" / "k2" / "state"
        local_b.mkdir(parents=True)
        shutil.copytree(first.state_dir / "checkpoint-1", local_b / "checkpoint-1")
        second = TrainingWorkspace(storage.artifact("diffusion_stage1", "all", "k2"), work_b, keep=3)
        assert [s for s, _ in list_checkpoints(second.state_dir)] == [1, 3]  # the newer remote one came down
        report = train_unet(settings, inputs["fetext"], inputs["sd"], second.output_dir, second.state_dir,
                            second.on_checkpoint)
        assert report.resumed_from == 3 and report.steps_this_run == 1
        second.flush()
        second.writer.release()


def test_uploads_run_in_the_background_one_at_a_time(tmp_path, monkeypatch):
    """on_checkpoint returns while its upload is still running; a third checkpoint waits for a free slot."""
    with s3_environment(monkeypatch):
        storage = Storage("s3://synfer/store")
        workspace = TrainingWorkspace(storage.artifact("x", "all", "k3"), tmp_path / "work", keep=None)
        gate, started, real_put = threading.Event(), [], storage.put_folder

        def held_put(local, uri):
            started.append(uri)
            gate.wait(30)
            return real_put(local, uri)

        monkeypatch.setattr(storage, "put_folder", held_put)
        for step in (1, 2, 3):
            folder = workspace.state_dir / f"checkpoint-{step}"
            folder.mkdir()
            (folder / "progress_0.json").write_text("{}")
        workspace.on_checkpoint(workspace.state_dir / "checkpoint-1")  # returns at once: uploading in the thread
        workspace.on_checkpoint(workspace.state_dir / "checkpoint-2")  # queued behind it
        third = threading.Thread(target=workspace.on_checkpoint, args=(workspace.state_dir / "checkpoint-3",))
        third.start()
        third.join(0.5)
        assert third.is_alive()  # bounded: one upload in flight and one queued, the third waits
        assert len(started) == 1
        gate.set()
        third.join(30)
        workspace.flush()
        assert _remote_steps(storage, workspace) == [1, 2, 3]
        assert all(storage.exists(f"{workspace.remote_state}/checkpoint-{s}/{COMPLETE}") for s in (1, 2, 3))
        workspace.writer.release()


def test_the_work_key_ignores_checkpoint_cadence_but_not_the_numbers():
    base = TrainSettings(**SETTINGS)
    assert base.numerics() == TrainSettings(**{**SETTINGS, "checkpointing_steps": 50,
                                               "checkpoints_total_limit": None}).numerics()
    assert base.numerics() != TrainSettings(**{**SETTINGS, "learning_rate": 2e-4}).numerics()
