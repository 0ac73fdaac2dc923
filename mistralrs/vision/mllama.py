"""Llama 3.2 Vision (`MllamaForConditionalGeneration`, VisionArchitecture.VLlama): the image processor, the vision
encoder and projector, the gated cross-attention decoder layer and the model (docs/vision/vllama.md).

Preprocessing (as transformers' `MllamaImageProcessorPil`): each image picks the tile canvas (`rows x cols` tiles of
`size` px, `rows * cols <= max_image_tiles`) that needs the smallest upscaling (else the least downscaling; ties: the
smallest area), is resized into it keeping its aspect ratio, zero-padded at the bottom and right, normalised and cut
into tiles (row-major), padded with zero tiles to `max_image_tiles`. `aspect_ratio_ids` index (rows, cols) in
`supported_aspect_ratios(max_image_tiles)` from 1; `aspect_ratio_mask` marks the real tiles. The prompt keeps one
`<|image|>` token per image: the image reaches the text only through cross-attention.

Vision encoder (`MllamaVisionModel`): patch conv, a gated pre-tile aspect-ratio embedding, a class token, gated
positional + tile-position embeddings, pre-norm, patches padded to a multiple of 8, local layers, post-norm, a gated
post-tile embedding, gated global layers over all tiles; the output is the global layers' output concatenated with
the local layers' outputs at `intermediate_layers_indices`, interleaved feature by feature (`vision_output_dim`
wide). The projector maps it to the text width: the cross-attention states of an image are its `tiles * patches`
rows.

Cross-attention (`MllamaCrossAttentionDecoderLayer`): a text token attends to the patch rows of the images its
cross-attention mask allows (transformers: a token from the first `<|image|>` on attends to that image's real tiles, up
to the next image token, consecutive image tokens sharing a range); a token that attends to nothing (text before the
first image) gets a zero cross-attention MLP output (the "full text row" mask) and an unmasked attention over all
image rows (scaled by the gate), as transformers computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.embedding import VocabEmbedding
from mistralrs.layers.linear import Linear, copy_checked
from mistralrs.layers.norm import RMSNorm
from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor, build_text_model
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import Normalization, replace_placeholders, resize

IMAGE_TOKEN = "<|image|>"
BILINEAR = 2  # PIL's resampling id, Mllama's default


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (a, b) with a * b <= max_image_tiles, a-major (transformers' `get_all_supported_aspect_ratios`)."""
    return tuple((a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1)
                 if a * b <= max_image_tiles)


