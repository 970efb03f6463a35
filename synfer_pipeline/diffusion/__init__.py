"""Diffusion fine-tuning for SynFER: the tiny demo model, FEText streaming, the resumable training loop, reports.

Public entry points: `train_unet` (stages 1 and 2), `TrainSettings`, `TrainReport`, `save_tiny_sd`,
`loss_curve_png`, `sample_grid`. The AU adapter lives in `synfer_pipeline.au_adapter` and trains with the same loop.
"""

from .report import loss_curve_png, sample_grid
from .settings import TrainReport, TrainSettings
from .tiny import save_tiny_sd
from .train import train_unet, weights_version

__all__ = ["TrainReport", "TrainSettings", "loss_curve_png", "sample_grid", "save_tiny_sd", "train_unet",
           "weights_version"]
