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
from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import Qwen2ForCausalLM
from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor
from mistralrs.vision.clip import quick_gelu
from mistralrs.vision.llava import CLIP_MEAN, CLIP_STD
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.worker.forward_batch import ForwardBatch

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


def _vision_act(name: str):
    """The MLP activation of an HF name: CLIP's `quick_gelu` (Qwen2-VL) or one of layers/activation.py."""
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
        common = dict(depth=d.get("depth", 32), num_heads=d.get("num_heads", 16),
                      in_channels=d.get("in_channels", d.get("in_chans", 3)),  # the published configs: in_chans
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
        heads = self.num_heads
        qkv = self.qkv(x).view(x.shape[0], 3 * heads, self.head_dim)
        q, k = apply_rotary(qkv[:, :2 * heads].float(), cos, sin).to(x.dtype).split(heads, dim=1)
        out = segment_attention(q, k, qkv[:, 2 * heads:], seg_lens, self.head_dim**-0.5)
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
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))  # RMSNorm in bf16 returns a strided view


def patch_positions(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """`[num_patches, 2]` (row, column) of each patch in the processor's block-major order, per image and frame."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        pos = torch.stack([axis.reshape(block).transpose(1, 2).flatten() for axis in (rows, cols)], dim=-1)
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


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' `smart_resize`: (height, width) rounded to multiples of `factor`, the area brought within
    [min_pixels, max_pixels] keeping the aspect ratio; ValueError past an aspect ratio of 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImageParams:
    """The preprocessing parameters read from `preprocessor_config.json` (transformers' defaults otherwise)."""

    min_pixels: int = 56 * 56  # smallest resized area (`min_pixels`, or `size.shortest_edge`)
    max_pixels: int = 28 * 28 * 1280  # largest resized area (`max_pixels`, or `size.longest_edge`)
    patch_size: int = 14  # patch edge in pixels
    temporal_patch_size: int = 2  # a still image is repeated this many times
    merge_size: int = 2  # merge blocks are merge x merge patches: one prompt token each
    image_mean: tuple[float, ...] = CLIP_MEAN  # per-channel mean after rescaling
    image_std: tuple[float, ...] = CLIP_STD  # per-channel std after rescaling
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    resample: int = 3  # PIL resampling filter (3: bicubic)
    max_edge: int | None = None  # the user's `max_edge`: longest resized edge (None: no limit)

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"preprocessor_config.{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"preprocessor_config: min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if self.max_edge is not None and self.max_edge < self.patch_size * self.merge_size:
            raise ValueError(f"max_edge {self.max_edge} is below patch_size * merge_size "
                             f"({self.patch_size * self.merge_size})")

    @classmethod
    def from_hf(cls, d: dict[str, Any], max_edge: int | None) -> QwenImageParams:
        """From the image processor's parameters (published keys `min_pixels`/`max_pixels`, or transformers 5's
        `size`)."""
        size = d.get("size") or {}
        defaults = cls()
        return cls(min_pixels=d.get("min_pixels") or size.get("shortest_edge") or defaults.min_pixels,
                   max_pixels=d.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels,
                   patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
                   merge_size=d.get("merge_size", 2), image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", CLIP_STD)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)), resample=int(d.get("resample", 3)),
                   max_edge=max_edge)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width): `smart_resize`, where `max_edge` first scales the image down to it and
        then caps each edge at the largest multiple of patch_size * merge_size within it."""
        factor = self.patch_size * self.merge_size
        if self.max_edge is None:
            return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        scale = min(1.0, self.max_edge / max(height, width))
        h_bar, w_bar = smart_resize(max(1, round(height * scale)), max(1, round(width * scale)), factor,
                                    self.min_pixels, self.max_pixels)
        cap = self.max_edge // factor * factor
        return min(h_bar, cap), min(w_bar, cap)


def patchify(image: torch.Tensor, params: QwenImageParams) -> torch.Tensor:
    """`[H, W, C]` -> `[grid_h * grid_w, C * T * P * P]`, block-major (each merge block's patches consecutive),
    the image repeated `temporal_patch_size` times (transformers' layout)."""
    h, w, c = image.shape
    p, m, t = params.patch_size, params.merge_size, params.temporal_patch_size
    patches = image.view(h // (p * m), m, p, w // (p * m), m, p, c).permute(0, 3, 1, 4, 6, 2, 5)
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
    return patches.reshape((h // p) * (w // p), c * t * p * p)


class Qwen2VLImageProcessor(VisionProcessor):
    """Qwen2-VL / Qwen2.5-VL images: dynamic resolution (see `QwenImageParams`), one image =
    `<|vision_start|>` + `<|image_pad|>` x (t * h * w / merge^2) + `<|vision_end|>` in the prompt."""

    image_placeholder = VISION_START + IMAGE_PAD + VISION_END

    def __init__(self, params: QwenImageParams):
        self.params = params

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None
                        ) -> Qwen2VLImageProcessor:
        return cls(QwenImageParams.from_hf(files.image_processor_config(), max_edge))

    def pixel_tensor(self, image: Image.Image) -> torch.Tensor:
        """The resized, rescaled and normalized image `[H, W, 3]` float32: `x * (scale / std) - mean / std`, one
        multiply and one subtract over the pixels (equal to transformers' `(x * scale - mean) / std` within 1e-6)."""
        params = self.params
        height, width = params.target_size(image.height, image.width)
        resized = image.convert("RGB").resize((width, height), resample=params.resample)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(height, width, 3)
        std = torch.tensor(params.image_std, dtype=torch.float64)
        scale = (params.rescale_factor / std).to(torch.float32)
        shift = (torch.tensor(params.image_mean, dtype=torch.float64) / std).to(torch.float32)
        return pixels.to(torch.float32).mul_(scale).sub_(shift)

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        patches, grids = [], []
        for image in images:
            pixels = self.pixel_tensor(image)
            patches.append(patchify(pixels, self.params))
            grids.append([1, pixels.shape[0] // self.params.patch_size, pixels.shape[1] // self.params.patch_size])
        merge_area = self.params.merge_size**2
        return ImageInputs(tensors={"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids)},
                           num_image_tokens=[t * h * w // merge_area for t, h, w in grids],
                           digest=image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        """Each `<|image_pad|>` (inside the vision start/end the chat template writes) becomes that image's run, as
        transformers' processor expands it."""
        pieces = prompt.split(IMAGE_PAD)
        if len(pieces) - 1 != inputs.num_images:
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders ({IMAGE_PAD}) for "
                             f"{inputs.num_images} images")
        runs = [IMAGE_PAD * n for n in inputs.num_image_tokens]
        return pieces[0] + "".join(run + piece for run, piece in zip(runs, pieces[1:]))


def mrope_positions(token_ids: list[int], image_token_id: int, grid_thw: list[list[int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """transformers' `get_rope_index` for images: (`[3, len(token_ids)]` int64 positions, delta).

    Text tokens count on from the previous position on all three axes; image i's run of `t * h * w / merge^2`
    image tokens takes (start + frame, start + row, start + column) over its merged grid, and the text after it
    starts at start + max(h, w) / merge. A token at index p >= len(token_ids) then has position p + delta.
    """
    ids = torch.tensor(token_ids, dtype=torch.int64)
    parts, current, index = [], 0, 0
    for t, h, w in grid_thw:
        rows, cols = h // merge, w // merge
        found = (ids[index:] == image_token_id).nonzero()
        if found.numel() == 0:
            raise ValueError(f"the prompt has fewer image token runs than its {len(grid_thw)} images")
        start = index + int(found[0])
        parts.append(torch.arange(start - index).expand(3, -1) + current)
        current += start - index
        run = t * rows * cols
        if start + run > len(token_ids) or not bool((ids[start:start + run] == image_token_id).all()):
            raise ValueError(f"an image's run of {run} image tokens at index {start} is cut short")
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij"))
        parts.append(grid.reshape(3, -1) + current)
        current += max(rows, cols)
        index = start + run
    if bool((ids[index:] == image_token_id).any()):
        raise ValueError(f"the prompt has more image tokens than its {len(grid_thw)} images expand to")
    parts.append(torch.arange(len(token_ids) - index).expand(3, -1) + current)
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - len(token_ids) if len(token_ids) else 0


# Checkpoint prefixes -> our module tree: transformers 5 (`model.language_model.*`, `model.visual.*`) and the
# published layout (`model.*` for the text model, `visual.*`, `lm_head.*`).
QWEN_VL_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)

# transformers' Qwen2VLTextConfig defaults where they differ from TextModelConfig's (a saved config omits them)
QWEN2_VL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 80, "rope_theta": 1000000.0,
}


def text_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's HF dict: transformers 5's `text_config`, or the published flat config (less
    `vision_config`), with Qwen2-VL's defaults for omitted keys and the top-level `tie_word_embeddings`."""
    nested = config.get("text_config")
    text = dict(nested) if isinstance(nested, dict) else {k: v for k, v in config.items() if k != "vision_config"}
    rope = text.get("rope_parameters") or {}
    for key, value in QWEN2_VL_TEXT_DEFAULTS.items():
        if text.get(key) is None and not (key == "rope_theta" and "rope_theta" in rope):
            text[key] = value
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    return text


class Qwen2VLForConditionalGeneration(VisionCausalLM):
    """Qwen2-VL: the Qwen2 decoder of `models/` with M-RoPE (`rope_scaling.mrope_section`), fed with the vision
    tower's merged patches at the `<|image_pad|>` rows; positions come from `rope_positions` (the runner puts them
    in `ForwardBatch.rope_positions`)."""

    WEIGHT_RENAMES = QWEN_VL_RENAMES
    QWEN2_5 = False  # which vision_config layout and tower

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        text_config = TextModelConfig.from_hf_dict(text_config_dict(config))
        if text_config.rope_scaling is None or "mrope_section" not in text_config.rope_scaling:
            raise ValueError("config.json: Qwen2-VL's text model needs rope_scaling.mrope_section (M-RoPE)")
        self.config = text_config
        self.dtype = dtype
        self.language_model = Qwen2ForCausalLM(text_config, dtype=dtype, device=device)
        vision = QwenVisionConfig.from_hf(config.get("vision_config") or {}, self.QWEN2_5)
        if vision.out_hidden_size != text_config.hidden_size:
            raise ValueError(f"vision_config's merger width {vision.out_hidden_size} differs from the text "
                             f"hidden_size {text_config.hidden_size}")
        self.visual = self.tower_class()(vision, dtype=dtype, device=device)
        self.image_token_id = int(config.get("image_token_id", 151655))

    @classmethod
    def tower_class(cls) -> type[QwenVisionTransformer]:
        """The vision tower class."""
        return QwenVisionTransformer

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        pixels = inputs.tensors["pixel_values"].to(self.visual.inv_freq.device)
        return self.visual(pixels, inputs.tensors["image_grid_thw"].tolist())

    def rope_positions(self, prompt_token_ids: list[int],
                       inputs: ImageInputs | None) -> tuple[torch.Tensor, int] | None:
        if inputs is None:
            return None
        return mrope_positions(prompt_token_ids, self.image_token_id, inputs.tensors["image_grid_thw"].tolist(),
                               self.visual.config.spatial_merge_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        rope = fb.rope_positions if fb.rope_positions is not None else positions
        return self.language_model(input_ids, rope, fb, inputs_embeds=inputs_embeds)


register_vision("Qwen2VL", ("Qwen2VLForConditionalGeneration",), Qwen2VLForConditionalGeneration,
                Qwen2VLImageProcessor)
