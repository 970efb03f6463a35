"""The resumable fine-tuning loop shared by the UNet (stages 1 and 2) and the AU adapter.

It reads like diffusers' `train_text_to_image.py`: an `Accelerator` owns devices, mixed precision, gradient
accumulation and multi-GPU; the model, optimizer and LR scheduler go through `prepare`; each optimizer step runs
`gradient_accumulation_steps` micro-batches under `accumulate`, clips gradients when they sync, updates the EMA.
What differs: randomness is a function of (seed, step, micro-batch, sample key) rather than of a generator carried
through the run, and the data position is saved with every checkpoint, so a resumed run reproduces an uninterrupted
one, and N processes reproduce one process with N times their batch.

The data loader is not passed to `prepare`: accelerate would dispatch one iterable from the main process, whereas
here every process streams its own shards (see `data.py`), which is what makes the position per process exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from synfer_pipeline.generation import checkpoints as ckpt
from synfer_pipeline.generation.data import BatchFeed, StreamSpec
from synfer_pipeline.generation.settings import TrainReport, TrainSettings
from synfer_pipeline.torch_utils import weight_dtype

TRAINABLE_FILE = "trainable.safetensors"
_BATCH_TENSORS = ("pixel_values", "input_ids", "au", "au_dropped", "labels")


@dataclass
class TrainJob:
    """What the loop trains.

    model: the module prepared with accelerate and called by `loss` (the UNet, possibly carrying the AU adapter);
    parameters: the parameters the optimizer updates (all others must have requires_grad False);
    frozen: modules moved to the device in the mixed-precision dtype (VAE, text encoder);
    loss: (prepared model, batch on device, SampleRandomness) -> scalar loss, the mean over the batch's samples;
    tokenizer: for the data stream; au_dropout / au_names: AU dropout probability and the AU order the job reads
    (None: the job reads no AUs, as the UNet stages);
    trainable_state_only: checkpoints hold only `parameters` (the adapter) instead of the whole model;
    fingerprint: extra values that must match for a resume (base model, adapter config...).
    """

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    frozen: list[torch.nn.Module]
    loss: Callable[[torch.nn.Module, dict, SampleRandomness], torch.Tensor]
    tokenizer: object
    au_dropout: float = 0.0
    au_names: tuple[str, ...] | None = None
    trainable_state_only: bool = False
    fingerprint: dict = field(default_factory=dict)


@dataclass
class LoopResult:
    """The loop's outcome: the report (data_version still empty), the accelerator and the EMA (or None)."""

    report: TrainReport
    accelerator: Accelerator
    ema: EMAModel | None
    model: torch.nn.Module  # unwrapped, float32 master weights


