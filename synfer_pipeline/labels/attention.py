"""Recording a UNet's cross-attention maps without changing what it computes.

`CrossAttentionRecorder.attach(unet)` wraps the processor of every cross-attention layer (`attn2` of each
transformer block) in `RecordingProcessor`. The wrapper lets the original processor compute the layer's output, so
the UNet's output is bit-for-bit what it was, and separately computes the layer's attention probabilities from the
same query and key projections: softmax(QK^T / sqrt(d)), averaged over heads. Each map is stored as
(N, T, h, w) — per text token, where the image's h x w positions at that layer attended — optionally pooled to a
fixed grid as it is recorded, so a forward pass keeps only small tensors. FERAnno reads these maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Self

import torch
import torch.nn.functional as F


class RecordingProcessor:
    """An attention processor that records the cross-attention probabilities and delegates the output.

    inner: the processor it wraps (the layer's own, e.g. `AttnProcessor2_0`); store: called with the layer's
    name and its (N, heads, HW, T) probabilities (float32, no gradient).
    """

    def __init__(self, name: str, inner, store: Callable[[str, torch.Tensor], None]):
        self.name, self.inner, self.store = name, inner, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None:
            with torch.no_grad():
                self.store(self.name, self.probabilities(attn, hidden_states, encoder_hidden_states, attention_mask))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    @staticmethod
    def probabilities(attn, hidden_states: torch.Tensor, context: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(N, heads, HW, T) softmax(QK^T * scale) of `attn` for image tokens `hidden_states` over `context`."""
        x = hidden_states
        if x.ndim == 4:  # (N, C, H, W) inputs are flattened to tokens, as the processors do
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        n, tokens = x.shape[0], context.shape[1]
        q, k = attn.to_q(x), attn.to_k(context)
        q = q.view(n, -1, attn.heads, q.shape[-1] // attn.heads).transpose(1, 2)
        k = k.view(n, tokens, attn.heads, k.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k = q.float(), k.float()
        scores = (q @ k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, tokens, n).view(n, attn.heads, -1, tokens)
            scores = scores + mask.float()
        return scores.softmax(dim=-1)


class CrossAttentionRecorder:
    """Attach to a UNet, run it, read `maps`: {layer name: (N, T, h, w)} for every cross-attention layer.

    grid: pool every map to (grid, grid) as it is recorded (None keeps each layer's own resolution); the spatial
    size of a layer is found from the latent's height and width set by `expect(latent_hw)` before the forward pass
    (the sample's aspect ratio is kept through the UNet's power-of-two downsampling).
    """

    def __init__(self, grid: int | None = None):
        self.grid = grid
        self.maps: dict[str, torch.Tensor] = {}
        self.layers: list[str] = []
        self._hw: tuple[int, int] | None = None
        self._originals: dict | None = None
        self._unet = None

    def attach(self, unet) -> CrossAttentionRecorder:
        """Wrap every cross-attention processor of `unet` (layers named `...attn2.processor`)."""
        if self._unet is not None:
            raise RuntimeError("this recorder is attached already; detach it first")
        originals = dict(unet.attn_processors)
        wrapped = {}
        for name, processor in originals.items():
            if name.endswith("attn2.processor"):
                layer = name.removesuffix(".processor")
                wrapped[name] = RecordingProcessor(layer, processor, self._store)
                self.layers.append(layer)
            else:
                wrapped[name] = processor
        if not self.layers:
            raise ValueError("this UNet has no cross-attention layers (attn2) to record")
        unet.set_attn_processor(wrapped)
        self._unet, self._originals = unet, originals
        return self

    def detach(self) -> None:
        """Put the original processors back."""
        if self._unet is not None:
            self._unet.set_attn_processor(self._originals)
            self._unet, self._originals = None, None
            self.layers = []

    def expect(self, latent_hw: tuple[int, int]) -> None:
        """The (h, w) of the latents about to go through the UNet; clears the maps of the previous pass."""
        self._hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.maps = {}

    def _store(self, layer: str, probs: torch.Tensor) -> None:
        n, _, positions, tokens = probs.shape
        h, w = self._spatial(positions)
        maps = probs.mean(dim=1).transpose(1, 2).reshape(n, tokens, h, w).contiguous()
        if self.grid is not None:
            maps = F.adaptive_avg_pool2d(maps, self.grid)
        self.maps[layer] = maps

    def _spatial(self, positions: int) -> tuple[int, int]:
        if self._hw is None:
            side = math.isqrt(positions)
            if side * side != positions:
                raise ValueError(f"{positions} image positions are not square; call expect(latent_hw) first")
            return side, side
        h, w = self._hw
        factor = round(math.sqrt(h * w / positions))
        if (h // factor) * (w // factor) != positions and (-(-h // factor)) * (-(-w // factor)) != positions:
            raise ValueError(f"{positions} image positions do not fit latents of {h}x{w}")
        return (h // factor, w // factor) if (h // factor) * (w // factor) == positions else (-(-h // factor), -(-w // factor))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
