"""Configuration profiles: both shipped profiles load, typos are errors, the environment fills placeholders."""

import pytest

from synfer_pipeline.config import load_profile
from synfer_pipeline.curation.readers import READERS


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_shipped_profiles_load_with_known_formats(name):
    profile = load_profile(name)
    assert profile.datasets
    for ds in profile.datasets.values():
        assert ds.format in READERS
        assert ds.ingest.face_size > 0


def test_demo_profile_is_local_and_cpu_paper_profile_is_gpu_with_every_paper_dataset():
    demo, paper = load_profile("demo"), load_profile("paper")
    assert demo.compute["device"] == "cpu" and not demo.storage_root.startswith("s3://")
    assert paper.compute["device"] == "cuda"
    assert set(paper.datasets) == {"ffhq", "celebahq", "affectnet", "sfew", "rafdb", "fer2013"}
    assert {n for n, d in paper.datasets.items() if d.native_hr} == {"ffhq", "celebahq"}


def test_environment_placeholders_are_expanded(monkeypatch):
    monkeypatch.setenv("SYNFER_STORAGE", "s3://my-bucket/run7")
    monkeypatch.setenv("SYNFER_DATA", "/mnt/faces")
    paper = load_profile("paper")
    assert paper.storage_root == "s3://my-bucket/run7"
    assert paper.datasets["rafdb"].uri == "/mnt/faces/rafdb/basic"


def test_profile_is_chosen_by_one_setting(monkeypatch):
    monkeypatch.setenv("SYNFER_PROFILE", "paper")
    assert load_profile().name == "paper"


def test_a_typo_in_a_profile_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("storage: {root: /tmp/x}\ndatasets:\n  a: {format: folder, uri: /tmp/a, ingest: {face_sise: 64}}\n")
    with pytest.raises(ValueError, match="unknown setting\\(s\\) face_sise for IngestSettings"):
        load_profile(str(path))


def test_unknown_profile_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match="profile 'nope'"):
        load_profile("nope")
