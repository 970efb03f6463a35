"""POSTER++'s fusion transformer and classification head (its `VIT` submodule).

Read from POSTER_V2 `models/vit_model.py` (7 classes) and `models/vit_model_8.py` (8 classes; identical apart from
the default class count), built as `VisionTransformer(depth=2, embed_dim=768, num_classes=K)`: 147 fused tokens plus a
class token, two pre-norm transformer blocks (8 heads, MLP 4x, LayerNorm eps 1e-6), the class token through a
squeeze-excitation gate, then a linear head. The original module also registers layers it never calls (a patch
embedding, an ECA block, `CON1`, `IRLinear1/2`, a 1-D conv per block); they are kept, unused, because their weights
are in every released checkpoint. Attribute names are the checkpoint's key names.
"""

from __future__ import annotations

import torch
from torch import nn

FUSED_TOKENS = 147  # 3 scales x 7 x 7 tokens; the position embedding has one more row for the class token


class TokenProjection(nn.Module):
    """1x1 conv from 256 channels to 768, flattened to tokens: (N, 256, H, W) -> (N, H*W, 768) (`PatchEmbed`)."""

    def __init__(self, in_channels: int = 256, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens, (N, T, C) -> (N, T, C)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(n, t, c)))


class MLP(nn.Module):
    """fc1 -> GELU -> fc2, (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class FusionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.)); (N, 148, 768) -> (N, 148, 768)."""

    def __init__(self, dim: int = 768, tokens: int = FUSED_TOKENS + 1, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.conv = nn.Conv1d(tokens, tokens, 1)  # registered but never called by the original
        self.attn = SelfAttention(dim, num_heads=8)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SEGate(nn.Module):
    """x * sigmoid(linear2(relu(linear1(x)))), (N, C) -> (N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(dim, dim)
        self.sigmod = nn.Sigmoid()  # the original's spelling; it has no weights, so no key depends on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmod(self.linear2(self.relu(self.linear1(x))))


class ClassHead(nn.Module):
    """Linear classifier, (N, C) -> (N, num_classes); key `linear`."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))


class _UnusedECA(nn.Module):
    """The original's ECA block (1-D conv of kernel 5 over pooled channels); registered, never called."""

    def __init__(self) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=5, padding=2, bias=False)
        self.sigmoid = nn.Sigmoid()


class FusionTransformer(nn.Module):
    """POSTER++'s `VIT`: forward (N, 147, 768) fused tokens -> (N, num_classes) logits."""

    def __init__(self, num_classes: int = 7, embed_dim: int = 768, depth: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, FUSED_TOKENS + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.se_block = SEGate(embed_dim)
        self.patch_embed = TokenProjection(256, embed_dim)  # unused: the tokens arrive already embedded
        self.head = ClassHead(embed_dim, num_classes)
        self.eca_block = _UnusedECA()
        self.CON1 = nn.Conv2d(256, 768, kernel_size=1, stride=1, bias=False)  # unused
        self.IRLinear1 = nn.Linear(1024, 768)  # unused
        self.IRLinear2 = nn.Linear(768, 512)  # unused
        self.blocks = nn.Sequential(*[FusionBlock(embed_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pre_logits = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        x = self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))
        return self.head(self.se_block(self.pre_logits(x[:, 0])))
