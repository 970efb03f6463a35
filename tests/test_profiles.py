"""Configuration profiles: parsed by typed models, every section of both shipped profiles, clear errors with key paths."""

import pytest
import yaml

from synfer_pipeline.config import PROFILES_DIR, Profile, ProfileError, load_profile, parse_profile
from synfer_pipeline.curation.captions.mllm import GenerationSettings
from synfer_pipeline.curation.captions.run import MLLMSpec
from synfer_pipeline.curation.readers import READERS
from synfer_pipeline.curation.superres import TransformersSRSpec
from synfer_pipeline.generation.settings import TrainSettings


def _raw(name: str) -> dict:
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_every_section_of_the_shipped_profiles_is_typed(name):
    """Each top-level key of the YAML file becomes a typed section (none left as a loose dict)."""
    profile = load_profile(name)
    for section in _raw(name):
        assert section in Profile.model_fields, f"{name}.yaml section {section!r} has no typed model"
    assert isinstance(profile.generator.stage1, TrainSettings)
    assert isinstance(profile.generator.stage1.learning_rate, float)
    for ds in profile.datasets.values():
        assert ds.format in READERS and ds.ingest.face_size > 0 and ds.name in profile.datasets


def test_paper_profile_gpu_sections_are_checked_here():
    paper = load_profile("paper")
    assert isinstance(paper.models.superres, TransformersSRSpec)
    assert isinstance(paper.models.captioner, MLLMSpec)
    assert isinstance(paper.models.captioner.generation, GenerationSettings)
    assert paper.generator.stage1.mixed_precision == "bf16" and paper.generator.stage1.use_ema is True
    assert paper.generator.stage2.native_hr_only is True
    assert paper.compute.device == "cuda"
    assert set(paper.datasets) == {"ffhq", "celebahq", "affectnet", "sfew", "rafdb", "fer2013"}
    assert {n for n, d in paper.datasets.items() if d.native_hr} == {"ffhq", "celebahq"}


def test_demo_profile_is_local_and_cpu():
    demo = load_profile("demo")
    assert demo.compute.device == "cpu" and not demo.storage_root.startswith("s3://")
    assert demo.demo_data is not None and demo.demo_data.rafdb_train > 0


def test_yaml_scientific_notation_becomes_a_float():
    """PyYAML reads `1e-4` (no dot) as the string '1e-4'; the typed model makes it the float."""
    raw = _raw("demo")
    raw["generator"]["stage1"]["learning_rate"] = "1e-4"
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    profile = parse_profile(raw, "demo.yaml")
    assert profile.generator.stage1.learning_rate == pytest.approx(1e-4)


def test_a_typo_in_a_gpu_only_section_names_the_key_path():
    raw = _raw("paper")
    raw["generator"]["stage2"]["learning_rte"] = 1e-5
    with pytest.raises(ProfileError) as err:
        parse_profile(raw, "paper.yaml")
    assert "generator.stage2.learning_rte: unknown key" in str(err.value)
    assert "paper.yaml" in str(err.value)


def test_a_bad_value_names_key_value_and_expectation():
    raw = _raw("paper")
    raw["models"]["captioner"]["generation"]["max_new_tokens"] = "lots"
    raw["datasets"]["rafdb"]["ingest"]["face_size"] = "big"
    with pytest.raises(ProfileError) as err:
        parse_profile(raw, "paper.yaml")
    text = str(err.value)
    assert "2 fault(s)" in text
    assert "models.captioner.mllm.generation.max_new_tokens: Input should be a valid integer" in text and "'lots'" in text
    assert "datasets.rafdb.ingest.face_size: Input should be a valid integer" in text and "'big'" in text


def test_a_check_on_a_value_says_what_was_expected():
    raw = _raw("demo")
    raw["checks"]["max_reject_rate"] = 5
    raw["generator"]["stage1"]["resolution"] = 60
    with pytest.raises(ProfileError) as err:
        parse_profile(raw, "demo.yaml")
    text = str(err.value)
    assert "checks.max_reject_rate: Input should be less than or equal to 1 (got 5)" in text
    assert "generator.stage1: resolution 60 is not a multiple of 8" in text


