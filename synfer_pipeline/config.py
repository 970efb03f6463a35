"""Configuration profiles: YAML files a user edits (`profiles/demo.yaml`, `profiles/paper.yaml`, or their own).

One setting chooses the profile: `SYNFER_PROFILE` (a name under `profiles/` or a path; default `demo`). Values may use
`${VAR}` and `${VAR:-default}` to read the environment (paths, buckets; never put secrets in a profile).

A profile is parsed by typed models: every section, including those only a GPU machine reads, is validated when the
profile is loaded, through the same settings classes the library's functions take (each wing declares its own with
`synfer_pipeline.settings.settings`). Values are coerced where unambiguous (YAML's `1e-4` is a string; it becomes
the float 0.0001) and checked; an unknown key is an error. `ProfileError` names the file, the key path, the value
and what was expected, for every faulty key at once.

This module sits below the wings it assembles: it imports their settings classes, and no wing imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synfer_pipeline.curation.au_detector import AUDetectorSettings, AUDetectorSpec, TrainedAUDetectorSpec
from synfer_pipeline.curation.captions.run import CaptionerSpec, TemplateSpec
from synfer_pipeline.curation.fetext import FETextSettings
from synfer_pipeline.curation.ingest import IngestSettings
from synfer_pipeline.curation.readers import READERS
from synfer_pipeline.curation.superres import LanczosSpec, SuperResSettings, UpscalerSpec
from synfer_pipeline.demo.data import DemoDataSettings
from synfer_pipeline.evaluation.downstream import DownstreamSettings
from synfer_pipeline.evaluation.generation_quality import EvaluationBatchSettings
from synfer_pipeline.fer.classifiers import FERSpec
from synfer_pipeline.generation.au_adapter import AUAdapterConfig
from synfer_pipeline.generation.rounds import RoundSettings
from synfer_pipeline.generation.settings import TrainSettings
from synfer_pipeline.labels.feranno import FERAnnoSettings
from synfer_pipeline.labels.voting import VotingSettings
from synfer_pipeline.torch_utils import DTYPES
from synfer_pipeline.vocab import OPENGRAPHAU_41

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_AU_NAME = re.compile(r"AU[LR]?\d+")


class ProfileError(ValueError):
    """A profile that does not parse: the message names the file and every faulty key path."""


class Section(BaseModel):
    """A profile section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class StorageSection(Section):
    root: str                      # local folder or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (default: AWS_ENDPOINT_URL)


class DatasetConfig(Section):
    """One source dataset: a partition of every per-dataset asset."""

    name: str
    format: Literal[tuple(READERS)]  # type: ignore[valid-type]
    uri: str                       # local path or s3:// url of the source in its own layout
    native_hr: bool = False        # native high resolution (FFHQ, CelebA-HQ): no super-resolution, used in stage 2
    options: dict[str, Any] = Field(default_factory=dict)  # reader options (RAF-DB variant, FERPlus csv...)
    ingest: IngestSettings = Field(default_factory=IngestSettings)


class ChecksSection(Section):
    max_reject_rate: float = Field(0.05, ge=0, le=1)          # raw_faces: share of bad input that fails the check
    max_caption_reject_rate: float = Field(0.5, ge=0, le=1)   # fetext: share of rejected captions that warns


class ComputeSection(Section):
    """device / dtype: where and in what precision models run; num_processes: processes for one training loop
    (generator stages and AU adapter): one per GPU on a multi-GPU machine, launched by `torch.distributed.run`
    inside the step (synfer_pipeline/generation/launch.py); the global batch is train_batch_size x num_processes."""

    device: str = "cpu"            # cpu | cuda | cuda:N | mps | auto
    dtype: Literal[tuple(DTYPES)] = "float32"  # type: ignore[valid-type]
    num_processes: int = Field(1, ge=1)


class BaseDiffusionSpec(Section):
    id: str                        # hub id or local diffusers folder


class ModelsSection(Section):
    """Model roles: a hub id or local path each, or an honest classical/template fallback named as such."""

    superres: UpscalerSpec = Field(default_factory=LanczosSpec)
    au_detector: AUDetectorSpec = Field(default_factory=TrainedAUDetectorSpec)
    captioner: CaptionerSpec = Field(default_factory=TemplateSpec)
    base_diffusion: BaseDiffusionSpec | None = None
    fer_reference: FERSpec | None = None   # the expression of unlabelled images, for caption validation
    tiny_decoder: BaseDiffusionSpec | None = None  # an AutoencoderTiny (TAESD) folder or hub id: guidance's fast x0 decoder


class AUDetectorSection(Section):
    train_on: dict[str, str] = Field(default_factory=dict)  # dataset -> AU csv (relative to its uri, or absolute)
    train: AUDetectorSettings = Field(default_factory=AUDetectorSettings)