def optimal_canvas(height: int, width: int, max_image_tiles: int, tile: int) -> tuple[int, int]:
    """The (height, width) tile canvas for an image: the smallest scale >= 1 that fits, else the largest < 1; ties
    go to the smallest area (first in `supported_aspect_ratios` order)."""
    canvases = [(a * tile, b * tile) for a, b in supported_aspect_ratios(max_image_tiles)]
    scales = [min(h / height, w / width) for h, w in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized (height, width) inside the canvas, aspect ratio kept (each side clipped to [tile, canvas])."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(int(height * scale_w) or 1, target_h), target_w
    return target_h, min(int(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class MllamaProcessor(VisionProcessor):
    """Mllama's image processor (module docstring). `max_edge` does not apply (the reference applies it to
    Idefics2/3 and Qwen2-VL only)."""

    tile_size: int  # size.height (= size.width)
    max_image_tiles: int  # most tiles per image
    resample: int  # PIL resampling filter
    normalization: Normalization  # rescale and normalise
    image_placeholder: str = IMAGE_TOKEN

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.max_image_tiles < 1:
            raise ValueError(f"Mllama tile size ({self.tile_size}) and max_image_tiles ({self.max_image_tiles}) "
                             "must be positive")

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> MllamaProcessor:
        pp = files.image_processor_config()
        size = pp.get("size") or {"height": 224, "width": 224}
        if size.get("height") != size.get("width"):
            raise ValueError(f"Mllama preprocessor 'size' must be square, got {size!r}")
        return cls(tile_size=int(size["height"]), max_image_tiles=int(pp.get("max_image_tiles", 4)),
                   resample=int(pp.get("resample", BILINEAR)),
                   normalization=Normalization.from_preprocessor(pp))

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """`[rows * cols, 3, tile, tile]` tiles of one RGB image and its (rows, cols)."""
        tile = self.tile_size
        canvas_h, canvas_w = optimal_canvas(image.height, image.width, self.max_image_tiles, tile)
        new_h, new_w = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, tile)
        padded = Image.new("RGB", (canvas_w, canvas_h))
        padded.paste(resize(image, new_h, new_w, self.resample), (0, 0))
        pixels = self.normalization(padded)
        rows, cols = canvas_h // tile, canvas_w // tile
        tiles = pixels.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
        return tiles.contiguous(), (rows, cols)

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        n, tile = len(images), self.tile_size
        pixels = torch.zeros(n, self.max_image_tiles, 3, tile, tile, dtype=torch.float32)
        ids = torch.zeros(n, dtype=torch.int64)
        mask = torch.zeros(n, self.max_image_tiles, dtype=torch.int64)
        ratios = supported_aspect_ratios(self.max_image_tiles)
        for i, image in enumerate(images):
            tiles, (rows, cols) = self.tiles(image.convert("RGB"))
            pixels[i, :len(tiles)] = tiles
            ids[i] = ratios.index((rows, cols)) + 1
            mask[i, :len(tiles)] = 1
        tensors = {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}
        return ImageInputs(tensors, [1] * n, image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        return replace_placeholders(prompt, self.image_placeholder, [self.image_placeholder] * inputs.num_images)


@dataclass(frozen=True)
class MllamaVisionConfig:
    """The vision tower's shape (transformers' `MllamaVisionConfig` names and defaults)."""

    hidden_size: int = 1280  # width
    intermediate_size: int = 5120  # MLP width
    num_hidden_layers: int = 32  # local layers
    num_global_layers: int = 8  # gated global layers
    attention_heads: int = 16  # heads
    image_size: int = 448  # tile side in pixels
    patch_size: int = 14  # patch side
    max_num_tiles: int = 4  # tiles per image
    norm_eps: float = 1e-5  # layer-norm epsilon of the encoder layers
    vision_output_dim: int = 7680  # output width: hidden * (1 + len(intermediate_layers_indices))
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)  # local outputs appended to the output
    supported_aspect_ratios: tuple[tuple[int, int], ...] = field(
        default=((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)))  # the aspect-ratio id table

    def __post_init__(self) -> None:
        if self.hidden_size % self.attention_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) must divide by attention_heads "
                             f"({self.attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size ({self.image_size}) must divide by patch_size ({self.patch_size})")
        if self.vision_output_dim != self.hidden_size * (1 + len(self.intermediate_layers_indices)):
            raise ValueError(f"vision_output_dim ({self.vision_output_dim}) must be hidden_size * (1 + number of "
                             f"intermediate_layers_indices)")
        if any(not 0 <= i < self.num_hidden_layers for i in self.intermediate_layers_indices):
            raise ValueError(f"intermediate_layers_indices {self.intermediate_layers_indices} must name local layers")

    @property
    def num_patches(self) -> int:
        """Patches per tile, the class token included."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None) -> MllamaVisionConfig:
        """From a `vision_config` dict (absent keys take transformers' defaults)."""
        d = dict(d or {})
        names = cls.__dataclass_fields__
        kwargs = {k: v for k, v in d.items() if k in names}
        if "intermediate_layers_indices" in kwargs:
            kwargs["intermediate_layers_indices"] = tuple(kwargs["intermediate_layers_indices"])
        if "supported_aspect_ratios" in kwargs:
            kwargs["supported_aspect_ratios"] = tuple(tuple(r) for r in kwargs["supported_aspect_ratios"])
        return cls(**kwargs)


class _Attention(nn.Module):
    """The vision layers' full attention (transformers' `MllamaVisionAttention` names)."""

    def __init__(self, width: int, heads: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width, bias=False, dtype=dtype,
                                                                        device=device) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, width))


