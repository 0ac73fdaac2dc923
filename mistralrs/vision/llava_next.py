"""LLaVA-NeXT (LLaVA 1.6): LLaVA's CLIP tower and projector over "anyres" tiles, and a Llama/Mistral decoder.

Anyres: each image is resized (aspect kept) into the best of `image_grid_pinpoints` (the resolution that keeps the
most of the image and wastes the least), zero-padded to it, cut into tower-sized tiles, and preceded by the whole
image squashed to one tile (the base). The tower and projector run on every tile; the base tile's features come
first, then the tiles' features laid out as one big grid, the padding rows/columns cut away ("unpad"), with the
learned `image_newline` vector after each grid row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mistralrs.vision.base import ImageInputs, ProcessorFiles
from mistralrs.vision.clip import ClipVisionConfig
from mistralrs.vision.images import image_digest
from mistralrs.vision.llava import LLAVA_VISION_DEFAULTS, LlavaForConditionalGeneration, LlavaProcessor
from mistralrs.vision.registry import register_vision

# LlavaNextConfig's and LlavaNextImageProcessor's image_grid_pinpoints when a checkpoint gives none
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the (height, width) of `pinpoints` that keeps the most of an image of
    `size` (height, width) when it is scaled to fit, then wastes the least area."""
    height, width = size
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    if best is None:
        raise ValueError(f"image_grid_pinpoints {list(pinpoints)!r} holds no resolution")
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: (height, width) of an image of `size` scaled to fit `target`, the
    scaled side rounded up (and capped by the target)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpadded_size(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """transformers' `unpad_image` on a feature grid of `grid` (rows, cols) holding an image of `size`: the rows and
    columns left once the padding added around the image (split evenly, the odd one at the end) is cut off."""
    height, width = size
    rows, cols = grid
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_rows) // 2), cols
    new_cols = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_cols) // 2)


