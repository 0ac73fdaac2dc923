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
from mistralrs.layers.norm import RMSNorm
from mistralrs.models.base import CausalLM
from mistralrs.vision.base import (
    TEXT_ARCHITECTURES, ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor, build_text_model,
)
from mistralrs.vision.images import image_digest
from mistralrs.vision.llava import CLIP_MEAN, CLIP_STD, TEXT_DEFAULTS, rescale_normalize
from mistralrs.vision.pixtral import PixtralVisionConfig, PixtralVisionModel
from mistralrs.vision.registry import register_vision

class Mistral3PatchMerger(nn.Module):
    """Concatenates each `merge x merge` block of an image's patch grid (channel-major, as `F.unfold` orders it)
    and projects it back to the tower width: `[patches, d] -> [patches / merge**2, d]` per image."""

    def __init__(self, hidden_size: int, merge: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden_size * merge * merge, hidden_size, bias=False, dtype=dtype,
                                       device=device)

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
    `multi_modal_projector.`; plain torch modules, never quantized in situ)."""

    def __init__(self, vision_hidden: int, text_hidden: int, *, merge: int, norm_eps: float, act: str, bias: bool,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.norm = RMSNorm(vision_hidden, norm_eps, dtype=dtype, device=device)
        self.patch_merger = Mistral3PatchMerger(vision_hidden, merge, dtype=dtype, device=device)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias, dtype=dtype, device=device)
        self.act_fn = get_act_fn(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias, dtype=dtype, device=device)

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
    """One image as transformers' Pil processors make it: RGB, resized by PIL, rescaled and normalized as LLaVA's
    (`rescale_normalize`). Returns `[3, height, width]` float32."""
    if options.do_convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    height, width = options.output_size(image.height, image.width)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=options.resample)
    array = np.asarray(image)
    array = np.moveaxis(array[:, :, None] if array.ndim == 2 else array, -1, 0)
    values = rescale_normalize(array, options.rescale_factor if options.do_rescale else 1.0,
                               options.image_mean if options.do_normalize else None,
                               options.image_std if options.do_normalize else None)
    return torch.from_numpy(np.ascontiguousarray(values))


def pixtral_options_from_files(image: dict[str, Any], processor: dict[str, Any],
                               max_edge: int | None) -> PixtralImageOptions:
    """The options from the image processor's parameters (`ProcessorFiles.image_processor_config()`) and
    processor_config.json, with `max_edge` capping the longest edge."""
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


class PixtralProcessor(VisionProcessor):
    """Mistral 3's processor: Pixtral image preprocessing (longest-edge resize to multiples of patch x merge,
    zero padding to the batch's largest image) and the `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` grid per image."""

    def __init__(self, options: PixtralImageOptions, *, image_token: str = "[IMG]",
                 image_break_token: str = "[IMG_BREAK]", image_end_token: str = "[IMG_END]"):
        self.options = options
        self.image_placeholder = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> PixtralProcessor:
        processor = files.processor_config
        if "spatial_merge_size" not in processor and "spatial_merge_size" in config:
            processor = {**processor, "spatial_merge_size": config["spatial_merge_size"]}
        options = pixtral_options_from_files(files.image_processor_config(), processor, max_edge)
        return cls(options, image_token=processor.get("image_token", "[IMG]"),
                   image_break_token=processor.get("image_break_token", "[IMG_BREAK]"),
                   image_end_token=processor.get("image_end_token", "[IMG_END]"))

    def preprocess(self, images: list[PIL.Image.Image]) -> ImageInputs:
        pixel_values, image_sizes = pad_and_stack([image_to_tensor(image, self.options) for image in images])
        patch = self.options.patch_size
        counts = [int(h) // patch * (int(w) // patch) for h, w in image_sizes.tolist()]
        return ImageInputs({"pixel_values": pixel_values, "image_sizes": image_sizes}, counts, image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        pieces = prompt.split(self.image_placeholder)
        if len(pieces) - 1 != inputs.num_images:
            raise ValueError(f"the prompt holds {len(pieces) - 1} image placeholders {self.image_placeholder!r} "
                             f"for {inputs.num_images} images")
        patch = self.options.patch_size
        grids = [image_grid_text(int(h) // patch, int(w) // patch, self.image_placeholder, self.image_break_token,
                                 self.image_end_token) for h, w in inputs.tensors["image_sizes"].tolist()]
        return pieces[0] + "".join(grid + piece for grid, piece in zip(grids, pieces[1:]))


@dataclass(frozen=True)
class Mistral3Config:
    """The multimodal part of a `Mistral3ForConditionalGeneration` config.json (the decoder's is `text_config_of`)."""

    vision: PixtralVisionConfig  # the Pixtral tower (vision_config)
    image_token_id: int  # `[IMG]`, whose embedding rows take the image features
    spatial_merge_size: int  # patches merged per side by the projector
    feature_layers: tuple[int, ...]  # tower hidden states fed to the projector (vision_feature_layer)
    projector_act: str  # projector activation, HF name
    projector_bias: bool  # whether the projector's linear layers have biases

    def __post_init__(self) -> None:
        merge = self.spatial_merge_size
        if isinstance(merge, bool) or not isinstance(merge, int) or merge <= 0:
            raise ValueError(f"config field 'spatial_merge_size' must be a positive integer, got {merge!r}")
        get_act_fn(self.projector_act)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Mistral3Config:
        """Reads config.json; ValueError naming an invalid field."""
        layers = d.get("vision_feature_layer", -1)
        return cls(vision=PixtralVisionConfig.from_hf_dict(d.get("vision_config") or MISTRAL3_VISION_DEFAULTS),
                   image_token_id=int(d.get("image_token_index", d.get("image_token_id", 10))),
                   spatial_merge_size=d.get("spatial_merge_size", 2),
                   feature_layers=tuple(layers) if isinstance(layers, list) else (layers,),
                   projector_act=d.get("projector_hidden_act", "gelu"),
                   projector_bias=bool(d.get("multimodal_projector_bias", False)))


# Mistral3Config's sub-configs when config.json has none (transformers' `sub_configs_defaults`).
MISTRAL3_TEXT_DEFAULTS = dict(model_type="mistral", head_dim=128, hidden_act="silu", hidden_size=5120,
                              intermediate_size=32768, max_position_embeddings=131072, num_attention_heads=32,
                              num_hidden_layers=40, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e9,
                              sliding_window=None, vocab_size=131072)
MISTRAL3_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, num_hidden_layers=24,
                                num_attention_heads=16, hidden_act="gelu")


def text_config_of(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config dict of a Mistral 3 config.json: `text_config` over its config class's defaults, with
    `architectures` from its model_type and `tie_word_embeddings` as the checkpoint ties (the top-level key when
    present, as transformers 5 reads it, else text_config's own)."""
    given = d.get("text_config")
    text = dict(MISTRAL3_TEXT_DEFAULTS if given is None else given)
    model_type = text.setdefault("model_type", "mistral")
    if model_type not in TEXT_ARCHITECTURES:
        raise ValueError(f"text_config model_type {model_type!r} is not supported; supported: "
                         f"{sorted(TEXT_ARCHITECTURES)}")
    text = {**TEXT_DEFAULTS.get(model_type, {}), **text}
    text.setdefault("architectures", [TEXT_ARCHITECTURES[model_type]])
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return text


class Mistral3ForConditionalGeneration(VisionCausalLM):
    """Pixtral tower -> Mistral 3 projector -> features at the `[IMG]` rows of a Mistral decoder from `models/`."""

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.mm_config = Mistral3Config.from_hf_dict(config)
        self.language_model: CausalLM = build_text_model(text_config_of(config), {}, dtype=dtype, device=device)
        self.config = self.language_model.config
        self.dtype = dtype
        self.image_token_id = self.mm_config.image_token_id
        self.vision_tower = PixtralVisionModel(self.mm_config.vision, dtype=dtype, device=device)
        width = self.mm_config.vision.hidden_size * len(self.mm_config.feature_layers)
        self.multi_modal_projector = Mistral3MultiModalProjector(
            width, self.config.hidden_size, merge=self.mm_config.spatial_merge_size, norm_eps=self.config.rms_norm_eps,
            act=self.mm_config.projector_act, bias=self.mm_config.projector_bias, dtype=dtype, device=device)

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        return text_config_of(config)

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.multi_modal_projector.linear_1.weight.device
        pixel_values = inputs.tensors["pixel_values"].to(device)
        grids = self.vision_tower.patch_grids(inputs.tensors["image_sizes"])
        features = self.vision_tower(pixel_values, inputs.tensors["image_sizes"], self.mm_config.feature_layers)
        return self.multi_modal_projector(features, grids)


register_vision("Mistral3", ("Mistral3ForConditionalGeneration",), Mistral3ForConditionalGeneration,
                PixtralProcessor)