class _GeluMLP(nn.Module):
    """fc1, exact GELU, fc2."""

    def __init__(self, width: int, intermediate: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate, dtype=dtype, device=device)
        self.fc2 = nn.Linear(intermediate, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MllamaVisionEncoderLayer(nn.Module):
    """Pre-norm attention + GELU MLP; global layers scale both branches by tanh gates."""

    def __init__(self, config: MllamaVisionConfig, gated: bool, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width, kw = config.hidden_size, dict(dtype=dtype, device=device)
        self.self_attn = _Attention(width, config.attention_heads, **kw)
        self.mlp = _GeluMLP(width, config.intermediate_size, **kw)
        self.input_layernorm = nn.LayerNorm(width, eps=config.norm_eps, **kw)
        self.post_attention_layernorm = nn.LayerNorm(width, eps=config.norm_eps, **kw)
        self.gate_attn = nn.Parameter(torch.zeros(1, **kw), requires_grad=False) if gated else None
        self.gate_ffn = nn.Parameter(torch.zeros(1, **kw), requires_grad=False) if gated else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), mask)
        x = x + (attn if self.gate_attn is None else self.gate_attn.tanh() * attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (mlp if self.gate_ffn is None else self.gate_ffn.tanh() * mlp)


class _Layers(nn.Module):
    """A `layers` list (the checkpoint's `transformer.layers.*` / `global_transformer.layers.*`)."""

    def __init__(self, config: MllamaVisionConfig, count: int, gated: bool, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, gated, dtype=dtype, device=device)
                                    for _ in range(count))


class _TileEmbedding(nn.Module):
    """A gated per-aspect-ratio embedding added to every patch of each tile."""

    def __init__(self, ids: int, config: MllamaVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.tiles, self.width = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(ids, self.tiles * self.width, dtype=dtype, device=device)
        self.gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(ids).reshape(len(ids), self.tiles, 1, self.width) * self.gate.tanh()


class _PositionEmbedding(nn.Module):
    """`(1 - tanh g) * embedding` on every tile plus `tanh g * tile_embedding[aspect ratio]`."""

    def __init__(self, ids: int, config: MllamaVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.embedding = nn.Parameter(torch.zeros(config.num_patches, config.hidden_size, **kw), requires_grad=False)
        self.gate = nn.Parameter(torch.zeros(1, **kw), requires_grad=False)
        self.tile_embedding = nn.Embedding(ids, config.max_num_tiles * config.num_patches * config.hidden_size, **kw)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(ids).reshape(x.shape)


class MllamaVisionModel(nn.Module):
    """`pixel_values [n, tiles, 3, S, S]`, `aspect_ratio_ids [n]`, `aspect_ratio_mask [n, tiles]` ->
    `[n, tiles, num_patches, vision_output_dim]` (module docstring). Names follow the checkpoint's `vision_model.*`."""

    def __init__(self, config: MllamaVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        width, kw = config.hidden_size, dict(dtype=dtype, device=device)
        ids = len(config.supported_aspect_ratios) + 1
        self.patch_embedding = nn.Conv2d(3, width, config.patch_size, config.patch_size, bias=False, **kw)
        self.class_embedding = nn.Parameter(torch.zeros(width, **kw), requires_grad=False)
        self.gated_positional_embedding = _PositionEmbedding(ids, config, **kw)
        self.pre_tile_positional_embedding = _TileEmbedding(ids, config, **kw)
        self.post_tile_positional_embedding = _TileEmbedding(ids, config, **kw)
        self.layernorm_pre = nn.LayerNorm(width, **kw)
        self.layernorm_post = nn.LayerNorm(width, **kw)
        self.transformer = _Layers(config, config.num_hidden_layers, False, **kw)
        self.global_transformer = _Layers(config, config.num_global_layers, True, **kw)

    @staticmethod
    def attention_mask(tile_mask: torch.Tensor, num_patches: int, length: int, dtype: torch.dtype) -> torch.Tensor:
        """`[n, 1, tiles * length, tiles * length]` additive mask: a pair is masked when both of its positions are
        padding (a padding tile, or a padding patch of a tile), as transformers builds it."""
        n, tiles = tile_mask.shape
        pad = tile_mask.view(n, tiles, 1, 1).to(dtype).repeat(1, 1, length, 1)
        pad[:, :, -(length - num_patches):] = 0
        pad = (1 - pad).reshape(n, tiles * length, 1)
        return (pad @ pad.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        config, width = self.config, self.config.hidden_size
        n, tiles = pixel_values.shape[:2]
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.device, weight.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.reshape(n, tiles, -1, width), aspect_ratio_ids)
        x = torch.cat([self.class_embedding.expand(n, tiles, 1, width), x], dim=2)
        patches = x.shape[2]
        x = self.gated_positional_embedding(x, aspect_ratio_ids)
        x = self.layernorm_pre(x)
        padding = (8 - patches % 8) % 8
        x = F.pad(x, (0, 0, 0, padding))
        length = patches + padding
        mask = self.attention_mask(aspect_ratio_mask.to(x.device), config.num_patches, length, x.dtype)
        x = x.reshape(n, tiles * length, width)
        intermediate = []
        for layer in self.transformer.layers:
            x = layer(x, mask)
            intermediate.append(x)
        x = self.layernorm_post(x).reshape(n, tiles, length, width)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids).reshape(n, tiles * length, width)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        # the intermediate outputs are interleaved feature by feature (transformers stacks them on the last axis)
        picked = torch.stack([intermediate[i] for i in config.intermediate_layers_indices], dim=-1)
        out = torch.cat([x.reshape(n, tiles, length, width), picked.reshape(n, tiles, length, -1)], dim=-1)
        return out[:, :, :patches]


class MllamaTextCrossAttention(nn.Module):
    """Text queries (q-normed) against the projected image states (k-normed keys), grouped-query heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = Linear(hidden, heads * self.head_dim, prefix=f"{prefix}.q_proj", **kw)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, prefix=f"{prefix}.k_proj", **kw)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, prefix=f"{prefix}.v_proj", **kw)
        self.o_proj = Linear(heads * self.head_dim, hidden, prefix=f"{prefix}.o_proj", **kw)
        kw = dict(dtype=dtype, device=device)
        self.q_norm = RMSNorm(self.head_dim, eps, **kw)
        self.k_norm = RMSNorm(self.head_dim, eps, **kw)

    def image_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[rows, hidden]` projected image states -> keys and values `[kv_heads, rows, head_dim]` (computed once
        per request and kept)."""
        rows = states.shape[0]
        k = self.k_norm(self.k_proj(states).view(rows, self.kv_heads, self.head_dim)).transpose(0, 1)
        v = self.v_proj(states).view(rows, self.kv_heads, self.head_dim).transpose(0, 1)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """`x [tokens, hidden]` of one sequence, its image keys/values, `mask [tokens, rows]` additive."""
        tokens = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(tokens, self.heads, self.head_dim)).transpose(0, 1)
        k, v = kv
        out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             attn_mask=mask.to(q.dtype), enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(tokens, -1))