class SampleRandomness:
    """The random draws of one micro-batch, made per sample: sample `key`'s VAE sample, noise and timestep come from
    a generator seeded by (seed, step, micro-batch, key) alone, not by the process or the batch the sample is in.
    So N processes with batch b draw exactly what one process with batch N*b draws for the same samples, and a
    multi-process run computes the single-process run's gradients (up to the reduction's float rounding).

    Draws are made on the CPU (identical on every device) and copied to `device` in one transfer per draw.
    """

    def __init__(self, seed: int, step: int, micro: int, keys: list[str]):
        self.generators = [torch.Generator().manual_seed(_seed_of(f"{seed}:{step}:{micro}:{key}")) for key in keys]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(batch, *shape) standard normal draws, one row per sample."""
        draws = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return draws.to(device, non_blocking=True)

    def randint(self, high: int, device: torch.device) -> torch.Tensor:
        """(batch,) integers in [0, high), one per sample."""
        draws = torch.stack([torch.randint(0, high, (), generator=g) for g in self.generators])
        return draws.to(device, non_blocking=True)


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") & (2**63 - 1)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if k in _BATCH_TENSORS else v) for k, v in batch.items()}


def _fingerprint(settings: TrainSettings, job: TrainJob, urls: list[str], accelerator: Accelerator) -> dict:
    # Everything that changes the numbers a step computes; operational settings (checkpoint cadence) may change.
    return {"settings": settings.numerics(), "shard_urls": list(urls), "num_processes": accelerator.num_processes, **job.fingerprint}


def _register_trainable_only_hooks(accelerator: Accelerator, job: TrainJob) -> None:
    """Checkpoint only the trained parameters (an adapter is megabytes; the frozen UNet it rides on is gigabytes)."""

    def named_trainable(model):
        return {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in named_trainable(models[0]).items()}
            save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()  # accelerate then writes no full-model file

    def load_hook(models, input_dir):
        params = named_trainable(models[0])
        state = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
            raise ValueError(f"{input_dir}/{TRAINABLE_FILE} holds other parameters than the model trains "
                             f"(missing {missing}, extra {extra})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        models.clear()  # loaded here; accelerate must not look for a full-model file

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _make_accelerator(settings: TrainSettings) -> Accelerator:
    # accelerate keeps one process-wide state; a second run in the same process (stage 2 after stage 1 in an
    # in-process executor) may use another precision or accumulation. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=settings.gradient_accumulation_steps,
                              mixed_precision=settings.mixed_precision)
    if settings.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: much faster matmuls, precision ample for training
    return accelerator


def _optimizer_and_schedule(settings: TrainSettings, job: TrainJob, accelerator: Accelerator):
    lr = settings.learning_rate
    if settings.scale_lr:
        lr *= settings.gradient_accumulation_steps * settings.train_batch_size * accelerator.num_processes
    # foreach: one kernel over all parameters (the default only on GPUs; on a CPU the per-tensor loop cost a
    # tenth of the demo's step time)
    optimizer = torch.optim.AdamW(job.parameters, lr=lr, betas=(settings.adam_beta1, settings.adam_beta2),
                                  weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon, foreach=True)
    # A prepared scheduler steps once per process at every optimizer step: count the schedule in those ticks.
    schedule = get_scheduler(settings.lr_scheduler, optimizer,
                             num_warmup_steps=settings.lr_warmup_steps * accelerator.num_processes,
                             num_training_steps=settings.max_train_steps * accelerator.num_processes)
    return optimizer, schedule


def _stream_spec(settings: TrainSettings, job: TrainJob, urls: list[str], accelerator: Accelerator) -> StreamSpec:
    return StreamSpec(
        urls=tuple(urls), resolution=settings.resolution, batch_size=settings.train_batch_size, seed=settings.seed,
        caption_dropout=settings.caption_dropout, au_dropout=job.au_dropout, native_hr_only=settings.native_hr_only,
        sources=settings.sources, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_streams=max(1, settings.dataloader_num_workers),
        au_names=tuple(job.au_names) if job.au_names is not None else None,
    )


def _count(progress: ckpt.Progress, batch: dict) -> None:
    progress.samples_seen += len(batch["keys"])
    progress.by_source.update(batch["sources"])
    progress.native_hr += sum(batch["native_hr"])


class _LossLog:
    """Per-step losses are copied to the host asynchronously and read one step late: reading each loss at once
    (or launching any kernel to read it) would make the host wait for the device's whole queue at every step."""

    def __init__(self, progress: ckpt.Progress, log: Callable[[dict], None] | None, is_main: bool):
        self.progress, self.log, self.is_main = progress, log, is_main
        self.pending: list[tuple[dict, torch.Tensor, torch.cuda.Event | None]] = []

    def push(self, record: dict, loss: torch.Tensor) -> None:
        event = None
        if loss.is_cuda:
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            event = torch.cuda.Event()
            event.record()  # marks the copy in the stream: waiting for it does not wait for later kernels
            loss = host
        self.pending.append((record, loss, event))

    def flush(self, keep: int = 0) -> None:
        """Read all pending losses but the last `keep`, append them to the progress and pass them to `log`."""
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        for record, loss, event in ready:
            if event is not None:
                event.synchronize()
            value = float(loss)
            self.progress.losses.append(value)
            if self.is_main and self.log is not None:
                self.log({**record, "loss": value})


@contextlib.contextmanager
def _determinism(enabled: bool):
    """Deterministic kernels for the duration of a run (bit-identical GPU runs, slower); restored afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def run_training(settings: TrainSettings, job: TrainJob, shard_urls: list[str], state_dir: Path,
                 on_checkpoint: Callable[[Path], None] | None = None,
                 log: Callable[[dict], None] | None = None) -> LoopResult:
    """Train `job` on FEText shards until `settings.max_train_steps`, resuming from `state_dir` if it has a checkpoint.

    Every `settings.checkpointing_steps` optimizer steps (and after the last one) the full state is saved atomically
    to `state_dir/checkpoint-{step}`; `on_checkpoint(folder)` is then called on the main process. `log(record)` is
    called on the main process once per optimizer step with step, loss, lr, epoch, samples_seen (one step late,
    and for the last steps before a checkpoint and at the end).
    Returns the report (losses per optimizer step for the whole run, including steps before a resume).
    """
    with _determinism(settings.deterministic):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        run = _setup(settings, job, shard_urls, state_dir)
        accelerator, progress = run.accelerator, run.progress
        start, start_step, start_samples = time.perf_counter(), progress.step, progress.samples_seen
        losses = _LossLog(progress, log, accelerator.is_main_process)
        try:
            while progress.step < settings.max_train_steps:
                loss = _optimizer_step(settings, run, job)
                if run.ema is not None:
                    run.ema.step(job.parameters)
                progress.step += 1
                losses.push({"step": progress.step, "lr": run.schedule.get_last_lr()[0],
                             "epoch": max(progress.position.epochs), "samples_seen": progress.samples_seen}, loss)
                losses.flush(keep=1)
                every = settings.checkpointing_steps
                if every and (progress.step % every == 0 or progress.step == settings.max_train_steps):
                    losses.flush()
                    folder = ckpt.save_checkpoint(accelerator, state_dir, progress, run.fingerprint, run.ema,
                                                settings.checkpoints_total_limit)
                    if accelerator.is_main_process and on_checkpoint is not None:
                        on_checkpoint(folder)
            losses.flush()
        finally:
            run.feed.close()
        seconds = time.perf_counter() - start
        report = _report(accelerator, progress, run.schedule, seconds, progress.samples_seen - start_samples,
                         run.resumed_from, job, start_step)
        unwrapped = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
        return LoopResult(report=report, accelerator=accelerator, ema=run.ema, model=unwrapped)


@dataclass
class _Run:
    """Everything a run holds between steps."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object
    ema: EMAModel | None
    feed: BatchFeed
    progress: ckpt.Progress
    fingerprint: dict
    resumed_from: int | None


