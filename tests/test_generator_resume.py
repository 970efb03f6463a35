"""A killed training step resumes from its last step checkpoint and ends with the weights of an uninterrupted run,
on local storage and on S3 (where a fresh machine downloads the newest complete checkpoint)."""

import shutil

import pytest
from dagster import DagsterInstance, materialize
from generator_helpers import ALL, curate, gen_profile, latest, make_sources, run_assets
from s3_server import s3_environment

import assets.generator as generator_module
from assets.definitions import build_resources
from synfer_pipeline.generation.workspace import TrainingWorkspace

RESUMABLE = {"max_train_steps": 4, "checkpointing_steps": 2}


class Killed(BaseException):
    """Stands in for a killed pod: nothing in the pipeline may catch it."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("resume_sources"))


def _kill_after_step(monkeypatch, step):
    def log_then_die(context, total, desc):
        def log(record):
            if record.get("step", 0) >= step:
                raise Killed()
        return log
    monkeypatch.setattr(generator_module, "_log", log_then_die)


def _stage1_twice(profile, monkeypatch, wipe_local_work=None, resume_profile=None, wait_for_uploads=False):
    """Stage 1 killed after step 3 (checkpoint at 2), then run again (optionally with another profile); returns the
    finished materialization. wait_for_uploads: each checkpoint's upload finishes before training goes on (uploads
    run in the background; without this, a kill one step later can race the upload of checkpoint 2, and a loaded
    machine then resumes from nothing, which is correct but not what this test checks)."""
    instance = DagsterInstance.ephemeral()
    curate(profile, instance)
    run_assets(profile, instance, ["fetext"])
    with monkeypatch.context() as m:
        _kill_after_step(m, 3)
        if wait_for_uploads:
            queue = TrainingWorkspace.on_checkpoint

            def queue_and_wait(self, folder):
                queue(self, folder)
                self.flush()
            m.setattr(TrainingWorkspace, "on_checkpoint", queue_and_wait)
        with pytest.raises(Killed):
            materialize(ALL, selection=["diffusion_stage1"], resources=build_resources(profile), instance=instance)
    if wipe_local_work:
        wipe_local_work()
    run_assets(resume_profile or profile, instance, ["diffusion_stage1"])
    return latest(instance, "diffusion_stage1").asset_materialization


def test_killed_stage1_resumes_to_the_uninterrupted_weights(tmp_path, sources, monkeypatch):
    reference_profile = gen_profile(tmp_path / "a", sources, "Describe the face.", train=RESUMABLE)
    reference = DagsterInstance.ephemeral()
    curate(reference_profile, reference)
    run_assets(reference_profile, reference, ["fetext", "diffusion_stage1"])
    expected = latest(reference, "diffusion_stage1").asset_materialization

    resumed = _stage1_twice(gen_profile(tmp_path / "b", sources, "Describe the face.", train=RESUMABLE), monkeypatch)
    assert resumed.metadata["resumed_from_step"].value == 2
    assert resumed.metadata["steps"].value == 4
    assert resumed.tags["dagster/data_version"] == expected.tags["dagster/data_version"]


def test_on_s3_a_fresh_machine_resumes_from_the_uploaded_checkpoint(tmp_path, sources, monkeypatch):
    work = tmp_path / "local-work"
    monkeypatch.setenv("SYNFER_WORK", str(work))
    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path / "cache"))
    with s3_environment(monkeypatch) as s3:
        profile = gen_profile(tmp_path, sources, "Describe the face.", storage_root="s3://synfer/run", train=RESUMABLE)
        resumed = _stage1_twice(profile, monkeypatch, wipe_local_work=lambda: shutil.rmtree(work), wait_for_uploads=True)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="synfer", Prefix="run/diffusion_stage1/")["Contents"]]
    assert resumed.metadata["resumed_from_step"].value == 2
    version = resumed.tags["dagster/data_version"]
    assert f"run/diffusion_stage1/all/{version}/unet/diffusion_pytorch_model.safetensors" in keys
    assert f"run/diffusion_stage1/all/{version}/lineage.json" in keys
    assert not [k for k in keys if "/_work/" in k or "/_staging/" in k]  # step checkpoints gone once published


def test_a_resume_may_change_the_checkpoint_cadence(tmp_path, sources, monkeypatch):
    """Checkpoint cadence and limit are operational: changing them keeps the work key, so the run resumes."""
    first = gen_profile(tmp_path, sources, "Describe the face.", train=RESUMABLE)
    again = gen_profile(tmp_path, sources, "Describe the face.",
                        train={**RESUMABLE, "checkpointing_steps": 1, "checkpoints_total_limit": 1})
    assert first.storage_root == again.storage_root
    resumed = _stage1_twice(first, monkeypatch, resume_profile=again)
    assert resumed.metadata["resumed_from_step"].value == 2 and resumed.metadata["steps"].value == 4