class _SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (the checkpoint's `mlp.*` names)."""

    def __init__(self, hidden: int, intermediate: int, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = Linear(hidden, intermediate, prefix=f"{prefix}.gate_proj", **kw)
        self.up_proj = Linear(hidden, intermediate, prefix=f"{prefix}.up_proj", **kw)
        self.down_proj = Linear(intermediate, hidden, prefix=f"{prefix}.down_proj", **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Gated cross-attention then a gated SwiGLU MLP whose output is zeroed on rows that attend to no image."""

    def __init__(self, layer_idx: int, hidden: int, intermediate: int, heads: int, kv_heads: int, eps: float, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.layer_idx = layer_idx  # its index among the decoder layers (the key of its image keys/values)
        prefix = f"model.layers.{layer_idx}"  # as the text model's layers name their Linears (ISQ reads it)
        self.cross_attn = MllamaTextCrossAttention(hidden, heads, kv_heads, eps, prefix=f"{prefix}.cross_attn", **kw)
        self.input_layernorm = RMSNorm(hidden, eps, **kw)
        self.post_attention_layernorm = RMSNorm(hidden, eps, **kw)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1, **kw), requires_grad=False)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1, **kw), requires_grad=False)
        self.mlp = _SwiGLU(hidden, intermediate, prefix=f"{prefix}.mlp", **kw)

    @staticmethod
    def masks(allowed: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`allowed [tokens, rows]` bool -> (additive mask, `[tokens, 1]` full-text-row factor), as transformers'
        `_prepare_cross_attention_mask`: a row with no allowed key keeps a zero mask (uniform attention) and a
        zero factor."""
        minimum = torch.finfo(dtype).min
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, minimum)
        row = allowed.any(dim=-1, keepdim=True).to(dtype)
        return additive * row, row

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fb) -> torch.Tensor:
        """The text model's layer call over packed tokens: each sequence's rows with its `fb.cross_attention`
        context; sequences without images skip the layer (as transformers does for text-only inputs)."""
        contexts = fb.cross_attention
        if contexts is None:
            return hidden
        pieces = list(hidden.split(fb.query_lens))
        for s, context in enumerate(contexts):
            if context is not None:
                kv = tuple(t.to(hidden.device) for t in context.kv[self.layer_idx])
                pieces[s] = self.attend(pieces[s], kv, context.mask.to(hidden.device), context.row.to(hidden.device))
        return torch.cat(pieces)

    def attend(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
               row: torch.Tensor) -> torch.Tensor:
        """One sequence: `x [tokens, hidden]`, its image keys/values, additive `mask` and `row` factor (`masks`)."""
        attn = self.cross_attn(self.input_layernorm(x), kv, mask)
        x = x + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + self.cross_attn_mlp_gate.tanh() * (row * mlp)


@dataclass
class CrossAttentionState:
    """One request's cross-attention inputs, computed once and kept for its whole life."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # cross layer index -> image keys, values [kv_heads, rows, dim]
    allowed: torch.Tensor  # [prompt_len, rows] bool: which image rows each prompt token attends to

    def chunk(self, start: int, count: int) -> CrossAttentionChunk:
        """The context of tokens `start .. start + count` (decode tokens repeat the last prompt row, as
        transformers extends the mask)."""
        index = torch.arange(start, start + count).clamp(max=self.allowed.shape[0] - 1)
        allowed = self.allowed[index.to(self.allowed.device)]
        dtype = next(iter(self.kv.values()))[0].dtype
        mask, row = MllamaCrossAttentionDecoderLayer.masks(allowed, dtype)
        return CrossAttentionChunk(self.kv, mask, row)


@dataclass
class CrossAttentionChunk:
    """One sequence's cross-attention context for one step's chunk."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # cross layer index -> image keys, values
    mask: torch.Tensor  # [chunk tokens, rows] additive
    row: torch.Tensor  # [chunk tokens, 1]: 0 where a token attends to no image


def cross_attention_allowed(prompt: list[int], image_token_id: int, real_rows: list[torch.Tensor]) -> torch.Tensor:
    """`[len(prompt), rows]` bool (transformers' `get_cross_attention_token_mask` + dense conversion): image i's
    rows (its real tiles, `real_rows[i]`) are seen from its `<|image|>` token to the next image token (a run of
    consecutive image tokens all see up to the end of the run's successor range), the last image to the end."""
    locations = [i for i, t in enumerate(prompt) if t == image_token_id]
    if len(locations) != len(real_rows):
        raise ValueError(f"the prompt holds {len(locations)} {IMAGE_TOKEN} tokens for {len(real_rows)} images")
    ranges = [[a, b] for a, b in zip(locations, locations[1:] + [len(prompt)])]
    end = ranges[-1][1]
    for r in reversed(ranges):
        if r[0] == r[1] - 1:
            r[1] = end
        end = r[1]
    allowed = torch.zeros(len(prompt), sum(len(r) for r in real_rows), dtype=torch.bool)
    offset = 0
    for (a, b), rows in zip(ranges, real_rows):
        allowed[a:b, offset:offset + len(rows)] = rows
        offset += len(rows)
    return allowed


# transformers' MllamaTextConfig defaults for the keys a checkpoint's `text_config` may omit
MLLAMA_TEXT_DEFAULTS: dict[str, Any] = {"vocab_size": 128_256, "hidden_size": 4096, "hidden_act": "silu",
                                        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                                        "intermediate_size": 14_336, "rms_norm_eps": 1e-5,
                                        "max_position_embeddings": 131_072, "rope_theta": 500_000.0,
                                        "tie_word_embeddings": False,
                                        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}
MLLAMA_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


class MllamaForConditionalGeneration(VisionCausalLM):
    """Llama 3.2 Vision: the Llama decoder of `models/llama.py` with `MllamaCrossAttentionDecoderLayer`s in the
    slots `cross_attention_layers` (their KV-cache slots stay unused), fed by the vision encoder and projector.
    The image reaches the text only through cross-attention: nothing is spliced into the embeddings; the model
    runner keeps each request's `cross_attention_state` and passes its chunk contexts in `fb.cross_attention`."""

    WEIGHT_RENAMES = MLLAMA_RENAMES

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        text = {**MLLAMA_TEXT_DEFAULTS, **(config.get("text_config") or {})}
        text.pop("model_type", None)
        self.cross_layers = tuple(int(i) for i in text["cross_attention_layers"])
        if not self.cross_layers or any(not 0 <= i < text["num_hidden_layers"] for i in self.cross_layers):
            raise ValueError(f"text_config cross_attention_layers {self.cross_layers} must name one or more decoder layers")
        self.language_model = build_text_model({**text, "architectures": ["LlamaForCausalLM"]}, {},
                                               dtype=dtype, device=device)
        hidden, kw = text["hidden_size"], dict(dtype=dtype, device=device)
        decoder = self.language_model.model
        decoder.embed_tokens = VocabEmbedding(text["vocab_size"] + 8, hidden, **kw)  # the image token's row is 8 past
        for i in self.cross_layers:
            decoder.layers[i] = MllamaCrossAttentionDecoderLayer(
                i, hidden, text["intermediate_size"], text["num_attention_heads"], text["num_key_value_heads"],
                text["rms_norm_eps"], **kw)
        self.vision_config = MllamaVisionConfig.from_hf_dict(config.get("vision_config"))
        self.vision_model = MllamaVisionModel(self.vision_config, **kw)
        self.multi_modal_projector = nn.Linear(self.vision_config.vision_output_dim, hidden, **kw)
        self.image_token_id = int(config.get("image_token_index", 128_256))

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        """`[images, tiles * patches, text_hidden]` projected image states (padding tiles included)."""
        t = inputs.tensors
        device = self.multi_modal_projector.weight.device
        states = self.vision_model(t["pixel_values"].to(device), t["aspect_ratio_ids"].to(device),
                                   t["aspect_ratio_mask"].to(device))
        return self.multi_modal_projector(states).flatten(1, 2)

    def cross_attention_state(self, prompt: list[int], inputs: ImageInputs) -> CrossAttentionState:
        """A request's image keys/values for every cross layer and its prompt's cross-attention mask."""
        states = self.encode_images(inputs)
        patches = self.vision_config.num_patches
        real = [m.bool().repeat_interleave(patches) for m in inputs.tensors["aspect_ratio_mask"]]
        allowed = cross_attention_allowed(prompt, self.image_token_id, real).to(states.device)
        flat = states.flatten(0, 1)
        layers = self.language_model.model.layers
        kv = {i: layers[i].cross_attn.image_kv(flat.to(layers[i].input_layernorm.weight.device))
              for i in self.cross_layers}  # each on its layer's device (the device map places decoder layers)
        return CrossAttentionState(kv, allowed)

    def _cross_layer_names(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        prefixes = tuple(f"language_model.model.layers.{i}." for i in self.cross_layers)
        return {n for n, _ in weights if n.startswith(prefixes)}

    def load_weights(self, weights) -> set[str]:
        """The cross-attention layers load by name (their `q_proj`/`gate_proj` are not fused as the self-attention
        layers' are); the rest loads as `VisionCausalLM` does."""
        weights = list(weights)
        cross = self._cross_layer_names(weights)
        modules, consumed = dict(self.named_modules()), set()
        for name, tensor in weights:
            path, _, attr = name.rpartition(".")
            owner = modules.get(path)
            if name not in cross or owner is None:
                continue
            if isinstance(owner, Linear):
                owner.load_weight(attr, tensor, None)
            elif isinstance(getattr(owner, attr, None), nn.Parameter):
                copy_checked(getattr(owner, attr), tensor, name)
            else:
                continue
            consumed.add(name)
        return consumed | super().load_weights((n, t) for n, t in weights if n not in cross)

    def expected_weight_names(self) -> set[str]:
        prefixes = tuple(f"language_model.model.layers.{i}." for i in self.cross_layers)
        names = {n for n in super().expected_weight_names() if not n.startswith(prefixes)}
        return names | {n for n, _ in self.named_parameters() if n.startswith(prefixes)}


register_vision("VLlama", ("MllamaForConditionalGeneration",), MllamaForConditionalGeneration, MllamaProcessor)
