"""POSTER++ (POSTER V2, Mao et al. 2023) in plain PyTorch, key-for-key compatible with the released checkpoints.

Read from github Talented-Q/POSTER_V2 `models/PosterV2_7cls.py` / `PosterV2_8cls.py` (`pyramid_trans_expr2`):

  1. a frozen MobileFaceNet (`face_landback`) gives landmark-aware maps at 28, 14 and 7 px; they become the queries;
  2. an IR-50 (`ir_back`) gives image maps at 56, 28, 14 px, each halved by a stride-2 conv (`conv1..3`);
  3. per scale, a window cross-attention (`window*`, `attn*`, `ffn*`; windows of 28, 14, 7 = one window per map)
     lets the landmark queries attend over the image keys/values, with a relative position bias;
  4. the three outputs are embedded to 49 tokens of 768 each (`embed_q`, `embed_k`, `embed_v`; 147 in all),
     and a 2-block transformer with a class token and a linear head (`VIT`) gives the logits.

Both branches see the 224x224 input nearest-resized to 112x112, as in the original. The 7- and 8-class variants
differ only in the head. Attribute names are the checkpoint's key names (after DataParallel's `module.` prefix).
"""

from __future__ import annotations

import torch
from torch import nn

from synfer_pipeline.fer.ir50 import PosterIR50
from synfer_pipeline.fer.mobilefacenet import MobileFaceNet
from synfer_pipeline.fer.poster_vit import FusionTransformer, TokenProjection

POSTER_INPUT_SIZE = 224
# Per scale: window size (= the map's side after conv1..3), attention heads, channels.
POSTER_WINDOWS = (28, 14, 7)
POSTER_HEADS = (2, 4, 8)
POSTER_DIMS = (64, 128, 256)


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into a ((2w-1)^2, heads) bias table for every (query, key) pair in a w x w window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # (2, w*w)
    delta = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # shifted to 0 .. 2w-2
    return delta[0] * (2 * window - 1) + delta[1]


def partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, H, W, C) -> (N * H/w * W/w, w*w, C), windows in row-major order within each image."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def merge_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `partition_windows`: (N * nW, w*w, C) -> (N, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def landmark_queries(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, C, H, W) landmark map -> (N, 1, heads, H*W, C/heads) queries for the window attention."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, 1, h * w, num_heads, c // num_heads).permute(0, 1, 3, 2, 4)


class WindowNorm(nn.Module):
    """LayerNorm the image map, then cut it into windows (the original's `window`).

    (N, C, H, W) -> (windows (N*nW, w*w, C), the normalised map (N, H, W, C), which is also the residual).
    """

    def __init__(self, window: int, dim: int) -> None:
        super().__init__()
        self.window_size = window
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(x.permute(0, 2, 3, 1))
        return partition_windows(x, self.window_size), x


class WindowCrossAttention(nn.Module):
    """Keys and values from the image window, queries from the landmark map, plus a learned relative position bias
    (the original's `WindowAttentionGlobal`, after Global Context ViT).

    forward: windows (N*nW, w*w, C), queries (N, 1, heads, w*w, C/heads) -> (N*nW, w*w, C).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.window_size = window
        self.num_heads = num_heads
        self.scale = (dim / num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # a persistent buffer in the original, so it is in the checkpoints (as int64)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 2, bias=True)  # keys and values only: the queries come from the landmarks
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.softmax = nn.Softmax(dim=-1)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        bw, t, c = x.shape
        head_dim = c // self.num_heads
        k, v = self.qkv(x).reshape(bw, t, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        # every window of an image shares that image's queries
        q = queries.repeat(1, bw // queries.shape[0], 1, 1, 1).reshape(bw, self.num_heads, t, head_dim)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(t, t, -1).permute(2, 0, 1)
        attn = self.attn_drop(self.softmax((q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(bw, t, c)))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowFeedForward(nn.Module):
    """Merge the attended windows back, add them to the normalised map with layer scale, then a layer-scaled MLP
    (the original's `feedforward`). (N*nW, w*w, C), residual (N, H, W, C) -> (N, H, W, C).
    """

    def __init__(self, dim: int, window: int, mlp_ratio: float = 4.0, layer_scale: float = 1e-5) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        self.window_size = window
        self.mlp = _MLP(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim)
        self.drop_path = nn.Identity()  # stochastic depth is training-only

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = residual.shape
        x = residual + self.drop_path(self.gamma1 * merge_windows(attended, self.window_size, h, w))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm(x)))


class PosterV2(nn.Module):
    """POSTER++: forward (N, 3, 224, 224) ImageNet-normalised RGB -> (N, num_classes) logits, in the class order of
    the checkpoint it was loaded from (see `synfer_pipeline.fer.released`). Differentiable w.r.t. the input; the
    landmark branch's weights are frozen (requires_grad False) as in the original, but it passes gradients through.
    """

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.face_landback = MobileFaceNet(136)
        self.face_landback.requires_grad_(False)
        self.VIT = FusionTransformer(num_classes=num_classes)
        self.ir_back = PosterIR50()
        self.attn1, self.attn2, self.attn3 = (WindowCrossAttention(d, h, w) for d, h, w in
                                              zip(POSTER_DIMS, POSTER_HEADS, POSTER_WINDOWS))
        self.window1, self.window2, self.window3 = (WindowNorm(w, d) for w, d in zip(POSTER_WINDOWS, POSTER_DIMS))
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(d, d, 3, stride=2, padding=1) for d in POSTER_DIMS)
        self.ffn1, self.ffn2, self.ffn3 = (WindowFeedForward(d, w) for d, w in zip(POSTER_DIMS, POSTER_WINDOWS))
        self.last_face_conv = nn.Conv2d(512, 256, kernel_size=3, padding=1)
        self.embed_q = nn.Sequential(nn.Conv2d(64, 768, 3, stride=2, padding=1),
                                     nn.Conv2d(768, 768, 3, stride=2, padding=1))
        self.embed_k = nn.Sequential(nn.Conv2d(128, 768, 3, stride=2, padding=1))
        self.embed_v = TokenProjection(256, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. landmark maps -> per-scale queries
        face1, face2, face3 = self.face_landback(nn.functional.interpolate(x, size=112))
        faces = (face1, face2, self.last_face_conv(face3))
        queries = [landmark_queries(f, h) for f, h in zip(faces, POSTER_HEADS)]
        # 2. image maps, halved to the window size
        images = [conv(m) for conv, m in zip((self.conv1, self.conv2, self.conv3), self.ir_back(x))]
        # 3. window cross-attention and feed-forward per scale
        fused = []
        for image, query, window, attn, ffn in zip(images, queries, (self.window1, self.window2, self.window3),
                                                   (self.attn1, self.attn2, self.attn3),
                                                   (self.ffn1, self.ffn2, self.ffn3)):
            windows, residual = window(image)
            fused.append(ffn(attn(windows, query), residual).permute(0, 3, 1, 2))
        # 4. 3 x 49 tokens -> transformer -> logits
        tokens = torch.cat([self.embed_q(fused[0]).flatten(2).transpose(1, 2),
                            self.embed_k(fused[1]).flatten(2).transpose(1, 2),
                            self.embed_v(fused[2])], dim=1)
        return self.VIT(tokens)


def build_poster(num_classes: int = 7) -> PosterV2:
    """A randomly initialised POSTER++ with `num_classes` outputs (7: RAF-DB / AffectNet-7 / CAER-S, 8: AffectNet-8),
    in eval mode; load weights with `synfer_pipeline.fer.released.load_poster_checkpoint`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return PosterV2(num_classes).eval()
