"""Idefics3 (and SmolVLM, which uses its architecture): a SigLIP tower with bucketed positions, a pixel-shuffle
connector, and a Llama text decoder.

Preprocessing (as transformers' `Idefics3ImageProcessor` + `Idefics3Processor`): the image's longest edge is
resized to `size.longest_edge` (capped by `max_edge`); with `do_image_splitting` it is then resized up to a
multiple of `max_image_size` on each side and cut into `rows x cols` tiles of `max_image_size`, followed by the
whole image resized to one tile (the global image); otherwise the image is resized to one tile. Each tile becomes
`image_seq_len` `<image>` tokens: `<fake_token_around_image><row_r_col_c><image>...` per tile, a newline per row,
then `\n<fake_token_around_image><global-img><image>...<fake_token_around_image>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import LlamaForCausalLM
from mistralrs.models.registry import hf_architecture_of
from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import (Normalization, SiglipVisionConfig, SiglipVisionTransformer, pad_batch,
                                     replace_placeholders, resize, text_config_of)

# transformers' Idefics3VisionConfig defaults (a checkpoint's vision_config lists only what differs)
VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       image_size=224, patch_size=32)
# LlamaConfig defaults, with Idefics3Config's rms_norm_eps
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5)
MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized image's edges
LANCZOS = 1  # PIL's resampling id, Idefics3's default
FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_TOKEN = "<global-img>"


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """`[batch, seq, dim]` (seq a square grid) -> `[batch, seq / scale², dim * scale²]`, merging each
    `scale x scale` block of patches (the order transformers' Idefics3Connector uses)."""
    batch, seq, dim = x.shape
    side = int(seq**0.5)
    x = x.view(batch, side, side // scale, dim * scale).permute(0, 2, 1, 3)
    x = x.reshape(batch, side // scale, side // scale, dim * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(batch, seq // (scale * scale), dim * scale * scale)


class Idefics3Projection(nn.Module):
    """The connector's `modality_projection`: one bias-free linear map."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    """Pixel shuffle by `scale_factor`, then the projection into the text model's width."""

    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = Idefics3Projection(vision_hidden * scale_factor**2, text_hidden, dtype=dtype,
                                                      device=device)

    def forward(self, image_hidden: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(image_hidden, self.scale_factor))


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' `_resize_output_size_rescale_to_max_len`: the longest edge becomes `max_len` (the other
    rounded up to even), then both are capped below MAX_IMAGE_SIZE keeping the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' `resize_for_vision_encoder`: each edge rounded up to a multiple of `tile`."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass(frozen=True)
class Idefics3Processor(VisionProcessor):
    """Idefics3's image processor and prompt expansion (module docstring)."""

    longest_edge: int  # size.longest_edge, capped by max_edge
    tile_size: int  # max_image_size.longest_edge: the side of one tile
    do_image_splitting: bool  # cut large images into tiles plus a global image
    image_seq_len: int  # <image> tokens per tile
    resample: int  # PIL resampling filter
    normalization: Normalization  # rescale and normalise
    image_placeholder: str = IMAGE_TOKEN

    def __post_init__(self) -> None:
        for name in ("longest_edge", "tile_size", "image_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Idefics3 processor: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> Idefics3Processor:
        pp = files.image_processor_config()
        vision = SiglipVisionConfig.from_hf_dict(config.get("vision_config"), VISION_DEFAULTS)
        scale = int(config.get("scale_factor", 2))
        default_seq_len = int(vision.patches_per_side**2 / scale**2)
        longest = int((pp.get("size") or {}).get("longest_edge", 4 * 364))
        if max_edge is not None:
            longest = min(longest, max_edge)
        return cls(longest_edge=longest,
                   tile_size=int((pp.get("max_image_size") or {}).get("longest_edge", 364)),
                   do_image_splitting=bool(pp.get("do_image_splitting", True)),
                   image_seq_len=int(files.processor_config.get("image_seq_len", default_seq_len)),
                   resample=int(pp.get("resample", LANCZOS)),
                   normalization=Normalization.from_preprocessor(pp))

    def tiles(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        """(tiles in prompt order, rows, cols); rows = cols = 0 for an image that is one tile."""
        image = image.convert("RGB")
        height, width = _rescale_to_max_len(image.height, image.width, self.longest_edge)
        image = resize(image, height, width, self.resample)
        tile = self.tile_size
        if not self.do_image_splitting:
            return [resize(image, tile, tile, self.resample)], 0, 0
        image = resize(image, *_tile_multiple(image.height, image.width, tile), self.resample)
        if image.height <= tile and image.width <= tile:
            return [image], 0, 0
        rows = (image.height - tile) // tile + 1
        cols = (image.width - tile) // tile + 1
        crops = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                 for r in range(rows) for c in range(cols)]
        return crops + [resize(image, tile, tile, self.resample)], rows, cols

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        tiles, rows, cols = [], [], []
        for image in images:
            image_tiles, r, c = self.tiles(image)
            tiles += [self.normalization(t) for t in image_tiles]
            rows.append(r)
            cols.append(c)
        tensors = pad_batch(tiles)
        tensors["rows"] = torch.tensor(rows, dtype=torch.int64)
        tensors["cols"] = torch.tensor(cols, dtype=torch.int64)
        return ImageInputs(tensors, [self.image_seq_len * (r * c + 1) for r, c in zip(rows, cols)],
                           image_digest(images))

    def expansion(self, rows: int, cols: int) -> str:
        """The prompt text of one image split into `rows x cols` tiles (0 x 0: a single tile)."""
        run = IMAGE_TOKEN * self.image_seq_len
        global_image = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{run}{FAKE_TOKEN}"
        if rows == 0 and cols == 0:
            return global_image
        grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return f"{grid}\n{global_image}"

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        rows, cols = inputs.tensors["rows"].tolist(), inputs.tensors["cols"].tolist()
        return replace_placeholders(prompt, self.image_placeholder, [self.expansion(r, c) for r, c in zip(rows, cols)])


def patch_mask_of(pixel_attention_mask: torch.Tensor, patch: int, full_patches_only: bool) -> torch.Tensor:
    """`[n, H, W]` pixel mask -> `[n, H/patch, W/patch]` bool patch mask: a patch counts when any of its pixels
    is real (Idefics3) or all of them are (`full_patches_only`, Idefics2)."""
    counts = pixel_attention_mask.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2))
    return counts == patch * patch if full_patches_only else counts > 0


class Idefics3ForConditionalGeneration(VisionCausalLM):
    """Idefics3: `vision_model` (SigLIP, bucketed positions) -> `connector` (pixel shuffle + projection) ->
    `<image>` rows of a Llama `language_model`."""

    # the published (and transformers 5) layout -> our module tree
    WEIGHT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.text_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_model.", "vision_model."),
        ("model.connector.", "connector."),
    )
    VISION_DEFAULTS: ClassVar[dict[str, Any]] = VISION_DEFAULTS
    TEXT_DEFAULTS: ClassVar[dict[str, Any]] = TEXT_DEFAULTS
    DEFAULT_IMAGE_TOKEN_ID: ClassVar[int] = 128257  # transformers' Idefics3Config default
    TEXT_MODEL: ClassVar[type] = LlamaForCausalLM

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        vision = SiglipVisionConfig.from_hf_dict(config.get("vision_config"), self.VISION_DEFAULTS)
        text = TextModelConfig.from_hf_dict(self.text_config_dict(config))
        self.image_token_id = int(config.get("image_token_id", self.DEFAULT_IMAGE_TOKEN_ID))
        self.vision_model = SiglipVisionTransformer(vision, bucketed_positions=True, dtype=dtype, device=device)
        self.build_connector(config, vision, text, dtype=dtype, device=device)
        self.language_model = self.TEXT_MODEL(text, dtype=dtype, device=device)
        self.config = text
        self.dtype = dtype

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The text decoder's config dict: `text_config` over the family's defaults; the LM head is tied by the
        top-level `tie_word_embeddings` (default false), as transformers ties it."""
        return {**text_config_of(config, cls.TEXT_DEFAULTS), "architectures": [hf_architecture_of(cls.TEXT_MODEL)],
                "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}

    def build_connector(self, config: dict[str, Any], vision: SiglipVisionConfig, text: TextModelConfig, *,
                        dtype: torch.dtype, device: torch.device | str) -> None:
        """Sets `self.connector` (the family's: pixel shuffle + projection)."""
        scale = int(config.get("scale_factor", 2))
        if scale <= 0 or vision.patches_per_side % scale:
            raise ValueError(f"config field 'scale_factor' ({scale}) must divide the patch grid side "
                             f"({vision.patches_per_side})")
        self.connector = Idefics3Connector(vision.hidden_size, text.hidden_size, scale, dtype=dtype, device=device)

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.vision_model.post_layernorm.weight.device
        pixels = inputs.tensors["pixel_values"].to(device)
        pixel_mask = inputs.tensors["pixel_attention_mask"].to(device)
        patch_mask = patch_mask_of(pixel_mask, self.vision_model.config.patch_size, full_patches_only=False)
        features = self.connector(self.vision_model(pixels, patch_mask))
        return features.reshape(-1, features.shape[-1])


register_vision("Idefics3", ("Idefics3ForConditionalGeneration",), Idefics3ForConditionalGeneration,
                Idefics3Processor)
