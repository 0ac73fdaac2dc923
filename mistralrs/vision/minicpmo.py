"""MiniCPM-o 2.6 (vision only; remote code, not in transformers): a SigLIP tower with NaViT (bucketed) positions,
a 64-query resampler and a Qwen2 text decoder. Docs: docs/vision/minicpmo.md.

Preprocessing (as the checkpoint's `MiniCPMVImageProcessor`, slice mode): an image whose area exceeds one
`scale_resolution`² tile is cut into the `cols x rows` grid `sliced_grid` picks (at most `max_slice_nums` slices);
the overview is the source image resized to about one tile, the slices are cuts of the image resized to the
refined size; sides are multiples of `patch_size`, Pillow bicubic, then `(x / 255 - mean) / std` in float32. The
user writes `(<image>./</image>)` per image; it becomes `<image>` + `<unk>`x64 + `</image>`, then per grid row
`<slice>` + `<unk>`x64 + `</slice>` per column, rows joined by newlines. Every overview and slice gives 64
features (the resampler's queries), spliced at the `<unk>` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.norm import LayerNorm
from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import Qwen2ForCausalLM
from mistralrs.models.registry import hf_architecture_of
from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import SiglipVisionConfig, SiglipVisionTransformer, pad_batch, replace_placeholders

# transformers' SiglipVisionConfig defaults (the remote config class derives from it)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)
# Qwen2Config defaults (MiniCPM-o's config.json holds the text fields at its top level)
TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
# config.json keys that are not the text decoder's
NON_TEXT_KEYS = ("vision_config", "audio_config", "tts_config", "auto_map", "architectures", "model_type")
# the audio and speech parts of the published checkpoint, which this vision-only model does not use
UNUSED_PREFIXES = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")
# the `<unk>` id of the published tokenizer, used when config.json names no `image_token_id` (not verified
# against the published tokenizer files, see docs/vision/minicpmo.md)
DEFAULT_UNK_ID = 128244
IMAGE_TAG = "(<image>./</image>)"
BICUBIC = Image.Resampling.BICUBIC


def ensure_divide(length: float, patch: int) -> int:
    """`length` rounded (Python's round) to a multiple of `patch`, at least `patch`."""
    return max(round(length / patch) * patch, patch)


def find_best_resize(width: float, height: float, scale: int, patch: int, allow_upscale: bool) -> tuple[int, int]:
    """(width, height): the aspect ratio kept at about `scale`² pixels when the image is larger (or
    `allow_upscale`), each side then a multiple of `patch`."""
    if width * height > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def sliced_grid(width: int, height: int, max_slices: int, scale: int) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid, None for an image that is not sliced: among the grids of
    ceil(area / scale²) - 1, + 0 and + 1 slices (capped at `max_slices`, never 1), the first whose cols / rows
    has the log ratio closest to the image's."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < best_error:
                best, best_error = (cols, count // cols), error
    return best


def refine_size(width: int, height: int, grid: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    """(width, height) of the image the slices are cut from: each slice about one tile, a multiple of `patch`."""
    cols, rows = grid
    slice_w, slice_h = find_best_resize(ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows,
                                        scale, patch, allow_upscale=True)
    return slice_w * cols, slice_h * rows


@dataclass(frozen=True)
class MiniCpmOProcessor(VisionProcessor):
    """MiniCPM-o's slice-mode image processor and `(<image>./</image>)` expansion (module docstring)."""

    max_slice_nums: int  # most slices per image (9)
    scale_resolution: int  # side of one tile (448)
    patch_size: int  # sides are multiples of it (14)
    image_feature_size: int  # `<unk>` tokens per overview or slice (the resampler's queries, 64)
    slice_mode: bool  # slice large images (else the image itself, unresized, as the only tile)
    use_image_id: bool  # prefix each image with `<image_id>i</image_id>`
    mean: tuple[float, float, float]  # normalisation mean per channel
    std: tuple[float, float, float]  # normalisation std per channel
    tokens: tuple[str, str, str, str, str, str, str]  # im_start, im_end, slice_start, slice_end, unk, id_start, id_end
    image_placeholder: str = IMAGE_TAG

    def __post_init__(self) -> None:
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MiniCPM-o processor: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> MiniCpmOProcessor:
        """The checkpoint's preprocessor_config.json (`max_edge` is ignored, as the reference ignores it)."""
        pp = files.image_processor_config()

        def triple(key: str) -> tuple[float, float, float]:
            return tuple(float(v) for v in (pp.get(key) or (0.5, 0.5, 0.5)))

        return cls(max_slice_nums=int(pp.get("max_slice_nums", 9)),
                   scale_resolution=int(pp.get("scale_resolution", 448)),
                   patch_size=int(pp.get("patch_size", 14)),
                   image_feature_size=int(pp.get("image_feature_size", config.get("query_num", 64))),
                   slice_mode=bool(pp.get("slice_mode", True)), use_image_id=bool(pp.get("use_image_id", False)),
                   mean=triple("norm_mean"), std=triple("norm_std"),
                   tokens=tuple(str(pp.get(k, d)) for k, d in (
                       ("im_start", "<image>"), ("im_end", "</image>"), ("slice_start", "<slice>"),
                       ("slice_end", "</slice>"), ("unk", "<unk>"), ("im_id_start", "<image_id>"),
                       ("im_id_end", "</image_id>"))))

    def grid(self, image: Image.Image) -> tuple[int, int] | None:
        """(cols, rows) of the image's slices, None when it is not sliced."""
        if not self.slice_mode:
            return None
        return sliced_grid(image.width, image.height, self.max_slice_nums, self.scale_resolution)

    def slices(self, image: Image.Image) -> list[Image.Image]:
        """The overview, then the slices row by row."""
        if not self.slice_mode:
            return [image]
        width, height, scale, patch = image.width, image.height, self.scale_resolution, self.patch_size
        grid = self.grid(image)
        if grid is None:
            return [image.resize(find_best_resize(width, height, scale, patch, True), resample=BICUBIC)]
        overview = image.resize(find_best_resize(width, height, scale, patch, False), resample=BICUBIC)
        refined = image.resize(refine_size(width, height, grid, scale, patch), resample=BICUBIC)
        slice_w, slice_h = refined.width // grid[0], refined.height // grid[1]
        cuts = [refined.crop((c * slice_w, r * slice_h, (c + 1) * slice_w, (r + 1) * slice_h))
                for r in range(grid[1]) for c in range(grid[0])]
        return [overview] + cuts

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> `[3, H, W]` float32, `(x / 255 - mean) / std` in float32."""
        array = np.asarray(image, dtype=np.float32) / np.float32(255)
        out = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        tiles, counts, grids = [], [], []
        for image in images:
            image_tiles = [self.normalize(t) for t in self.slices(image.convert("RGB"))]
            tiles += image_tiles
            counts.append(len(image_tiles))
            grids.append(self.grid(image) or (0, 0))
        tensors = pad_batch(tiles)
        tensors["tgt_sizes"] = torch.tensor([[t.shape[1] // self.patch_size, t.shape[2] // self.patch_size]
                                             for t in tiles], dtype=torch.int64)
        tensors["grids"] = torch.tensor(grids, dtype=torch.int64)
        return ImageInputs(tensors, [self.image_feature_size * n for n in counts], image_digest(images))

    def expansion(self, grid: tuple[int, int], index: int) -> str:
        """The prompt text of image `index` sliced into `grid` (cols, rows; (0, 0): not sliced)."""
        im_start, im_end, slice_start, slice_end, unk, id_start, id_end = self.tokens
        run = unk * self.image_feature_size
        text = f"{id_start}{index}{id_end}" if self.use_image_id else ""
        text += f"{im_start}{run}{im_end}"
        cols, rows = grid
        return text + "\n".join(f"{slice_start}{run}{slice_end}" * cols for _ in range(rows))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        grids = [tuple(g) for g in inputs.tensors["grids"].tolist()]
        return replace_placeholders(prompt, self.image_placeholder,
                                    [self.expansion(g, i) for i, g in enumerate(grids)])


def sincos_2d(embed_dim: int, height: int, width: int) -> torch.Tensor:
    """`[height, width, embed_dim]` float32: the first half sin/cos of the column index, the second half of the
    row index, each half `[sin(p * w_k), cos(p * w_k)]` with `w_k = 10000^(-k / (embed_dim / 4))` (float64
    arithmetic, as the published numpy code)."""
    if embed_dim % 4:
        raise ValueError(f"the resampler's width ({embed_dim}) must be a multiple of 4")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")

    def half(pos: np.ndarray) -> np.ndarray:
        angles = pos[..., None] * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    return torch.from_numpy(np.concatenate([half(cols), half(rows)], axis=-1)).float()


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with torch's `nn.MultiheadAttention` parameters (`in_proj_weight`,
    `in_proj_bias`, `out_proj`)."""

    def __init__(self, dim: int, num_heads: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, dtype=dtype, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, dtype=dtype, device=device))
        self.out_proj = nn.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_valid: torch.Tensor) -> torch.Tensor:
        """query `[batch, q, dim]`, key/value `[batch, k, dim]`, key_valid `[batch, k]` bool -> `[batch, q, dim]`."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch = query.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)),
                                             heads(F.linear(value, w_v, b_v)), attn_mask=key_valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, query.shape[1], -1))


class Resampler(nn.Module):
    """64 learned queries attend once to a slice's patch features (keys plus a 2D sin-cos table by patch row and
    column): `ln_post(attn(ln_q(query), ln_kv(kv_proj(x)) + pos, ln_kv(kv_proj(x)))) @ proj`."""

    def __init__(self, num_queries: int, dim: int, num_heads: int, kv_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(num_queries, dim, dtype=dtype, device=device))
        self.kv_proj = (nn.Linear(kv_dim, dim, bias=False, dtype=dtype, device=device) if kv_dim != dim
                        else nn.Identity())
        self.attn = ResamplerAttention(dim, num_heads, dtype=dtype, device=device)
        self.ln_q, self.ln_kv, self.ln_post = (LayerNorm(dim, 1e-6, dtype=dtype, device=device) for _ in range(3))
        self.proj = nn.Parameter(torch.empty(dim, dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, tgt_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """x `[n, L, kv_dim]` (slice i's `h_i * w_i` patches row-major first, then padding), tgt_sizes the
        (h_i, w_i) -> `[n, num_queries, dim]`."""
        n, length, _ = x.shape
        table = sincos_2d(self.dim, max(h for h, _ in tgt_sizes), max(w for _, w in tgt_sizes)).to(x.device)
        pos = torch.zeros(n, length, self.dim, device=x.device)
        valid = torch.zeros(n, length, dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(tgt_sizes):
            pos[i, :h * w] = table[:h, :w].reshape(h * w, -1)
            valid[i, :h * w] = True
        kv = self.ln_kv(self.kv_proj(x))
        query = self.ln_q(self.query).expand(n, -1, -1)
        out = self.attn(query, kv + pos.to(kv.dtype), kv, valid)
        return self.ln_post(out) @ self.proj


class MiniCPMO(VisionCausalLM):
    """MiniCPM-o 2.6, vision only: `vpm` (SigLIP, bucketed positions) -> `resampler` (64 queries per overview or
    slice) -> the `<unk>` rows of a Qwen2 `llm` (our `language_model`)."""

    # the published layout (`llm.model.*`, `llm.lm_head.*`, `vpm.*`, `resampler.*`) -> our module tree
    WEIGHT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (("llm.", "language_model."),)

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        vision = SiglipVisionConfig.from_hf_dict(config.get("vision_config"), VISION_DEFAULTS)
        if config.get("drop_vision_last_layer", False):
            vision = SiglipVisionConfig(**{**vision.__dict__, "num_hidden_layers": vision.num_hidden_layers - 1})
        text = TextModelConfig.from_hf_dict(self.text_config_dict(config))
        if text.hidden_size % 128:
            raise ValueError(f"config field 'hidden_size' ({text.hidden_size}) must be a multiple of 128 "
                             "(the resampler has hidden_size / 128 heads)")
        self.image_token_id = int(config.get("image_token_id", DEFAULT_UNK_ID))
        self.vpm = SiglipVisionTransformer(vision, bucketed_positions=True, dtype=dtype, device=device)
        self.resampler = Resampler(int(config.get("query_num", 64)), text.hidden_size, text.hidden_size // 128,
                                   vision.hidden_size, dtype=dtype, device=device)
        self.language_model = Qwen2ForCausalLM(text, dtype=dtype, device=device)
        self.config = text
        self.dtype = dtype

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The Qwen2 decoder's config: config.json's top-level fields over Qwen2's defaults."""
        text = {k: v for k, v in config.items() if k not in NON_TEXT_KEYS}
        return {**TEXT_DEFAULTS, **text, "architectures": [hf_architecture_of(Qwen2ForCausalLM)]}

    def load_weights(self, weights) -> set[str]:
        """The published names; the audio and speech tensors (`UNUSED_PREFIXES`) are consumed unused."""
        kept, unused = [], set()
        for name, tensor in weights:
            if name.startswith(UNUSED_PREFIXES):
                unused.add(name)
            else:
                kept.append((name, tensor))
        return super().load_weights(kept) | unused

    def vision_features(self, pixel_values: torch.Tensor, tgt_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """`[n, 3, H, W]` padded tiles with (h_i, w_i) patches each -> `[n, L, vision_hidden]`: each tile's valid
        patch features row-major first, then zero padding (L = the most patches of a tile)."""
        n, _, height, width = pixel_values.shape
        patch = self.vpm.config.patch_size
        mask = torch.zeros(n, height // patch, width // patch, dtype=torch.bool, device=pixel_values.device)
        for i, (h, w) in enumerate(tgt_sizes):
            mask[i, :h, :w] = True
        hidden = self.vpm(pixel_values, mask)
        out = hidden.new_zeros(n, max(h * w for h, w in tgt_sizes), hidden.shape[-1])
        for i, (h, w) in enumerate(tgt_sizes):
            out[i, :h * w] = hidden[i][mask[i].flatten()]
        return out

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.vpm.post_layernorm.weight.device
        pixels = inputs.tensors["pixel_values"].to(device, self.dtype)
        tgt_sizes = [tuple(s) for s in inputs.tensors["tgt_sizes"].tolist()]
        features = self.resampler(self.vision_features(pixels, tgt_sizes), tgt_sizes)
        return features.reshape(-1, features.shape[-1])


register_vision("MiniCpmO", ("MiniCPMO",), MiniCPMO, MiniCpmOProcessor)
