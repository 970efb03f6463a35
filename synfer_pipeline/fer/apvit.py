"""APViT (Xue et al., "Vision Transformer with Attentive Pooling", TAC 2022) in plain PyTorch, key-for-key compatible
with the released MMClassification checkpoint.

Read from github youqingxiaozhua/APViT: `configs/apvit/RAF.py` (the released model's config),
`mmcls/models/classifiers/pool_vit.py` (`PoolingVitClassifier`: submodules `extractor`, `vit`, `head`; no neck),
`mmcls/models/backbones/irse.py` (`IRSE`), `mmcls/models/vit/vit_siam_merge.py` (`PoolingViT`),
`mmcls/models/backbones/modules/vit_pooling.py` (`PoolingBlock`), `mmcls/models/utils/top_pool.py`,
`mmcls/models/heads/linear_head.py` (`LinearClsHead`: key `fc`). The released configuration:

  1. IR-50 stages 1-3 on the 112x112 face: (N, 256, 14, 14);
  2. a 1x1 conv to 768 channels gives 196 tokens plus a position embedding; attentive patch pooling (APP) keeps the
     160 tokens with the largest sum of absolute activations, in their spatial order;
  3. a class token, then 8 ViT blocks (768 wide, 8 heads, MLP 3x, no qkv bias, LayerNorm eps 1e-6: the original
     timm "ViT-Small"); blocks 5-8 apply attentive token pooling (ATP): keep 90% of the patch tokens, ranked by the
     class token's pre-softmax attention scores summed over heads;
  4. final LayerNorm, the class token, a linear head.

Parameter-free pooling is `torch.topk` + `gather`: the logits stay differentiable w.r.t. the input.
"""

from __future__ import annotations

import torch
from torch import nn

from synfer_pipeline.fer.ir50 import APViTIR50

APVIT_INPUT_SIZE = 112
APVIT_PATCHES = 196  # 14 x 14 stage-3 positions
APVIT_KEEP_PATCHES = 160  # cnn_pool_config.keep_num
APVIT_KEEP_RATES = (1.0,) * 4 + (0.9,) * 4  # vit_pool_configs.keep_rates, one per block


def keep_top_tokens(tokens: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` tokens with the highest scores, in their original order.

    tokens (N, T, C), scores (N, T) -> (N, keep, C). Ties, if any, may be broken differently from the original.
    """
    index = torch.topk(scores, k=keep, dim=1, sorted=False).indices.sort(dim=1).values
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class PoolingAttention(nn.Module):
    """Self-attention that also returns the class token's pre-softmax scores to every other token, summed over heads.

    (N, T, C) -> ((N, T, C), (N, T-1) scores).
    """

    def __init__(self, dim: int = 768, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (N, heads, T, T)
        cls_scores = logits[:, :, 0, 1:].sum(dim=1)  # attn_method 'SUM', the class token itself excluded
        attn = self.attn_drop(logits.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))), cls_scores


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PoolingBlock(nn.Module):
    """Pre-norm ViT block with attentive token pooling between attention and MLP.

    (N, 1 + P, C) -> (N, 1 + max(int(P * keep_rate), 1), C); keep_rate 1 keeps every token.
    """

    def __init__(self, dim: int = 768, num_heads: int = 8, mlp_ratio: float = 3.0, keep_rate: float = 1.0) -> None:
        super().__init__()
        self.keep_rate = keep_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolingAttention(dim, num_heads)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, cls_scores = self.attn(self.norm1(x))
        x = x + self.drop_path(attended)
        patches = x.shape[1] - 1
        # same rounding as the original's top_pool: int() of the product, at least one token
        keep = max(int(patches * self.keep_rate), 1)
        if keep < patches:
            x = torch.cat((x[:, :1], keep_top_tokens(x[:, 1:], cls_scores, keep)), dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PoolingViT(nn.Module):
    """APViT's `vit`: forward (N, 256, 14, 14) stage-3 features -> (N, 768) class-token feature."""

    def __init__(self, in_channels: int = 256, embed_dim: int = 768, depth: int = 8, num_heads: int = 8,
                 mlp_ratio: float = 3.0, keep_patches: int = APVIT_KEEP_PATCHES,
                 keep_rates: tuple[float, ...] = APVIT_KEEP_RATES) -> None:
        super().__init__()
        if len(keep_rates) != depth:
            raise ValueError(f"keep_rates needs one rate per block ({depth}), got {len(keep_rates)}")
        self.keep_patches = keep_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos_embed = nn.Parameter(torch.zeros(1, APVIT_PATCHES, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.projs = nn.ModuleList([nn.Conv2d(in_channels, embed_dim, 1)])
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(PoolingBlock(embed_dim, num_heads, mlp_ratio, rate) for rate in keep_rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.patch_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.projs[0](features)  # (N, 768, 14, 14)
        # attentive patch pooling ('SUM_ABS_1'): rank positions by the L1 norm of their projected feature
        scores = x.abs().sum(dim=1).flatten(1)  # (N, 196)
        tokens = x.flatten(2).transpose(1, 2) + self.patch_pos_embed
        if self.keep_patches < tokens.shape[1]:
            tokens = keep_top_tokens(tokens, scores, self.keep_patches)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1) + self.cls_pos_embed
        x = self.pos_drop(torch.cat((cls, tokens), dim=1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class LinearHead(nn.Module):
    """(N, 768) -> (N, num_classes); key `fc` as in mmcls's LinearClsHead."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class APViT(nn.Module):
    """APViT: forward (N, 3, 112, 112) ImageNet-normalised RGB -> (N, num_classes) logits, in the class order of the
    checkpoint it was loaded from (see `synfer_pipeline.fer.released`). Differentiable w.r.t. the input.

    One difference from the original, on purpose: its token pooling is skipped whenever the batch size happens to
    equal the current token count (`len(keep_index) != x.shape[1]` compares the batch size); here it never is, so a
    face's logits do not depend on the size of the batch it is in.
    """

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.extractor = APViTIR50()
        self.vit = PoolingViT()
        self.head = LinearHead(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(self.extractor(x)))


def build_apvit(num_classes: int = 7) -> APViT:
    """A randomly initialised APViT with `num_classes` outputs (7 for the released RAF-DB model), in eval mode;
    load weights with `synfer_pipeline.fer.released.load_apvit_checkpoint`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return APViT(num_classes).eval()