class CaptionsSection(Section):
    chunk: int = Field(64, ge=1)   # captions cached every chunk (a killed run loses at most one chunk)


class AdapterSection(Section):
    """The AU adapter's architecture (its AU list is the profile's `action_units`)."""

    num_tokens: int = Field(4, ge=1)
    hidden_dim: int = Field(256, ge=1)
    au_dropout: float = Field(0.1, ge=0, le=1)
    scale: float = 1.0


class GeneratorSection(Section):
    stage1: TrainSettings = Field(default_factory=TrainSettings)
    stage2: TrainSettings = Field(default_factory=lambda: TrainSettings(native_hr_only=True))
    au_adapter: TrainSettings = Field(default_factory=TrainSettings)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    evaluation: EvaluationBatchSettings = Field(default_factory=EvaluationBatchSettings)  # generation quality batch


FERANNO = "feranno"  # the voter name of the FERAnno classifier (step 7), which is trained on the UNet's features


class FERClassifiersSection(Section):
    """FER classifiers by name, and the roles they play.

    guide: steers semantic guidance; judge: measures generated images (FER acc) and must not be the guide;
    voters: label synthetic images (`feranno` names FERAnno); reference: the expression of unlabelled images for
    caption validation (default: `models.fer_reference`); train_on: labelled datasets whose train split trains the
    `train` kinds and whose test split scores every classifier.
    """

    classifiers: dict[str, FERSpec] = Field(default_factory=dict)
    guide: str | None = None
    judge: str | None = None
    voters: tuple[str, ...] = ()
    train_on: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _roles_name_classifiers(self) -> FERClassifiersSection:
        for role, name in (("guide", self.guide), ("judge", self.judge)):
            if name is not None and name not in self.classifiers:
                raise ValueError(f"{role} {name!r} is not one of the classifiers ({', '.join(self.classifiers)})")
        unknown = [v for v in self.voters if v not in self.classifiers and v != FERANNO]
        if unknown:
            raise ValueError(f"voters {unknown} are not classifiers ({', '.join(self.classifiers)}) nor {FERANNO!r}")
        if self.guide is not None and self.judge is not None and (
                self.guide == self.judge or self.classifiers[self.guide] == self.classifiers[self.judge]):
            raise ValueError(f"the judge must not be the guide ({self.judge!r} would judge the images it steered: "
                             "a circular metric that over-states FER accuracy); choose another judge")
        return self


