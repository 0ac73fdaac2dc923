"""Qwen2-VL's vision tower (and the pieces Qwen2.5-VL's shares), its image processor and prompt expansion.

The tower: a 3D patch embedding (`temporal_patch_size` frames x `patch_size`^2 pixels; a still image is its frame
repeated), 2D rotary over each patch's (row, column), pre-norm ViT blocks whose attention never crosses images
(one segment per image: `cu_seqlens`), and the patch merger that concatenates each `spatial_merge_size`^2 block of
neighbouring patches and projects it to the text width. Patches arrive from the processor block-major (the
patches of one merge block are consecutive), so the merger is a reshape.

Qwen2-VL blocks: LayerNorm + QuickGELU MLP. Qwen2.5-VL (`qwen2_5_vl.py`) swaps in RMSNorm + gated SiLU MLP and
window attention; `QwenVisionConfig` says which.

The processor (`Qwen2VLImageProcessor`, Pillow + torch) matches transformers' `Qwen2VLImageProcessorPil`: smart
resize to multiples of `patch_size * merge_size` within [`min_pixels`, `max_pixels`], bicubic, rescale and CLIP
normalization, then `pixel_values [num_patches, C * T * P * P]` and `image_grid_thw [num_images, 3]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.norm import LayerNorm, RMSNorm
from mistralrs.layers.rotary import apply_rotary

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """`x * sigmoid(1.702 x)` (transformers' `quick_gelu`, Qwen2-VL's vision MLP)."""
    return x * torch.sigmoid(1.702 * x)


def _vision_act(name: str):
    return quick_gelu if name == "quick_gelu" else get_act_fn(name)


@dataclass(frozen=True)
class QwenVisionConfig:
    """The vision tower's hyper-parameters (Qwen2-VL's and Qwen2.5-VL's `vision_config`, read by `from_hf`)."""

    depth: int  # ViT blocks
    embed_dim: int  # the tower's width
    num_heads: int  # attention heads
    mlp_hidden: int  # MLP inner width
    out_hidden_size: int  # the merger's output width (the text model's hidden_size)
    hidden_act: str = "quick_gelu"  # MLP activation (HF name)
    in_channels: int = 3  # image channels
    patch_size: int = 14  # patch edge in pixels
    temporal_patch_size: int = 2  # frames per patch (a still image is repeated)
    spatial_merge_size: int = 2  # the merger concatenates merge x merge neighbouring patches
    rope_theta: float = 10000.0  # the 2D rotary's base
    rms_norm: bool = False  # Qwen2.5-VL: RMSNorm (else LayerNorm with bias)
    gated_mlp: bool = False  # Qwen2.5-VL: down(act(gate(x)) * up(x)) (else fc2(act(fc1(x))))
    window_size: int | None = None  # Qwen2.5-VL: window attention's window edge in pixels (None: no windows)
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL: blocks that attend over the whole image

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "mlp_hidden", "out_hidden_size", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"vision_config.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"vision_config: embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a "
                             "multiple of 4 (2D rotary)")
        if self.window_size is not None and self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"vision_config.window_size {self.window_size} must be a multiple of patch_size * "
                             f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        if self.hidden_act != "quick_gelu":
            get_act_fn(self.hidden_act)

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.embed_dim // self.num_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any], qwen2_5: bool) -> QwenVisionConfig:
        """From a `vision_config` dict: Qwen2-VL's (`embed_dim`, `mlp_ratio`, merger to `hidden_size`) or, with
        `qwen2_5`, Qwen2.5-VL's (`hidden_size`, `intermediate_size`, merger to `out_hidden_size`, windows)."""
        rope = d.get("rope_parameters") or {}
        common = dict(depth=d.get("depth", 32), num_heads=d.get("num_heads", 16), in_channels=d.get("in_channels", 3),
                      patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
                      spatial_merge_size=d.get("spatial_merge_size", 2),
                      rope_theta=float(rope.get("rope_theta", 10000.0)))
        if qwen2_5:
            return cls(**common, embed_dim=d.get("hidden_size", 3584), mlp_hidden=d.get("intermediate_size", 3420),
                       out_hidden_size=d.get("out_hidden_size", 3584), hidden_act=d.get("hidden_act", "silu"),
                       rms_norm=True, gated_mlp=True, window_size=d.get("window_size", 112),
                       fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))))
        embed_dim = d.get("embed_dim", 1280)
        return cls(**common, embed_dim=embed_dim, mlp_hidden=int(embed_dim * d.get("mlp_ratio", 4)),
                   out_hidden_size=d.get("hidden_size", 3584), hidden_act=d.get("hidden_act", "quick_gelu"))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lens: list[int],
                      scale: float) -> torch.Tensor:
    """Bidirectional attention inside each consecutive segment of the token axis (`seg_lens` sum to num_tokens).

    q, k, v, result: `[num_tokens, num_heads, head_dim]`. Segments of equal length run as one batched SDPA call.
    """
    if len(set(seg_lens)) == 1:
        n = len(seg_lens)
        qs, ks, vs = (x.view(n, seg_lens[0], *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    starts = torch.tensor([0] + seg_lens[:-1]).cumsum(0).tolist()
    by_len: dict[int, list[int]] = {}
    for start, length in zip(starts, seg_lens):
        by_len.setdefault(length, []).append(start)
    for length, group in by_len.items():
        rows = (torch.tensor(group)[:, None] + torch.arange(length)).flatten().to(q.device)
        qs, ks, vs = (x[rows].view(len(group), length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


class VisionAttention(nn.Module):
    """Multi-head self-attention with 2D rotary (applied in float32), inside each segment only."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True, dtype=dtype, device=device)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        out = segment_attention(q, k, v, seg_lens, self.head_dim**-0.5)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nn.Module):
    """Qwen2-VL's `fc2(act(fc1(x)))`, or Qwen2.5-VL's gated `down(act(gate(x)) * up(x))` (biases on all)."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.gated = config.gated_mlp
        dim, hidden = config.embed_dim, config.mlp_hidden
        self.act = _vision_act(config.hidden_act)
        if self.gated:
            self.gate_proj = nn.Linear(dim, hidden, bias=True, dtype=dtype, device=device)
            self.up_proj = nn.Linear(dim, hidden, bias=True, dtype=dtype, device=device)
            self.down_proj = nn.Linear(hidden, dim, bias=True, dtype=dtype, device=device)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=True, dtype=dtype, device=device)
            self.fc2 = nn.Linear(hidden, dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def _norm(config: QwenVisionConfig, dim: int, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    return (RMSNorm if config.rms_norm else LayerNorm)(dim, 1e-6, dtype=dtype, device=device)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: `x += attn(norm1(x)); x += mlp(norm2(x))`."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.norm1 = _norm(config, config.embed_dim, dtype=dtype, device=device)
        self.norm2 = _norm(config, config.embed_dim, dtype=dtype, device=device)
        self.attn = VisionAttention(config, dtype=dtype, device=device)
        self.mlp = VisionMLP(config, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The 3D patch embedding: `Conv3d` with kernel = stride = (T, P, P) and no bias, i.e. one matrix product per
    flattened patch (the checkpoint's `proj.weight` `[embed_dim, C, T, P, P]`)."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=False, dtype=dtype,
                              device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))


class PatchMerger(nn.Module):
    """Norm each patch (`ln_q`), concatenate each merge block's patches, then `Linear -> GELU -> Linear`."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = _norm(config, config.embed_dim, dtype=dtype, device=device)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim, dtype=dtype, device=device),
            nn.GELU(),
            nn.Linear(self.merged_dim, config.out_hidden_size, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


def patch_positions(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """`[num_patches, 2]` (row, column) of each patch in the processor's block-major order, per image and frame."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        pos = torch.stack([rows.reshape(block).transpose(1, 2).flatten(), cols.reshape(block).transpose(1, 2).flatten()],
                          dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


class QwenVisionTransformer(nn.Module):
    """Qwen2-VL's vision tower (Qwen2.5-VL's subclasses it with windows): `forward(pixel_values [num_patches,
    C*T*P*P], grid_thw [[t, h, w], ...]) -> [num_patches / merge^2, out_hidden_size]`, the images' tokens in order."""

    def __init__(self, config: QwenVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(VisionBlock(config, dtype=dtype, device=device) for _ in range(config.depth))
        self.merger = PatchMerger(config, dtype=dtype, device=device)
        quarter = config.head_dim // 2
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [head_dim // 4] float32

    def rotary_tables(self, grid_thw: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sign-folded sin `[num_patches, 1, head_dim]`: the first half of the frequencies turns
        with the patch's row, the second with its column (both halves repeated, NeoX layout)."""
        pos = patch_positions(grid_thw, self.config.spatial_merge_size).to(self.inv_freq.device)
        freqs = (pos.to(torch.float32)[:, :, None] * self.inv_freq).flatten(1)  # [num_patches, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        hidden = self.patch_embed(pixel_values)
        cos, sin = self.rotary_tables(grid_thw)
        seg_lens = [h * w for t, h, w in grid_thw for _ in range(t)]
        for block in self.blocks:
            hidden = block(hidden, cos, sin, seg_lens)
        return self.merger(hidden)