def _setup(settings: TrainSettings, job: TrainJob, shard_urls: list[str], state_dir: Path) -> _Run:
    """Accelerator, devices, optimizer, schedule, EMA, and the state of the latest checkpoint if there is one."""
    accelerator = _make_accelerator(settings)
    device, dtype = accelerator.device, weight_dtype(settings.mixed_precision)
    for module in job.frozen:
        module.requires_grad_(False)
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype=dtype)  # frozen parts in half precision, as in diffusers' script
    if settings.gradient_checkpointing:
        job.model.enable_gradient_checkpointing()
    if job.trainable_state_only:
        _register_trainable_only_hooks(accelerator, job)
    optimizer, schedule = _optimizer_and_schedule(settings, job, accelerator)
    model, optimizer, schedule = accelerator.prepare(job.model, optimizer, schedule)
    ema = None
    if settings.use_ema:
        ema = EMAModel(job.parameters, decay=settings.ema_decay)
        ema.to(device)
    fingerprint = _fingerprint(settings, job, shard_urls, accelerator)
    spec = _stream_spec(settings, job, shard_urls, accelerator)
    progress, resumed_from = ckpt.resume(accelerator, state_dir, fingerprint, ema, spec.num_streams)
    feed = BatchFeed(spec, job.tokenizer, settings.dataloader_num_workers, progress.position,
                     pin_memory=device.type == "cuda")
    return _Run(accelerator, model, optimizer, schedule, ema, feed, progress, fingerprint, resumed_from)


def _optimizer_step(settings: TrainSettings, run: _Run, job: TrainJob) -> torch.Tensor:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss over them and
    over all processes, as a device scalar (not read here, so the host does not wait for the device)."""
    accelerator, model, progress = run.accelerator, run.model, run.progress
    total = torch.zeros((), device=accelerator.device)
    for micro in range(settings.gradient_accumulation_steps):
        batch = _to_device(next(run.feed), accelerator.device)
        _count(progress, batch)
        randomness = SampleRandomness(settings.seed, progress.step, micro, batch["keys"])
        with accelerator.accumulate(model):
            loss = job.loss(model, batch, randomness)
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.max_grad_norm:
                accelerator.clip_grad_norm_(job.parameters, settings.max_grad_norm)
            run.optimizer.step()
            run.schedule.step()
            run.optimizer.zero_grad(set_to_none=True)
        total += accelerator.gather(loss.detach()).mean()
    if not accelerator.sync_gradients:  # accelerate's step counter and ours disagree: gradients would leak across steps
        raise RuntimeError("gradient accumulation out of step with the optimizer steps")
    return total / settings.gradient_accumulation_steps


def _report(accelerator, progress: ckpt.Progress, schedule, seconds: float, samples_now: int, resumed_from,
            job: TrainJob, start_step: int) -> TrainReport:
    # Counters are per process; the report gives the totals over all processes.
    per_process = gather_object([(progress.samples_seen, dict(progress.by_source), progress.native_hr, samples_now)])
    by_source: Counter = Counter()
    for _, counts, _, _ in per_process:
        by_source.update(counts)
    samples_now_all = sum(p[3] for p in per_process)
    return TrainReport(
        steps=progress.step,
        samples_seen=sum(p[0] for p in per_process),
        losses=list(progress.losses),
        seconds=seconds,
        samples_per_s=samples_now_all / seconds if seconds > 0 else 0.0,
        final_lr=float(schedule.get_last_lr()[0]),
        data_version="",
        resumed_from=resumed_from,
        steps_this_run=progress.step - start_step,
        samples_by_source=dict(sorted(by_source.items())),
        native_hr_samples=sum(p[2] for p in per_process),
        trainable_parameters=sum(p.numel() for p in job.parameters),
    )
