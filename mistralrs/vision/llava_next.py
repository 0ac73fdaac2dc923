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

import torch


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

