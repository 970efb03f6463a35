"""MobileFaceNet, the facial-landmark network whose feature maps POSTER++ uses as cross-attention queries.

Read from POSTER_V2 `models/mobilefacenet.py` (`MobileFaceNet([112, 112], 136)`: 68 landmarks x 2 coordinates, GDC
head). POSTER++ loads it pre-trained and freezes it; it uses three intermediate maps, never the landmark output, so
`forward` stops before the GDC head, which is kept only because its weights are in the released checkpoints.
Attribute names are the checkpoint's key names.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNPReLU(nn.Module):
    """conv (no bias) -> BN -> PReLU; keys `conv`, `bn`, `prelu` (the original's `Conv_block`)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.prelu = nn.PReLU(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class ConvBN(nn.Module):
    """conv (no bias) -> BN, no activation; keys `conv`, `bn` (the original's `Linear_block`)."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden` -> 3x3 depthwise (stride) -> 1x1 linear projection to `out_c`.

    With `residual` the input is added back (only used with stride 1 and in_c == out_c).
    """

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool = False) -> None:
        super().__init__()
        self.conv = ConvBNPReLU(in_c, hidden)
        self.conv_dw = ConvBNPReLU(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden)
        self.project = ConvBN(hidden, out_c)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.conv_dw(self.conv(x)))
        return x + out if self.residual else out


class Residual(nn.Module):
    """`blocks` residual DepthWise units at constant width; key prefix `model.<i>`."""

    def __init__(self, channels: int, blocks: int, hidden: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(channels, channels, hidden, 1, residual=True) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class GDCHead(nn.Module):
    """Global depthwise conv head -> landmark vector; unused by POSTER++ (its weights are in the checkpoint)."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.conv_6_dw = ConvBN(512, 512, kernel=7, groups=512)
        self.conv_6_flatten = _Flatten()
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(self.conv_6_flatten(self.conv_6_dw(x))))


class MobileFaceNet(nn.Module):
    """POSTER++'s `face_landback`.

    forward: (N, 3, 112, 112) -> the maps POSTER++ reads: ((N, 64, 28, 28), (N, 128, 14, 14), (N, 512, 7, 7)).
    `landmarks(x)` gives the (N, 136) head output, for completeness.
    """

    def __init__(self, embedding_size: int = 136) -> None:
        super().__init__()
        self.conv1 = ConvBNPReLU(3, 64, kernel=3, stride=2, padding=1)
        self.conv2_dw = ConvBNPReLU(64, 64, kernel=3, stride=1, padding=1, groups=64)
        self.conv_23 = DepthWise(64, 64, hidden=128, stride=2)
        self.conv_3 = Residual(64, blocks=4, hidden=128)
        self.conv_34 = DepthWise(64, 128, hidden=256, stride=2)
        self.conv_4 = Residual(128, blocks=6, hidden=256)
        self.conv_45 = DepthWise(128, 128, hidden=512, stride=2)
        self.conv_5 = Residual(128, blocks=2, hidden=256)
        self.conv_6_sep = ConvBNPReLU(128, 512)
        self.output_layer = GDCHead(embedding_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out3 = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(x))))
        out4 = self.conv_4(self.conv_34(out3))
        return out3, out4, self.conv_6_sep(self.conv_5(self.conv_45(out4)))

    def landmarks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> (N, embedding_size) landmark regression output."""
        return self.output_layer(self.forward(x)[2])