class ExecutionSection(Section):
    """Where steps run (assets/execution.py). executor: in_process | multiprocess | docker | k8s; max_concurrent:
    steps at once; preload_modules: what the multiprocess forkserver imports once; image: the step image (docker,
    k8s); env_vars: passed to step containers (names, or NAME=value; secrets stay in the environment); namespace:
    Kubernetes namespace; gpus_per_step, gpu_limits (extra limits, e.g. memory), node_selector, tolerations: what a
    GPU step's Kubernetes Job requests."""

    executor: Literal["in_process", "multiprocess", "docker", "k8s"] = "multiprocess"
    max_concurrent: int = Field(4, ge=1)
    preload_modules: tuple[str, ...] = ("torch", "diffusers", "transformers", "synfer_pipeline")
    image: str | None = None
    env_vars: tuple[str, ...] = ("SYNFER_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    namespace: str | None = None
    gpus_per_step: int = Field(1, ge=1)
    gpu_limits: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()

    @model_validator(mode="after")
    def _image_for_containers(self) -> ExecutionSection:
        if self.executor in ("docker", "k8s") and not self.image:
            raise ValueError(f"executor {self.executor!r} runs every step in a container: set execution.image")
        return self


class LabelsSection(Section):
    """feranno: the FERAnno classifier trained on the stage-2 UNet's features (a voter when `fer_classifiers.voters`
    names `feranno`); voting: how the voters' probabilities become labels."""

    feranno: FERAnnoSettings = Field(default_factory=FERAnnoSettings)
    voting: VotingSettings = Field(default_factory=VotingSettings)


class Profile(Section):
    """A validated profile. Sections are typed; `dataset(name)` and `model(role)` look things up with clear errors."""

    name: str
    path: str
    storage: StorageSection
    datasets: dict[str, DatasetConfig]
    ingest: IngestSettings = Field(default_factory=IngestSettings)  # defaults for every dataset's ingest
    checks: ChecksSection = Field(default_factory=ChecksSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    action_units: tuple[str, ...] = OPENGRAPHAU_41
    superres: SuperResSettings = Field(default_factory=SuperResSettings)
    au_detector: AUDetectorSection = Field(default_factory=AUDetectorSection)
    captions: CaptionsSection = Field(default_factory=CaptionsSection)
    fetext: FETextSettings = Field(default_factory=FETextSettings)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    fer_classifiers: FERClassifiersSection = Field(default_factory=FERClassifiersSection)
    generation: RoundSettings = Field(default_factory=RoundSettings)
    labels: LabelsSection = Field(default_factory=LabelsSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)
    fer_evaluation: DownstreamSettings = Field(default_factory=DownstreamSettings)
    demo_data: DemoDataSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_datasets(cls, raw: Any) -> Any:
        """Each dataset gets its name and the profile's `ingest` defaults under its own `ingest` overrides."""
        if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
            return raw
        defaults = raw.get("ingest") or {}
        datasets = {}
        for name, spec in raw["datasets"].items():
            if isinstance(spec, dict):
                own = spec.get("ingest") or {}
                spec = {**spec, "name": name, "ingest": {**defaults, **own} if isinstance(own, dict) else own}
            datasets[name] = spec
        return {**raw, "datasets": datasets}

    @field_validator("action_units")
    @classmethod
    def _known_au_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in names if not _AU_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"action unit names must look like AU12 or AUL1; got {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"action units are listed twice: {sorted({n for n in names if names.count(n) > 1})}")
        return names

    @model_validator(mode="after")
    def _fer_training_sources(self) -> Profile:
        missing = [d for d in self.fer_classifiers.train_on if d not in self.datasets]
        if missing:
            raise ValueError(f"fer_classifiers.train_on names datasets the profile does not have: {missing}")
        strangers = [v for v in self.labels.voting.weights if v not in self.fer_classifiers.voters]
        if strangers:
            raise ValueError(f"labels.voting.weights names {strangers}, which are not voters "
                             f"(fer_classifiers.voters: {list(self.fer_classifiers.voters)})")
        n, gpus = self.compute.num_processes, self.execution.gpus_per_step
        if n > 1 and self.execution.executor == "k8s" and self.compute.device != "cpu" and n > gpus:
            raise ValueError(f"compute.num_processes is {n} but a GPU step's Kubernetes Job requests "
                             f"execution.gpus_per_step = {gpus} GPU(s): one process per GPU needs {n}")
        return self

    @property
    def feranno_votes(self) -> bool:
        return FERANNO in self.fer_classifiers.voters

    @property
    def storage_root(self) -> str:
        return self.storage.root

    @property
    def au_names(self) -> tuple[str, ...]:
        """The configured action-unit list (default: OpenGraphAU's 41, in its order)."""
        return self.action_units

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise KeyError(f"dataset {name!r} is not in profile {self.name} ({self.path}); has {sorted(self.datasets)}")
        return self.datasets[name]

    def model(self, role: str):
        """A model role's typed spec, or None when the profile leaves it out."""
        if role not in ModelsSection.model_fields:
            raise KeyError(f"unknown model role {role!r}; roles: {sorted(ModelsSection.model_fields)}")
        return getattr(self.models, role)

    def base_model_id(self) -> str:
        """The base diffusion model (hub id or diffusers folder) that stage 1 fine-tunes."""
        if self.models.base_diffusion is None:
            raise ProfileError(f"profile {self.path}: models.base_diffusion.id is missing (a hub id or diffusers folder)")
        return self.models.base_diffusion.id

    def adapter_config(self) -> AUAdapterConfig:
        """The AU adapter's configuration: its architecture section and the profile's AU list."""
        return AUAdapterConfig(au_names=self.au_names, **self.generator.adapter.model_dump())


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def profile_path(name_or_path: str | None = None) -> Path:
    """The YAML file for a profile name (`demo`, `paper`) or path; default from `SYNFER_PROFILE`, else demo."""
    choice = name_or_path or os.environ.get("SYNFER_PROFILE") or "demo"
    path = Path(choice)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{choice}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"profile {choice!r}: {path} does not exist (profiles: {sorted(p.stem for p in PROFILES_DIR.glob('*.yaml'))})")
    return path


def _describe_error(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) or len(repr(value)) < 120 else "{...}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key (a typo?)"
    return f"  {where}: {message} (got {shown})"


def parse_profile(raw: dict, path: str, name: str | None = None) -> Profile:
    """Validate a profile mapping (already read from YAML and env-expanded); ProfileError lists every fault."""
    raw = dict(raw or {})
    raw.setdefault("name", name or Path(path).stem)
    raw["path"] = str(path)
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        faults = "\n".join(_describe_error(err) for err in e.errors())
        raise ProfileError(f"profile {path} does not parse ({e.error_count()} fault(s)):\n{faults}") from None


def load_profile(name_or_path: str | None = None) -> Profile:
    """Read, expand and validate a profile; see the module docstring."""
    path = profile_path(name_or_path)
    raw = _expand(yaml.safe_load(path.read_text()) or {})
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path}: the file must hold a mapping of sections, not {type(raw).__name__}")
    return parse_profile(raw, str(path))
