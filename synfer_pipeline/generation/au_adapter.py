"""AU injection (SynFER): an IP-Adapter-style adapter that turns a facial action-unit vector into context tokens.

A small MLP maps the AU vector (B, n_aus) to `num_tokens` tokens of the UNet's cross-attention width; they enter
every cross-attention layer through decoupled key/value projections (`to_k_ip`, `to_v_ip`) beside the text ones,
weighted by `scale`. It rides on diffusers' own IP-Adapter machinery: `IPAdapterAttnProcessor2_0` on the
cross-attention layers and `unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])`, so the UNet is
called with `added_cond_kwargs={"image_embeds": [au[:, None]]}` (a list with one (B, 1, n_aus) tensor).

Unconditional rows: a row of the AU tensor that contains NaN (by convention all NaN, see `unconditional_au` and
`mark_unconditional`) gets the LEARNED null tokens instead of the MLP's output. "No AU condition" is thus its own
trained condition, distinct from the all-zero vector, which is a real label ("no action unit active"). NaN rather
than a mask argument because the row must travel through the UNet's `image_embeds` path unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from safetensors.torch import load_file, save_file
from torch import nn

from synfer_pipeline.generation.loop import TrainJob, run_training
from synfer_pipeline.generation.settings import TrainReport, TrainSettings
from synfer_pipeline.generation.train import (
    NoiseLoss,
    from_main_process,
    load_components,
)
from synfer_pipeline.io.storage import atomic_folder
from synfer_pipeline.io.versions import model_fingerprint, weights_version
from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import OPENGRAPHAU_41

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "au_adapter.safetensors", "au_adapter.json"
BASE_MODEL_TXT, BASE_MODEL_JSON = "base_model.txt", "base_model.json"
FORMAT = "synfer-au-adapter/1"


@settings
class AUAdapterConfig:
    """au_names: the AU vector's entries in order; num_tokens: context tokens per image; hidden_dim: MLP width;
    cross_attention_dim: token width (None: the UNet's cross_attention_dim, which it must equal); scale: weight of
    the AU attention next to the text attention; au_dropout: probability of training a row as unconditional."""

    au_names: tuple[str, ...] = OPENGRAPHAU_41
    num_tokens: int = 4
    hidden_dim: int = 256
    cross_attention_dim: int | None = None
    scale: float = 1.0
    au_dropout: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.au_dropout <= 1.0:
            raise ValueError(f"au_dropout {self.au_dropout} is not a probability")

    def to_dict(self) -> dict:
        return {**asdict(self), "au_names": list(self.au_names)}

    @classmethod
    def from_dict(cls, d: dict) -> AUAdapterConfig:
        return cls(**d)


class AUProjection(nn.Module):
    """AU vector (B, n_aus) float -> context tokens (B, num_tokens, cross_attention_dim).

    MLP (Linear, GELU, Linear) then LayerNorm per token. Rows containing NaN are unconditional and get the learned
    `null_tokens` (num_tokens, cross_attention_dim) instead; they contribute no gradient to the MLP.
    """

    def __init__(self, n_aus: int, num_tokens: int, hidden_dim: int, cross_attention_dim: int):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.mlp = nn.Sequential(nn.Linear(n_aus, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, num_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)
        # Small at start: the unconditional adapter begins close to "no extra attention" and learns from AU dropout.
        self.null_tokens = nn.Parameter(torch.randn(num_tokens, cross_attention_dim) * 0.02)

    def forward(self, au: torch.Tensor) -> torch.Tensor:
        unconditional = torch.isnan(au).any(dim=-1)
        tokens = self.mlp(torch.nan_to_num(au, nan=0.0)).view(au.shape[0], self.num_tokens, self.cross_attention_dim)
        tokens = self.norm(tokens)
        null = self.null_tokens.to(tokens.dtype).expand_as(tokens)
        return torch.where(unconditional[:, None, None], null, tokens)


def unconditional_au(batch_size: int, n_aus: int, device=None) -> torch.Tensor:
    """A (batch_size, n_aus) AU tensor whose rows all mean "no AU condition" (NaN rows)."""
    return torch.full((batch_size, n_aus), float("nan"), device=device)


def mark_unconditional(au: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of `au` (B, n_aus) with the rows where the boolean `mask` (B,) is True made unconditional (NaN)."""
    return torch.where(mask[:, None], torch.full_like(au, float("nan")), au)


def au_condition(au: torch.Tensor) -> dict:
    """The UNet keyword argument carrying an AU tensor (B, n_aus): `added_cond_kwargs` with one (B, 1, n_aus) entry."""
    return {"added_cond_kwargs": {"image_embeds": [au[:, None]]}}


def _cross_attention_layers(unet) -> dict[str, nn.Module]:
    return {key: unet.get_submodule(key.removesuffix(".processor")) for key in unet.attn_processors}


def attach_au_adapter(unet, config: AUAdapterConfig, projection: AUProjection | None = None) -> AUProjection:
    """Install the AU adapter on `unet` in place and return its projection (a new one unless given).

    Every cross-attention layer gets `IPAdapterAttnProcessor2_0(hidden_size, cross_attention_dim, (num_tokens,),
    scale)` with `to_k_ip` / `to_v_ip` initialised as copies of the text `to_k` / `to_v`; self-attention layers get
    `AttnProcessor2_0`. Then `unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])` and
    `unet.config.encoder_hid_dim_type = "ip_image_proj"`. The adapter's parameters follow the UNet's device/dtype.
    """
    width = unet.config.cross_attention_dim
    if config.cross_attention_dim not in (None, width):
        raise ValueError(f"adapter cross_attention_dim {config.cross_attention_dim} != the UNet's {width}")
    if isinstance(unet.encoder_hid_proj, MultiIPAdapterImageProjection):
        raise ValueError("this UNet already carries an IP/AU adapter; attach to a fresh UNet")
    if unet.encoder_hid_proj is not None:
        unet.text_encoder_hid_proj = unet.encoder_hid_proj  # a text projection stays in use (as diffusers does)
    device, dtype = unet.device, unet.dtype
    processors = {}
    for key, attn in _cross_attention_layers(unet).items():
        if not attn.is_cross_attention:
            processors[key] = AttnProcessor2_0()
            continue
        proc = IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, (config.num_tokens,),
                                         config.scale)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        processors[key] = proc.to(device=device, dtype=dtype)
    unet.set_attn_processor(processors)
    if projection is None:
        projection = AUProjection(len(config.au_names), config.num_tokens, config.hidden_dim, width)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection.to(device=device, dtype=dtype)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return projection


