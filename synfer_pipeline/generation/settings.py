"""Fine-tuning settings and the report a training run returns (plain data: profiles fill them, assets show them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from diffusers.optimization import SchedulerType

from synfer_pipeline.settings import settings

MIXED_PRECISION = ("no", "fp16", "bf16")
OPERATIONAL = ("checkpointing_steps", "checkpoints_total_limit")  # may change on resume


@settings
class TrainSettings:
    """Hyper-parameters of one fine-tuning run (UNet stage 1 or 2, or the AU adapter).

    Sizes are per process: the effective batch is train_batch_size x gradient_accumulation_steps x processes.
    resolution: training image side in pixels (multiple of 8); max_train_steps: optimizer steps in all;
    lr_scheduler: a diffusers scheduler name ("constant", "constant_with_warmup", "cosine", "linear", ...);
    lr_warmup_steps: optimizer steps of linear warm-up; max_grad_norm: clip norm (None or 0: no clipping);
    mixed_precision: "no" | "fp16" | "bf16" (autocast; master weights and saved weights stay float32);
    caption_dropout: probability of training a sample with the empty caption (classifier-free guidance);
    checkpointing_steps: save the full state every N optimizer steps (None: never, not even at the end);
    checkpoints_total_limit: checkpoints kept (None: all); noise_offset: std of a per-channel offset added to
    the noise; snr_gamma: min-SNR loss weighting gamma (None: plain MSE); dataloader_num_workers: decoding
    processes (0: in the training process);
    native_hr_only: train only on native high-resolution samples (stage 2); sources: keep only these sources;
    deterministic: deterministic GPU kernels, so that runs (and resumed runs) are bit-identical there too (slower;
    on the CPU runs are bit-identical without it).
    """

    resolution: int = 512
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10_000
    learning_rate: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1
    checkpointing_steps: int | None = 500
    checkpoints_total_limit: int | None = 3
    seed: int = 0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    dataloader_num_workers: int = 0
    native_hr_only: bool = False
    sources: tuple[str, ...] | None = None
    deterministic: bool = False

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lr_scheduler not in {s.value for s in SchedulerType}:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; one of {[s.value for s in SchedulerType]}")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} is not a multiple of 8 (the VAE's downsampling)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {self.caption_dropout} is not a probability")
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError("checkpointing_steps must be None or at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources) if self.sources is not None else None
        return d

    def numerics(self) -> dict[str, Any]:
        """The settings that change what a step computes: everything but the checkpoint cadence and limit, which
        may change between a run and its resume."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}


@dataclass(frozen=True)
class TrainReport:
    """What a run did. Counters are totals over the whole run (a resumed run includes the steps before the
    interruption) and over all processes; seconds and samples_per_s cover this invocation only.

    steps: optimizer steps done; samples_seen: training samples consumed; losses: mean loss per optimizer step;
    final_lr: learning rate after the last step; data_version: sha256 (hex) over the safetensors files written to
    the output folder; resumed_from: the checkpoint step this invocation started from (None: from scratch);
    samples_by_source: samples seen per FEText source; native_hr_samples: how many of them were native_hr;
    trainable_parameters: number of parameters the optimizer updated; extra: run-specific facts.
    """

    steps: int
    samples_seen: int
    losses: list[float]
    seconds: float
    samples_per_s: float
    final_lr: float
    data_version: str
    resumed_from: int | None
    steps_this_run: int = 0
    samples_by_source: dict[str, int] = field(default_factory=dict)
    native_hr_samples: int = 0
    trainable_parameters: int = 0
    output_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
