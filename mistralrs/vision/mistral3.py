"""Mistral 3 (Mistral-Small-3.1): the Pixtral encoder, a projector that merges each 2x2 block of patches, and the
Mistral text decoder from `models/`; plus its processor (Pixtral's image processor and `[IMG]` grid expansion).

An image of `rows x cols` merged patches becomes `rows` lines of `[IMG]` x `cols`, each line closed by
`[IMG_BREAK]`, the last by `[IMG_END]` instead; only the `[IMG]` rows take image features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.linear import Linear
from mistralrs.layers.norm import RMSNorm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Pixtral's default normalization (OpenAI CLIP's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Mistral3PatchMerger(nn.Module):
    """Concatenates each `merge x merge` block of an image's patch grid (channel-major, as `F.unfold` orders it)
    and projects it back to the tower width: `[patches, d] -> [patches / merge**2, d]` per image."""

    def __init__(self, hidden_size: int, merge: int, *, prefix: str, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.merge = merge
        self.merging_layer = Linear(hidden_size * merge * merge, hidden_size, bias=False, dtype=dtype, device=device,
                                    prefix=f"{prefix}.merging_layer")

    def forward(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        width = features.shape[-1]
        merged = []
        for tokens, (rows, cols) in zip(features.split([r * c for r, c in grids]), grids):
            grid = tokens.view(rows, cols, width).permute(2, 0, 1).unsqueeze(0)
            blocks = F.unfold(grid, kernel_size=self.merge, stride=self.merge)
            merged.append(blocks.view(width * self.merge**2, -1).t())
        return self.merging_layer(torch.cat(merged))


class Mistral3MultiModalProjector(nn.Module):
    """RMSNorm, patch merger, then `linear_2(act(linear_1(x)))` into the text width (checkpoint prefix
    `multi_modal_projector.`)."""

    def __init__(self, vision_hidden: int, text_hidden: int, *, merge: int, norm_eps: float, act: str, bias: bool,
                 num_feature_layers: int, prefix: str, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.norm = RMSNorm(vision_hidden * num_feature_layers, norm_eps, dtype=dtype, device=device)
        self.patch_merger = Mistral3PatchMerger(vision_hidden * num_feature_layers, merge,
                                                prefix=f"{prefix}.patch_merger", dtype=dtype, device=device)
        self.linear_1 = Linear(vision_hidden * num_feature_layers, text_hidden, bias=bias, dtype=dtype,
                               device=device, prefix=f"{prefix}.linear_1")
        self.act_fn = get_act_fn(act)
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias, dtype=dtype, device=device,
                               prefix=f"{prefix}.linear_2")

    def forward(self, features: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        merged = self.patch_merger(self.norm(features), grids)
        return self.linear_2(self.act_fn(self.linear_1(merged)))


@dataclass(frozen=True)
class PixtralImageOptions:
    """Pixtral's image preprocessing, read from `preprocessor_config.json` / `processor_config.json`."""

    patch_size: int  # the tower's patch edge times spatial_merge_size: output sizes are multiples of it
    longest_edge: int  # images are shrunk (aspect kept, floored) so that neither edge exceeds it
    do_resize: bool = True  # resize at all (to multiples of patch_size; may enlarge a little)
    resample: int = PIL.Image.Resampling.BICUBIC  # PIL filter of the resize
    do_rescale: bool = True  # multiply the 0..255 pixels by rescale_factor
    rescale_factor: float = 1 / 255  # usually 1/255
    do_normalize: bool = True  # subtract image_mean and divide by image_std per channel
    image_mean: tuple[float, ...] = CLIP_MEAN  # per-channel mean
    image_std: tuple[float, ...] = CLIP_STD  # per-channel std
    do_convert_rgb: bool = True  # convert to RGB first (grayscale, palette and RGBA inputs)

    def __post_init__(self) -> None:
        for name in ("patch_size", "longest_edge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Pixtral image option {name!r} must be a positive integer, got {value!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"Pixtral image_mean/image_std must hold 3 values (std > 0), got "
                             f"{self.image_mean!r} / {self.image_std!r}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: shrunk to fit `longest_edge`, then rounded up to multiples of
        `patch_size`; the input size unchanged without `do_resize`."""
        if not self.do_resize:
            return height, width
        ratio = max(height / self.longest_edge, width / self.longest_edge)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        patch = self.patch_size
        return ((height - 1) // patch + 1) * patch, ((width - 1) // patch + 1) * patch


def image_to_tensor(image: PIL.Image.Image, options: PixtralImageOptions) -> torch.Tensor:
    """One image as transformers' Pil processors make it: RGB, resized by PIL, rescaled in float64 then cast to
    float32, normalized per channel. Returns `[3, height, width]` float32."""
    if options.do_convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    height, width = options.output_size(image.height, image.width)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=options.resample)
    array = np.array(image)
    pixels = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)
    values = pixels.to(torch.float64) * options.rescale_factor if options.do_rescale else pixels.to(torch.float64)
    values = values.to(torch.float32)
    if options.do_normalize:
        mean = torch.tensor(options.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(options.image_std, dtype=torch.float32)[:, None, None]
        values = (values - mean) / std
    return values


def pixtral_options_from_files(preprocessor: dict[str, Any], processor: dict[str, Any],
                               max_edge: int | None) -> PixtralImageOptions:
    """The options from the two processor files (either may hold the image processor's keys, or nest them under
    `image_processor`), with `max_edge` capping the longest edge."""
    image = {**preprocessor.get("image_processor", {}), **preprocessor, **processor.get("image_processor", {})}
    patch = processor.get("patch_size", _size_value(image.get("patch_size", 16), "height"))
    merge = int(processor.get("spatial_merge_size", 1))
    longest = int(_size_value(image.get("size", {"longest_edge": 1024}), "longest_edge"))
    if max_edge is not None:
        longest = min(longest, int(max_edge))
    return PixtralImageOptions(
        patch_size=int(patch) * merge, longest_edge=longest, do_resize=bool(image.get("do_resize", True)),
        resample=int(image.get("resample", PIL.Image.Resampling.BICUBIC)),
        do_rescale=bool(image.get("do_rescale", True)), rescale_factor=float(image.get("rescale_factor", 1 / 255)),
        do_normalize=bool(image.get("do_normalize", True)),
        image_mean=tuple(image.get("image_mean") or CLIP_MEAN), image_std=tuple(image.get("image_std") or CLIP_STD),
        do_convert_rgb=bool(image.get("do_convert_rgb", True)))


def _size_value(size: int | dict[str, int], key: str) -> int:
    """`size[key]` of a transformers size dict, or the plain int it may be."""
    if isinstance(size, dict):
        if key not in size:
            raise ValueError(f"processor size {size!r} has no {key!r}")
        return size[key]
    return size


def pad_and_stack(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_values` `[n, 3, max_h, max_w]` (zeros after each image, bottom and right) and `image_sizes` `[n, 2]`."""
    sizes = torch.tensor([list(image.shape[-2:]) for image in images], dtype=torch.int64)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    batch = torch.zeros(len(images), images[0].shape[0], height, width, dtype=images[0].dtype)
    for slot, image in zip(batch, images):
        slot[:, : image.shape[1], : image.shape[2]] = image
    return batch, sizes


def image_grid_text(rows: int, cols: int, image: str, line_break: str, end: str) -> str:
    """The prompt text of one image: `rows` lines of `image` x `cols` ended by `line_break`, the last by `end`."""
    line = image * cols
    return (line + line_break) * (rows - 1) + line + end