def set_au_scale(unet, scale: float) -> None:
    """Weight of the AU attention in every cross-attention layer (0: the UNet behaves exactly as without adapter)."""
    found = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    if not found:
        raise ValueError("this UNet has no AU adapter attached")
    for proc in found:
        proc.scale = [float(scale)]


def _is_adapter_key(name: str) -> bool:
    return name.startswith("encoder_hid_proj.") or ".processor.to_k_ip." in name or ".processor.to_v_ip." in name


def adapter_parameters(unet) -> dict[str, nn.Parameter]:
    """The adapter's parameters on `unet` by state-dict name (projection, to_k_ip, to_v_ip)."""
    return {n: p for n, p in unet.named_parameters() if _is_adapter_key(n)}


def base_unet_sha256(unet) -> str:
    """sha256 over the UNet's own (non-adapter) tensors, in name order: proves the base stayed untouched."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        if not _is_adapter_key(name):
            h.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_au_adapter(unet, projection: AUProjection, config: AUAdapterConfig, folder: str | Path) -> Path:
    """Write `au_adapter.safetensors` (projection + to_k_ip/to_v_ip, float32) and `au_adapter.json` to `folder`."""
    if unet.encoder_hid_proj is None or unet.encoder_hid_proj.image_projection_layers[0] is not projection:
        raise ValueError("the projection given is not the one attached to this UNet")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in adapter_parameters(unet).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    meta = {"format": FORMAT, "config": config.to_dict(),
            "unet": {k: _jsonable(unet.config[k]) for k in ("cross_attention_dim", "block_out_channels",
                                                          "layers_per_block", "down_block_types")},
            "tensors": {n: list(t.shape) for n, t in sorted(tensors.items())}}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def _jsonable(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def load_au_adapter(unet, folder: str | Path) -> AUProjection:
    """Attach the adapter saved in `folder` to `unet` (same architecture as the one it was trained on).

    Raises ValueError naming the folder when the files do not fit this UNet.
    """
    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: not an AU adapter folder (format {meta.get('format')!r})")
    config = AUAdapterConfig.from_dict(meta["config"])
    try:
        projection = attach_au_adapter(unet, config)
    except ValueError as e:
        raise ValueError(f"AU adapter in {folder} does not fit this UNet: {e}") from e
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    params = adapter_parameters(unet)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    if shapes != {n: tuple(t.shape) for n, t in state.items()}:
        missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
        raise ValueError(f"AU adapter in {folder} does not fit this UNet (trained on {meta.get('unet')}): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}, or tensor shapes differ")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return projection


def _au_inputs(batch: dict) -> dict:
    return au_condition(mark_unconditional(batch["au"], batch["au_dropped"]))


def train_au_adapter(settings: TrainSettings, adapter_config: AUAdapterConfig, shard_urls: Sequence[str],
                     base_model: str, output_dir: Path, state_dir: Path,
                     on_checkpoint: Callable[[Path], None] | None = None,
                     log: Callable[[dict], None] | None = None) -> TrainReport:
    """Train the AU adapter on FEText with the base model (UNet, VAE, text encoder) frozen.

    Only the projection and the to_k_ip/to_v_ip projections train; each sample's AUs are replaced by the null
    condition with probability `adapter_config.au_dropout`, its caption by "" with `settings.caption_dropout`.
    Resumable from `state_dir` like `train_unet` (checkpoints hold only the adapter's weights). `output_dir` gets
    the adapter files plus `base_model.txt` / `base_model.json` naming the UNet it was trained on.
    The report's extra holds the base UNet's sha256 before and after training (equal: the base was not touched).
    """
    parts = load_components(base_model)
    parts.unet.requires_grad_(False)
    before = base_unet_sha256(parts.unet)
    set_seed(settings.seed)  # the adapter's initial weights
    projection = attach_au_adapter(parts.unet, adapter_config)
    trainable = adapter_parameters(parts.unet)
    for p in trainable.values():
        p.requires_grad_(True)
    loss = NoiseLoss(parts.vae, parts.text_encoder, parts.noise_scheduler, settings.noise_offset, settings.snr_gamma,
                     extra_inputs=_au_inputs)
    job = TrainJob(model=parts.unet, parameters=list(trainable.values()), frozen=[parts.vae, parts.text_encoder],
                   loss=loss, tokenizer=parts.tokenizer, au_dropout=adapter_config.au_dropout,
                   au_names=adapter_config.au_names, trainable_state_only=True,
                   fingerprint={"base_model": model_fingerprint(base_model), "job": "au_adapter",
                                "adapter": adapter_config.to_dict()})
    result = run_training(settings, job, list(shard_urls), Path(state_dir), on_checkpoint, log)
    unet, accelerator = result.model, result.accelerator
    after = base_unet_sha256(unet)
    data_version = ""
    if accelerator.is_main_process:
        with atomic_folder(output_dir) as tmp:
            _write_adapter(tmp, unet, projection, adapter_config, result.ema, base_model, before)
        data_version = weights_version(output_dir)
    data_version = from_main_process(accelerator, data_version)
    extra = {"base_unet_sha256_before": before, "base_unet_sha256_after": after}
    return replace(result.report, data_version=data_version, output_dir=str(output_dir), extra=extra)


def _write_adapter(folder: Path, unet, projection, config, ema, base_model: str, base_sha: str) -> None:
    params = list(adapter_parameters(unet).values())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)  # the adapter ships its EMA weights
    try:
        save_au_adapter(unet, projection, config, folder)
    finally:
        if ema is not None:
            ema.restore(params)
    (folder / BASE_MODEL_TXT).write_text(f"{base_model}\n")
    (folder / BASE_MODEL_JSON).write_text(json.dumps({"base_model": str(base_model), "unet_sha256": base_sha},
                                                     indent=2, sort_keys=True))
