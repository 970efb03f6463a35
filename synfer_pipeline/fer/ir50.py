"""IR-50 (the ArcFace "improved residual" ResNet of face.evoLVe), as POSTER++ and APViT both use it.

Both repositories build the same residual unit (BN -> 3x3 conv -> PReLU -> 3x3 conv (stride) -> BN, plus a shortcut)
and use only the first three of IR-50's four stages on a 112x112 input: (64, 56, 56), (128, 28, 28), (256, 14, 14).
They differ only in how the stages are held, hence in the checkpoint keys, so each model gets its own container:

  POSTER++ (`models/ir50.py`, `Backbone(50, 0.0, 'ir')`):  input_layer, output_layer (unused), body1, body2, body3
  APViT (`mmcls/models/backbones/irse.py`, `IRSE`):      input_layer, body.0, body.1, body.2

Attribute names below are the checkpoint's key names; they are not ours to choose.
"""

from __future__ import annotations

import torch
from torch import nn

# (in channels, out channels, units) of the three stages both models use; IR-50's 4th stage (512, 3 units) is unused.
IR50_STAGES: tuple[tuple[int, int, int], ...] = ((64, 64, 3), (64, 128, 4), (128, 256, 14))


class IRUnit(nn.Module):
    """One IR bottleneck: `res_layer(x) + shortcut_layer(x)`; the first unit of a stage halves H and W.

    (N, C_in, H, W) -> (N, C_out, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == out_channels:
            # a 1x1 max-pool with a stride is plain subsampling: no weights, as in the original
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_stage(in_channels: int, out_channels: int, units: int) -> nn.Sequential:
    """A stage: a stride-2 unit, then `units - 1` stride-1 units at `out_channels`."""
    blocks = [IRUnit(in_channels, out_channels, 2)]
    blocks += [IRUnit(out_channels, out_channels, 1) for _ in range(units - 1)]
    return nn.Sequential(*blocks)


def ir_input_layer() -> nn.Sequential:
    """The stem: 3x3 conv (no stride) -> BN -> PReLU, (N, 3, 112, 112) -> (N, 64, 112, 112)."""
    return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class PosterIR50(nn.Module):
    """POSTER++'s `ir_back`: the stem and stages 1-3, returning all three feature maps.

    forward: (N, 3, S, S) normalised image -> nearest-resized to 112 inside (as the original does) ->
    ((N, 64, 56, 56), (N, 128, 28, 28), (N, 256, 14, 14)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = ir_input_layer()
        # ArcFace's embedding head: POSTER++ never calls it, but its 12.8M weights are in every released checkpoint
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.0), _Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))
        self.body1, self.body2, self.body3 = (ir_stage(*stage) for stage in IR50_STAGES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.input_layer(nn.functional.interpolate(x, size=112))
        x1 = self.body1(x)
        x2 = self.body2(x1)
        return x1, x2, self.body3(x2)


class APViTIR50(nn.Module):
    """APViT's `extractor` (`IRSE(num_layers=50, return_index=[2])`): stem and stages 1-3, returning stage 3 only.

    forward: (N, 3, 112, 112) normalised image -> (N, 256, 14, 14).
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = ir_input_layer()
        self.body = nn.ModuleList(ir_stage(*stage) for stage in IR50_STAGES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        for stage in self.body:
            x = stage(x)
        return x
