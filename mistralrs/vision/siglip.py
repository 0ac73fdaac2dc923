"""The SigLIP vision tower shared by Idefics2, Idefics3 (SmolVLM) and Gemma 3, and the image arithmetic their
processors share (Pillow resize, rescale and normalise exactly as transformers' Pillow image processors do).

The tower (`SiglipVisionTransformer`, the checkpoint's `vision_model` module): a patch-embedding convolution,
learned position embeddings, pre-norm encoder layers (LayerNorm, bidirectional multi-head attention, LayerNorm,
tanh-GELU MLP) and a final LayerNorm. Two ways to place the position embeddings:
- fixed (`SiglipVisionModel`, Gemma 3): patch i of a full-size image takes position i;
- bucketed (Idefics2/3, NaViT-style): an image of any size up to `image_size` (padded in a batch, the valid
  patches given by `patch_attention_mask`) spreads its patches over the `image_size / patch_size` grid of
  positions by fractional coordinates, and padding patches are never attended to.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.norm import LayerNorm


@dataclass(frozen=True)
class SiglipVisionConfig:
    """A SigLIP tower's `vision_config` (HF names; the defaults are the family's, see `from_hf_dict`)."""

    hidden_size: int  # patch embedding width
    intermediate_size: int  # MLP inner width
    num_hidden_layers: int  # encoder layers
    num_attention_heads: int  # attention heads (hidden_size must be a multiple)
    image_size: int  # side of the square image the position table covers
    patch_size: int  # side of one patch (the convolution's kernel and stride)
    num_channels: int = 3  # input channels
    hidden_act: str = "gelu_pytorch_tanh"  # MLP activation, HF name
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"vision_config field {name!r} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        get_act_fn(self.hidden_act)

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a full-size image."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None, defaults: dict[str, Any]) -> SiglipVisionConfig:
        """Reads a `vision_config` dict; keys it lacks take `defaults` (the family's transformers defaults, since
        transformers writes only the values that differ from them)."""
        names = {f.name for f in fields(cls)}
        merged = {**defaults, **{k: v for k, v in (d or {}).items() if k in names and v is not None}}
        missing = sorted(f.name for f in fields(cls) if f.name not in merged and f.default is MISSING)
        if missing:
            raise ValueError(f"vision_config is missing {missing}")
        return cls(**merged)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width, dtype=dtype, device=device) for _ in range(4))

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden `[batch, seq, width]`; key_mask `[batch, 1, 1, seq]` bool (True: attend) or None."""
        batch, seq, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(hidden)), heads(self.k_proj(hidden)),
                                             heads(self.v_proj(hidden)), attn_mask=key_mask,
                                             scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SiglipMLP(nn.Module):
    """`fc2(act(fc1(x)))`."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.act_fn = get_act_fn(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """`h += attn(ln1(h)); h += mlp(ln2(h))`."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, device=device)
        self.self_attn = SiglipAttention(config, dtype=dtype, device=device)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, device=device)
        self.mlp = SiglipMLP(config, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), key_mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers (the checkpoint's `encoder.layers.{i}`)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config, dtype=dtype, device=device)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        return hidden


class SiglipEmbeddings(nn.Module):
    """Patch embedding (a strided convolution) plus position embeddings, fixed or bucketed (module docstring)."""

    def __init__(self, config: SiglipVisionConfig, bucketed_positions: bool, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.patch_size = config.patch_size
        self.patches_per_side = config.patches_per_side
        self.bucketed_positions = bucketed_positions
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, dtype=dtype, device=device)
        self.position_embedding = nn.Embedding(self.patches_per_side**2, config.hidden_size, dtype=dtype,
                                               device=device)

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """`[batch, h * w]` position of every patch: fixed (`arange`) or bucketed over the valid patches of each
        image (`patch_mask` `[batch, h, w]`, True for a valid patch), 0 for padding patches."""
        batch, rows, cols = patch_mask.shape
        device = patch_mask.device
        if not self.bucketed_positions:
            if rows * cols != self.patches_per_side**2:
                raise ValueError(f"the vision tower takes {self.patches_per_side}x{self.patches_per_side} patches, "
                                 f"got {rows}x{cols}")
            return torch.arange(rows * cols, device=device).expand(batch, -1)
        # The same float32 arithmetic as transformers' Idefics2VisionEmbeddings, so bucket edges agree exactly.
        side = self.patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
        step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
        coords_h = torch.arange(rows, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
        coords_w = torch.arange(cols, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
        buckets_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        buckets_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        ids = (buckets_h[:, :, None] * side + buckets_w[:, None, :]).reshape(batch, -1)
        return torch.where(patch_mask.view(batch, -1), ids, torch.zeros_like(ids))

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values `[batch, channels, H, W]` -> `[batch, (H / patch) * (W / patch), width]`."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        return embeddings + self.position_embedding(self.position_ids(patch_mask))


class SiglipVisionTransformer(nn.Module):
    """The SigLIP tower: embeddings, encoder, post-LayerNorm (no pooling head).

    `forward(pixel_values [batch, C, H, W], patch_attention_mask [batch, H/p, W/p] bool or None)
    -> [batch, (H/p) * (W/p), hidden]`; patches outside the mask take no part in attention (their own rows are
    computed and left to the caller to ignore).
    """

    def __init__(self, config: SiglipVisionConfig, *, bucketed_positions: bool, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config, bucketed_positions, dtype=dtype, device=device)
        self.encoder = SiglipEncoder(config, dtype=dtype, device=device)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        patch = self.config.patch_size
        batch, _, height, width = pixel_values.shape
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(batch, height // patch, width // patch, dtype=torch.bool,
                                              device=pixel_values.device)
        hidden = self.embeddings(pixel_values, patch_attention_mask)
        key_mask = None
        if not bool(patch_attention_mask.all()):
            key_mask = patch_attention_mask.view(batch, 1, 1, -1)
        return self.post_layernorm(self.encoder(hidden, key_mask))


# --- image arithmetic shared by the family's processors ---------------------------------------------------------
# (images arrive as RGB: the front door converts them, mistralrs/vision/images.py)

def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    """Pillow resize to `height` x `width` with the checkpoint's resampling filter (a no-op size is still
    resampled, as transformers does)."""
    return image.resize((width, height), resample=resample)


@dataclass(frozen=True)
class Normalization:
    """`(pixel * rescale_factor - mean) / std` per channel, in transformers' float order."""

    rescale_factor: float  # usually 1 / 255
    mean: tuple[float, float, float]  # per-channel mean
    std: tuple[float, float, float]  # per-channel standard deviation

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError(f"image_mean/image_std must hold 3 values (std non-zero), got {self.mean}, {self.std}")

    @classmethod
    def from_preprocessor(cls, config: dict[str, Any]) -> Normalization:
        """From the image processor's parameters (`rescale_factor`, `image_mean`, `image_std`; the family's
        defaults: 1/255 and 0.5)."""
        def triple(value: Any) -> tuple[float, float, float]:
            value = 0.5 if value is None else value
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3

        return cls(float(config.get("rescale_factor", 1 / 255)), triple(config.get("image_mean")),
                   triple(config.get("image_std")))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> `[3, H, W]` float32."""
        array = np.asarray(image).transpose(2, 0, 1)  # CHW uint8
        scaled = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return torch.from_numpy((scaled - mean) / std)


def replace_placeholders(prompt: str, placeholder: str, expansions: list[str]) -> str:
    """`prompt` with its i-th `placeholder` replaced by `expansions[i]` (left to right, never re-scanning an
    expansion); ValueError when the counts differ."""
    parts = prompt.split(placeholder)
    if len(parts) - 1 != len(expansions):
        raise ValueError(f"the prompt holds {len(parts) - 1} image placeholder(s) {placeholder!r} for "
                         f"{len(expansions)} image(s)")
    pieces = [parts[0]]
    for expansion, part in zip(expansions, parts[1:]):
        pieces += [expansion, part]
    return "".join(pieces)


def pad_batch(tiles: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tiles `[3, h_i, w_i]` zero-padded at the bottom and right to the largest height and width:
    `pixel_values [n, 3, H, W]` and `pixel_attention_mask [n, H, W]` int64 (1: a real pixel)."""
    height = max(t.shape[1] for t in tiles)
    width = max(t.shape[2] for t in tiles)
    pixels = torch.zeros(len(tiles), 3, height, width, dtype=torch.float32)
    mask = torch.zeros(len(tiles), height, width, dtype=torch.int64)
    for i, tile in enumerate(tiles):
        pixels[i, :, :tile.shape[1], :tile.shape[2]] = tile
        mask[i, :tile.shape[1], :tile.shape[2]] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def text_config_of(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The `text_config` of a conditional-generation `config.json`, with the text family's transformers defaults
    for the keys it omits (published configs hold only the values that differ from them)."""
    text = config.get("text_config") or {}
    return {**defaults, **text}