def test_an_unknown_dataset_format_or_model_kind_is_refused():
    raw = _raw("demo")
    raw["datasets"]["rafdb"]["format"] = "raf"
    raw["models"]["superres"] = {"kind": "bicubic"}
    with pytest.raises(ProfileError) as err:
        parse_profile(raw, "demo.yaml")
    assert "datasets.rafdb.format" in str(err.value) and "'raf'" in str(err.value)
    assert "models.superres" in str(err.value) and "bicubic" in str(err.value)


def test_dataset_ingest_overrides_profile_defaults():
    profile = load_profile("demo")
    assert profile.datasets["rafdb"].ingest.face_size == 32          # its own
    assert profile.datasets["rafdb"].ingest.shard_size == profile.ingest.shard_size  # the profile's default


def test_action_units_are_validated_and_reach_the_adapter():
    raw = _raw("demo")
    raw["action_units"] = ["AU12", "AU6", "AU4"]
    profile = parse_profile(raw, "demo.yaml")
    assert profile.adapter_config().au_names == ("AU12", "AU6", "AU4")
    raw["action_units"] = ["AU12", "AU12", "smile"]
    with pytest.raises(ProfileError, match="action_units"):
        parse_profile(raw, "demo.yaml")


def test_environment_placeholders_are_expanded(monkeypatch):
    monkeypatch.setenv("SYNFER_STORAGE", "s3://my-bucket/run7")
    monkeypatch.setenv("SYNFER_DATA", "/mnt/faces")
    paper = load_profile("paper")
    assert paper.storage_root == "s3://my-bucket/run7"
    assert paper.datasets["rafdb"].uri == "/mnt/faces/rafdb/basic"


def test_profile_is_chosen_by_one_setting(monkeypatch):
    monkeypatch.setenv("SYNFER_PROFILE", "paper")
    assert load_profile().name == "paper"


def test_a_typo_in_a_profile_file_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("storage: {root: /tmp/x}\ndatasets:\n  a: {format: folder, uri: /tmp/a, ingest: {face_sise: 64}}\n")
    with pytest.raises(ProfileError, match=r"datasets\.a\.ingest\.face_sise: unknown key"):
        load_profile(str(path))


def test_unknown_profile_names_the_missing_file():
    with pytest.raises(FileNotFoundError, match="profile 'nope'"):
        load_profile("nope")


def test_label_sections_are_typed_and_voting_weights_must_name_voters():
    profile = load_profile("demo")
    assert profile.feranno_votes and profile.labels.feranno.timestep == 1
    assert profile.labels.feranno.conditioning == "fixed"  # a synthetic image's prompt names its intended label
    assert profile.fer_classifiers.guide not in profile.fer_classifiers.voters
    assert profile.fer_evaluation.train.resnet_depths == (2, 2, 2, 2)  # ResNet-18 depth
    assert load_profile("paper").fer_evaluation.train.resnet_widths == (64, 128, 256, 512)
    raw = _raw("demo")
    raw["labels"]["voting"] = {"weights": {"resnet-guide": 2.0}, "min_confidence": 1.5}
    raw["labels"]["feranno"]["conditioning"] = "prompt"
    with pytest.raises(ProfileError) as err:
        parse_profile(raw, "demo.yaml")
    text = str(err.value)
    assert "labels.voting: min_confidence must lie in [0, 1]" in text
    assert "labels.feranno.conditioning" in text and "'prompt'" in text
    raw = _raw("demo")
    raw["labels"]["voting"] = {"weights": {"resnet-guide": 2.0}}
    with pytest.raises(ProfileError, match=r"labels.voting.weights names \['resnet-guide'\], which are not voters"):
        parse_profile(raw, "demo.yaml")
