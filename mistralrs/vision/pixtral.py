"""The Pixtral vision encoder (Mistral-Small-3.1's image tower): patch convolution, RMSNorm, 2D RoPE over the
patch rows and columns, and pre-norm blocks with gated SiLU MLPs, attending within each image only.

Images of different sizes are flattened into one packed patch axis (each image keeps only the patches inside its
own `image_sizes` entry, padding is dropped); attention is block-diagonal over that axis, one block per image.
Checkpoint names are transformers' `PixtralVisionModel` ones (`patch_conv.weight`, `ln_pre.weight`,
`transformer.layers.N.attention.q_proj.weight`, ...). The tower is plain torch modules: like every vision tower
here it is never quantized in situ (ISQ and UQFF apply to the text decoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.norm import RMSNorm
from mistralrs.layers.rotary import apply_rotary

PIXTRAL_NORM_EPS = 1e-5  # every RMSNorm of the tower (fixed in the reference implementation, not in the config)


@dataclass
class PixtralVisionConfig:
    """The tower's hyper-parameters, read from a checkpoint's `vision_config` (HF field names)."""

    hidden_size: int  # width of the patch embeddings and the residual stream
    intermediate_size: int  # MLP inner width
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # attention heads (head_dim = hidden_size // heads, as transformers computes it)
    patch_size: int  # square patch edge in pixels (the convolution's kernel and stride)
    num_channels: int = 3  # input channels
    hidden_act: str = "gelu"  # activation of the gated MLP, HF name (the published checkpoints say "silu")
    rope_theta: float = 10000.0  # base of the 2D RoPE frequencies

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                     "num_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"vision_config field {name!r} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(f"vision_config hidden_size ({self.hidden_size}) must split into "
                             f"num_attention_heads ({self.num_attention_heads}) heads of a multiple of 4 features")
        if not self.rope_theta > 0:
            raise ValueError(f"vision_config field 'rope_theta' must be positive, got {self.rope_theta!r}")
        get_act_fn(self.hidden_act)

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> PixtralVisionConfig:
        """Reads an HF `PixtralVisionConfig` dict (`rope_theta` or `rope_parameters.rope_theta`)."""
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        patch = d.get("patch_size", 16)
        return cls(hidden_size=d.get("hidden_size", 1024), intermediate_size=d.get("intermediate_size", 4096),
                   num_hidden_layers=d.get("num_hidden_layers", 24),
                   num_attention_heads=d.get("num_attention_heads", 16),
                   patch_size=patch[0] if isinstance(patch, (list, tuple)) else patch,
                   num_channels=d.get("num_channels", 3), hidden_act=d.get("hidden_act", "gelu"),
                   rope_theta=float(theta))


def pixtral_rope_tables(grids: Sequence[tuple[int, int]], head_dim: int, theta: float, dtype: torch.dtype,
                        device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables `[num_patches, 1, head_dim]` for the patches of `grids` ((rows, cols) per
    image, row-major within an image), in the layout `apply_rotary` reads.

    Axial 2D RoPE: of the head_dim // 2 frequencies, the even-indexed ones turn with the patch's row and the
    odd-indexed ones with its column; the angles are `cat(row * f[0::2], col * f[1::2])`, rotated half-and-half.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    rows, cols = [], []
    for height, width in grids:
        r, c = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                              indexing="ij")
        rows.append(r.flatten())
        cols.append(c.flatten())
    row, col = torch.cat(rows).float(), torch.cat(cols).float()
    angles = torch.cat((row[:, None] * inv_freq[None, 0::2], col[:, None] * inv_freq[None, 1::2]), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat((cos, cos), dim=-1).to(dtype)
    sin = torch.cat((-sin, sin), dim=-1).to(dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)


class PixtralAttention(nn.Module):
    """Bidirectional self-attention with 2D RoPE, restricted to the patches of one image at a time."""

    def __init__(self, config: PixtralVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.k_proj = nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.v_proj = nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(width, width, bias=False, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        num_patches = hidden.shape[0]
        q = self.q_proj(hidden).view(num_patches, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_patches, self.num_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_patches, self.num_heads, self.head_dim)
        q, k = apply_rotary(torch.cat((q, k), dim=1), cos, sin).split(self.num_heads, dim=1)
        outputs = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            out = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
            outputs.append(out.transpose(0, 1))
        return self.o_proj(torch.cat(outputs).reshape(num_patches, -1))


class PixtralMLP(nn.Module):
    """Gated MLP `down(act(gate(x)) * up(x))`."""

    def __init__(self, config: PixtralVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(width, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(width, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, width, bias=False, dtype=dtype, device=device)
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PixtralBlock(nn.Module):
    """Pre-norm block: `h += attention(attention_norm(h)); h += feed_forward(ffn_norm(h))`."""

    def __init__(self, config: PixtralVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, PIXTRAL_NORM_EPS, dtype=dtype, device=device)
        self.attention = PixtralAttention(config, dtype=dtype, device=device)
        self.ffn_norm = RMSNorm(config.hidden_size, PIXTRAL_NORM_EPS, dtype=dtype, device=device)
        self.feed_forward = PixtralMLP(config, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden), cos, sin, lengths)
        return hidden + self.feed_forward(self.ffn_norm(hidden))


class PixtralTransformer(nn.Module):
    """The stack of blocks (the checkpoint's `transformer.` prefix)."""

    def __init__(self, config: PixtralVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.layers = nn.ModuleList(PixtralBlock(config, dtype=dtype, device=device)
                                    for _ in range(config.num_hidden_layers))


class PixtralVisionModel(nn.Module):
    """Pixtral encoder: `forward(pixel_values, image_sizes, feature_layers) -> [num_patches, hidden * layers]`.

    `pixel_values` `[num_images, C, H, W]` are padded to a common size; `image_sizes` gives each image's real
    (height, width) in pixels (multiples of the patch size). The output packs every image's patches row-major,
    image after image; `feature_layers` picks hidden states as transformers' `hidden_states[i]` counts them
    (0: after `ln_pre`, i: after block i, negative from the end) and concatenates them on the feature axis.
    """

    def __init__(self, config: PixtralVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_conv = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                    stride=config.patch_size, bias=False, dtype=dtype, device=device)
        self.patch_conv.weight.requires_grad_(False)
        self.ln_pre = RMSNorm(config.hidden_size, PIXTRAL_NORM_EPS, dtype=dtype, device=device)
        self.transformer = PixtralTransformer(config, dtype=dtype, device=device)

    def patch_grids(self, image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(patch rows, patch columns) of each image."""
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        return [(int(h) // self.patch_size, int(w) // self.patch_size) for h, w in sizes]

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | Sequence[Sequence[int]],
                feature_layers: Sequence[int] = (-1,)) -> torch.Tensor:
        num_layers = self.config.num_hidden_layers
        wanted = [i if i >= 0 else num_layers + 1 + i for i in feature_layers]
        if any(not 0 <= i <= num_layers for i in wanted):
            raise ValueError(f"vision feature layers {list(feature_layers)} are out of range for "
                             f"{num_layers} layers")
        dtype = self.patch_conv.weight.dtype
        embeds = self.patch_conv(pixel_values.to(dtype))
        grids = self.patch_grids(image_sizes)
        hidden = torch.cat([e[:, :h, :w].flatten(1).T for e, (h, w) in zip(embeds, grids)])
        hidden = self.ln_pre(hidden)
        cos, sin = pixtral_rope_tables(grids, self.config.head_dim, self.config.rope_theta, dtype, hidden.device)
        lengths = [h * w for h, w in grids]
        states = {0: hidden} if 0 in wanted else {}
        for index, layer in enumerate(self.transformer.layers[: max(wanted)], start=1):
            hidden = layer(hidden, cos, sin, lengths)
            if index in wanted:
                states[index] = hidden
        return torch.cat([states[i] for i in wanted], dim=-1)