def tile_grid(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tower tiles an image of `size` is cut into (the base tile not counted)."""
    best_h, best_w = select_best_resolution(size, pinpoints)
    return math.ceil(best_h / tile), math.ceil(best_w / tile)


def anyres_feature_count(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, patch: int) -> int:
    """Feature rows (image tokens) of an image of `size`: the base tile's patches, then the unpadded grid with one
    newline per row."""
    per_side = tile // patch
    grid_rows, grid_cols = tile_grid(size, pinpoints, tile)
    rows, cols = unpadded_size(size, (grid_rows * per_side, grid_cols * per_side))
    return per_side * per_side + rows * (cols + 1)


def pack_image_features(features: torch.Tensor, size: tuple[int, int], grid: tuple[int, int],
                        newline: torch.Tensor) -> torch.Tensor:
    """One image's rows in prompt order from its per-tile features `[1 + rows * cols, p * p, d]` (base tile first):
    the base's `p * p` rows, then the tiles' grid unpadded, each grid row followed by `newline`."""
    per_side = math.isqrt(features.shape[1])
    grid_rows, grid_cols = grid
    width = features.shape[-1]
    tiles = features[1:].view(grid_rows, grid_cols, per_side, per_side, width)
    full = tiles.permute(0, 2, 1, 3, 4).reshape(grid_rows * per_side, grid_cols * per_side, width)
    rows, cols = unpadded_size(size, (full.shape[0], full.shape[1]))
    top, left = (full.shape[0] - rows) // 2, (full.shape[1] - cols) // 2
    kept = full[top:top + rows, left:left + cols]
    lines = torch.cat([kept, newline.to(kept.dtype).expand(rows, 1, width)], dim=1)
    return torch.cat([features[0], lines.reshape(rows * (cols + 1), width)])


class LlavaNextProcessor(LlavaProcessor):
    """LLaVA-NeXT's image processor (transformers' `LlavaNextImageProcessorPil`) and `<image>` expansion: per image
    the base tile and the anyres tiles, each resized, centre-cropped and normalized as LLaVA's; `pixel_values`
    `[images, most tiles, 3, tile, tile]` (zero tiles after an image's own), `image_sizes` the original (height,
    width). `max_edge` does not apply (the pinpoints fix the resolution)."""

    def __init__(self, params: dict[str, Any], image_token: str, pinpoints: list[list[int]], tile: int, patch: int):
        super().__init__({**params, "do_pad": False}, image_token, (tile // patch) ** 2)
        size = params.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        self.base_size = ((int(size["height"]), int(size["width"])) if "height" in size and "width" in size
                          else (int(size["shortest_edge"]),) * 2)  # the whole image squashed to this first
        self.pinpoints = pinpoints  # candidate (height, width) resolutions
        self.tile = tile  # tower input edge: tiles are tile x tile
        self.patch = patch  # tower patch edge

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any],
                        max_edge: int | None) -> LlavaNextProcessor:
        params = files.image_processor_config()
        vision = ClipVisionConfig.from_hf_dict(config.get("vision_config") or LLAVA_VISION_DEFAULTS)
        pinpoints = config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        if params.get("image_grid_pinpoints") not in (None, pinpoints):
            raise ValueError(f"preprocessor image_grid_pinpoints {params['image_grid_pinpoints']!r} differ from "
                             f"config.json's {pinpoints!r}")
        crop = params.get("crop_size", 224)  # LlavaNextImageProcessor's default, as LLaVA's processor reads it
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        if tuple(crop) != (vision.image_size, vision.image_size):
            raise ValueError(f"preprocessor crop_size {crop!r} must be the vision tower's image_size "
                             f"({vision.image_size}): the anyres tiles are cut at that size")
        image_token = files.processor_config.get("image_token", "<image>")
        return cls(params, image_token, [list(p) for p in pinpoints], vision.image_size, vision.patch_size)

    def _tiles(self, image: Image.Image) -> np.ndarray:
        """`[1 + tiles, 3, tile, tile]` float32: the base tile, then the anyres tiles row-major."""
        rgb = image.convert("RGB")
        best_h, best_w = select_best_resolution((rgb.height, rgb.width), self.pinpoints)
        fit_h, fit_w = fit_size((rgb.height, rgb.width), (best_h, best_w))
        padded = np.zeros((3, best_h, best_w), dtype=np.uint8)
        top, left = (best_h - fit_h) // 2, (best_w - fit_w) // 2
        fitted = rgb.resize((fit_w, fit_h), resample=self.resample)
        padded[:, top:top + fit_h, left:left + fit_w] = np.moveaxis(np.asarray(fitted), -1, 0)
        tiles = [padded[:, i:i + self.tile, j:j + self.tile]
                 for i in range(0, best_h, self.tile) for j in range(0, best_w, self.tile)]
        base = rgb.resize((self.base_size[1], self.base_size[0]), resample=self.resample)
        parts = [base] + [Image.fromarray(np.ascontiguousarray(np.moveaxis(t, 0, -1))) for t in tiles]
        return np.stack([self._pixels(part) for part in parts])

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        per_image = [self._tiles(image) for image in images]
        batch = np.zeros((len(images), max(len(t) for t in per_image), *per_image[0].shape[1:]), dtype=np.float32)
        for slot, tiles in zip(batch, per_image):
            slot[: len(tiles)] = tiles
        sizes = [(image.height, image.width) for image in images]
        counts = [anyres_feature_count(size, self.pinpoints, self.tile, self.patch) for size in sizes]
        return ImageInputs({"pixel_values": torch.from_numpy(batch),
                            "image_sizes": torch.tensor(sizes, dtype=torch.int64)}, counts, image_digest(images))


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT over packed tokens: LLaVA's tower and projector on every tile, the tiles packed with
    `image_newline` (see the module docstring); the decoder is a Llama/Mistral `*ForCausalLM` from `models/`."""

    WEIGHT_RENAMES = LlavaForConditionalGeneration.WEIGHT_RENAMES + (("model.image_newline", "image_newline"),)

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(config, dtype=dtype, device=device)
        if self.select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={self.select_strategy!r}: LLaVA-NeXT packs tiles of "
                             "patch features only, so it must be 'default'")
        self.image_newline = nn.Parameter(torch.zeros(self.config.hidden_size, dtype=dtype, device=device),
                                          requires_grad=False)
        self.pinpoints = [list(p) for p in config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS]
        self.tile = self.vision_tower.vision_model.config.image_size

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        sizes = [tuple(size) for size in inputs.tensors["image_sizes"].tolist()]
        grids = [tile_grid(size, self.pinpoints, self.tile) for size in sizes]
        pixels = inputs.tensors["pixel_values"]
        tiles = torch.cat([image[: 1 + rows * cols] for image, (rows, cols) in zip(pixels, grids)])
        features = self.project_tiles(tiles.to(device=self.image_newline.device, dtype=self.dtype))
        per_image = features.split([1 + rows * cols for rows, cols in grids])
        return torch.cat([pack_image_features(f, size, grid, self.image_newline)
                          for f, size, grid in zip(per_image, sizes, grids)])

    def project_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """`[tiles, patches, text_hidden]`: the tower's selected hidden states without the class token, projected."""
        num_layers = len(self.vision_tower.vision_model.encoder.layers)
        indices = [i % (num_layers + 1) for i in self.feature_layers]
        states = self.vision_tower.hidden_states(tiles, max(indices))
        return self.multi_modal_projector(torch.cat([states[i][:, 1:] for i in indices], dim=-1))


register_vision("LLaVANext", ("LlavaNextForConditionalGeneration",), LlavaNextForConditionalGeneration,
                LlavaNextProcessor)
