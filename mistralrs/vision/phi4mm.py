"""Phi-4-multimodal (`Phi4MMForCausalLM`, transformers' `Phi4MultimodalForCausalLM`), the vision part: dynamic-HD
crops, a SigLIP tower with bucketed positions, 2x2 average pooling, `sub_GN`/`glb_GN` separators, a two-layer
projector, and the Phi-3 decoder from `models/phi3.py`. Audio is not supported (as the reference at 0.5.0).

Processor (transformers' `Phi4MultimodalImageProcessor`, which needs torchvision, written here with Pillow and
torch): the crop grid is `ceil(w / crop) x ceil(h / crop)` when it holds at most `dynamic_hd` crops, else the grid
of at most `dynamic_hd` crops whose aspect ratio is closest to the image's (ties: the larger grid when the image's
area exceeds half of it); the image is resized (bilinear) to fit the grid keeping its aspect ratio, padded in white
on the right or bottom, rescaled and normalized (mean and std 0.5), and cut into `crop`-pixel crops in row-major
order behind a global image (the normalized HD image resized bicubic, no antialias, to `crop` x `crop`). A patch
mask marks the padding patches (`floor(padding / patch)` last columns or rows); the crops of a request are padded
with zero crops (mask ones) to the longest. `<|image_N|>` (numbered from 1, in order) becomes `<|endoftext10|>`
(id 200010 published) repeated `m^2 + m + 1 + u_h * u_w + u_h` times, `m` the pooled grid of one crop and
`u_h x u_w` the useful (unpadded) grid of the sub-images pooled crop by crop.

Model: the tower's `hidden_states[feature_layer]` (-2) per crop, under the crop's patch mask; pooled 2x2 (a
reflection pad first when the patch grid is odd); the global crop's `m x m` map with `sub_GN` after each row; the
sub-images tiled into one map cut to the useful grid, `sub_GN` after each row; the output is sub-images, `glb_GN`,
global; then `img_projection` (Linear, GELU, Linear).

Weights: the published layout (`model.embed_tokens_extend.image_embed.{img_processor, glb_GN, sub_GN,
img_projection.0/.2}`) and transformers' (`global_img_feature_extensor`, `sub_img_feature_extensor`,
`img_projection_up/_down`) map onto this module tree. The published decoder carries LoRA adapters
(`*.base_layer.weight`, `*.lora_A.vision.weight`, `*.lora_B.vision.weight`, and `speech` ones): the vision adapter
is merged into the base weight at load (`W + B @ A * lora_alpha / r`, `vision_lora` in config.json), the speech
adapter, the audio encoder and the tower's unused pooling head are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor, build_text_model
from mistralrs.vision.images import image_digest
from mistralrs.vision.phi3v import count_numbered_placeholders, expand_numbered_placeholders
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import SiglipVisionConfig, SiglipVisionTransformer

IMAGE_TOKEN = "<|endoftext10|>"  # the token each image feature row takes in the expanded prompt
DEFAULT_IMAGE_TOKEN_ID = 200010
# the published tower (SigLIP so400m at 448 px; the published config.json does not describe it)
SIGLIP_SO400M_448 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=448, patch_size=14)
# the keys of a Phi4MM config.json that are not the text decoder's
_NON_TEXT_KEYS = ("vision_config", "audio_config", "embd_layer", "img_processor", "audio_processor", "vision_lora",
                  "speech_lora", "architectures", "model_type", "auto_map")
# checkpoint names (after the renames) that this model does not use
_SKIPPED = re.compile(r"^(model\.embed_tokens_extend\.audio_embed\.|image_embed\.img_processor\.head\.|"
                      r".*\.lora_[AB]\.speech\.)")
_LORA = re.compile(r"^(.*)\.(base_layer|lora_A\.vision|lora_B\.vision)\.weight$")


def hd_grid(width: int, height: int, crop: int, max_crops: int) -> tuple[int, int]:
    """The dynamic-HD grid (crops across, crops down) of a `width` x `height` image."""
    cols, rows = math.ceil(width / crop), math.ceil(height / crop)
    if cols * rows <= max_crops:
        return cols, rows
    ratio = width / height
    grids = sorted({(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops},
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(ratio - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * crop * crop * grid[0] * grid[1]:
            best = grid
    return best


def hd_geometry(width: int, height: int, crop: int, max_crops: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (padding right, bottom)) of an image in its dynamic-HD grid."""
    cols, rows = hd_grid(width, height, crop, max_crops)
    target_w, target_h = crop * cols, crop * rows
    if target_w / width < target_h / height:
        new_size = (target_w, int(height * target_w / width))
    else:
        new_size = (int(width * target_h / height), target_h)
    if min(new_size) < 10:
        raise ValueError(f"an image of {width}x{height} pixels is too elongated for Phi4MM's dynamic-HD crops "
                         f"(resized to {new_size[0]}x{new_size[1]})")
    return new_size, (target_w - new_size[0], target_h - new_size[1])


def patch_mask(cols: int, rows: int, padding: tuple[int, int], crop: int, patch: int) -> torch.Tensor:
    """`[rows * crop/patch, cols * crop/patch]` ones with zeros over the whole padding patches."""
    side = crop // patch
    mask = torch.ones(rows * side, cols * side)
    pad_w, pad_h = padding[0] // patch, padding[1] // patch
    if pad_w:
        mask[:, -pad_w:] = 0
    if pad_h:
        mask[-pad_h:, :] = 0
    return mask


class Phi4MMProcessor(VisionProcessor):
    """Phi4MM's dynamic-HD image processor and `<|image_N|>` expansion (see the module docstring)."""

    image_placeholder = "<|image_1|>"

    def __init__(self, crop: int, patch: int, max_crops: int, mean: tuple[float, ...], std: tuple[float, ...]):
        if max_crops < 1:
            raise ValueError(f"dynamic_hd must be a positive integer, got {max_crops!r}")
        if crop % patch:
            raise ValueError(f"Phi4MM: crop size {crop} must be a multiple of the patch size {patch}")
        self.crop = crop  # side of one crop and of the global image (448)
        self.patch = patch  # the tower's patch size (14)
        self.max_crops = max_crops  # most sub-images per image (`dynamic_hd`, 36)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> Phi4MMProcessor:
        tower, crop, _, _ = vision_settings(config)
        params = files.image_processor_config()
        return cls(crop, tower.patch_size, int(params.get("dynamic_hd", 36)),
                   tuple(params.get("image_mean", (0.5, 0.5, 0.5))), tuple(params.get("image_std", (0.5, 0.5, 0.5))))

    @property
    def pooled(self) -> int:
        """Tokens per crop edge after the 2x2 pooling."""
        return math.ceil(self.crop // self.patch / 2)

    def crops(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
        """`[1 + crops, 3, c, c]` pixels (global first), `[1 + crops, c/p, c/p]` patch masks, the HD size (h, w)
        and the image's token count."""
        image = image.convert("RGB")
        cols, rows = hd_grid(image.width, image.height, self.crop, self.max_crops)
        new_size, padding = hd_geometry(image.width, image.height, self.crop, self.max_crops)
        padded = Image.new("RGB", (cols * self.crop, rows * self.crop), (255, 255, 255))
        padded.paste(image.resize(new_size, Image.Resampling.BILINEAR), (0, 0))
        pixels = torch.from_numpy(np.asarray(padded, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        pixels = (pixels - self.mean) / self.std
        c, side = self.crop, self.crop // self.patch
        global_image = F.interpolate(pixels[None], size=(c, c), mode="bicubic", align_corners=False)
        subs = pixels.reshape(3, rows, c, cols, c).permute(1, 3, 0, 2, 4).reshape(-1, 3, c, c)
        mask = patch_mask(cols, rows, padding, c, self.patch)
        sub_masks = mask.reshape(rows, side, cols, side).transpose(1, 2).reshape(-1, side, side)
        pooled = sub_masks[:, ::2, ::2].reshape(rows, cols, self.pooled, self.pooled)  # per crop, as the model pools
        useful_h, useful_w = int(pooled[:, 0, :, 0].sum()), int(pooled[0, :, 0, :].sum())
        tokens = self.pooled * (self.pooled + 1) + 1 + useful_h * (useful_w + 1)
        return (torch.cat([global_image, subs]), torch.cat([torch.ones(1, side, side), sub_masks]),
                (rows * c, cols * c), tokens)

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        pixels, masks, sizes, tokens = zip(*(self.crops(image) for image in images))
        most = max(p.shape[0] for p in pixels)
        pixel_values = torch.zeros(len(images), most, *pixels[0].shape[1:])
        attention = torch.ones(len(images), most, *masks[0].shape[1:])
        for i, (p, m) in enumerate(zip(pixels, masks)):
            pixel_values[i, :p.shape[0]] = p
            attention[i, :m.shape[0]] = m
        return ImageInputs({"image_pixel_values": pixel_values, "image_sizes": torch.tensor(sizes),
                            "image_attention_mask": attention}, list(tokens), image_digest(images))

    def count_placeholders(self, prompt: str) -> int:
        return count_numbered_placeholders(prompt)

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        return expand_numbered_placeholders(prompt, inputs.num_images,
                                            lambda i: IMAGE_TOKEN * inputs.num_image_tokens[i])


def vision_settings(config: dict[str, Any]) -> tuple[SiglipVisionConfig, int, int, int]:
    """(tower, crop size, feature layer, image token id) of a Phi4MM config.json: transformers' `vision_config`, else
    the published checkpoint's fixed SigLIP so400m with `embd_layer.image_embd_layer.crop_size`."""
    vision = config.get("vision_config")
    if vision:
        tower = SiglipVisionConfig.from_hf_dict(vision, SIGLIP_SO400M_448)
        return (tower, int(vision.get("crop_size", tower.image_size)), int(vision.get("feature_layer", -2)),
                int(vision.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)))
    embd = dict((config.get("embd_layer") or {}).get("image_embd_layer") or {})
    expected = dict(hd_transform_order="sub_glb", image_token_compression_cls="avg_pool_2d", projection_cls="mlp")
    for key, value in expected.items():
        if embd.get(key, value) != value:
            raise ValueError(f"Phi4MM embd_layer.image_embd_layer.{key}={embd[key]!r}; only {value!r} is supported")
    layer = int((config.get("img_processor") or {}).get("layer_idx", -2))
    return SiglipVisionConfig(**SIGLIP_SO400M_448), int(embd.get("crop_size", 448)), layer, DEFAULT_IMAGE_TOKEN_ID


class Phi4MMImageEmbedding(nn.Module):
    """`model.embed_tokens_extend.image_embed`: the SigLIP tower (`img_processor`), separators, `img_projection`."""

    def __init__(self, tower: SiglipVisionConfig, crop: int, feature_layer: int, text_hidden: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        if not -tower.num_hidden_layers - 1 <= feature_layer <= tower.num_hidden_layers:
            raise ValueError(f"Phi4MM feature_layer={feature_layer} is outside the tower's {tower.num_hidden_layers}"
                             " layers")
        self.crop = crop
        self.layers_used = feature_layer % (tower.num_hidden_layers + 1)  # encoder layers before the features
        width = tower.hidden_size
        self.img_processor = SiglipVisionTransformer(tower, bucketed_positions=True, dtype=dtype, device=device)
        self.glb_GN = nn.Parameter(torch.empty(1, 1, width, dtype=dtype, device=device))  # noqa: N815
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, width, dtype=dtype, device=device))  # noqa: N815
        self.img_projection = nn.Sequential(nn.Linear(width, text_hidden, dtype=dtype, device=device), nn.GELU(),
                                            nn.Linear(text_hidden, text_hidden, dtype=dtype, device=device))

    def crop_features(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """`[N, 3, c, c]` crops under `[N, c/p, c/p]` patch masks -> pooled `[N, m, m, width]` features."""
        tower = self.img_processor
        hidden = tower.embeddings(crops, masks)
        key_mask = None if bool(masks.all()) else masks.reshape(masks.shape[0], 1, 1, -1)
        for layer in tower.encoder.layers[:self.layers_used]:
            hidden = layer(hidden, key_mask)
        side = masks.shape[-1]
        grid = hidden.reshape(crops.shape[0], side, side, -1).permute(0, 3, 1, 2)
        if side % 2:
            grid = F.pad(grid, (0, 1, 0, 1), mode="reflect")
        return F.avg_pool2d(grid, 2).permute(0, 2, 3, 1)

    def layout(self, pooled: torch.Tensor, mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's `[1 + rows*cols, m, m, C]` pooled crops (global first) and `[rows*cols, c/p, c/p]` sub-image
        masks -> its `[tokens, C]` sequence."""
        m, width = pooled.shape[1], pooled.shape[-1]
        newline = self.sub_GN.reshape(1, 1, width)
        glb = torch.cat([pooled[0], newline.expand(m, 1, width)], dim=1).reshape(-1, width)
        grid = pooled[1:].reshape(rows, cols, m, m, width).transpose(1, 2).reshape(rows * m, cols * m, width)
        useful = mask[:, ::2, ::2].reshape(rows, cols, m, m).transpose(1, 2).reshape(rows * m, cols * m)
        h, w = int(useful[:, 0].sum()), int(useful[0].sum())
        sub = torch.cat([grid[:h, :w], newline.expand(h, 1, width)], dim=1).reshape(-1, width)
        return torch.cat([sub, self.glb_GN.reshape(1, width), glb])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """`[images, K, 3, c, c]` crops, `[images, 2]` HD sizes and `[images, K, c/p, c/p]` patch masks ->
        `[image tokens, text_hidden]`."""
        grids = [(int(h) // self.crop, int(w) // self.crop) for h, w in image_sizes.tolist()]
        used = torch.cat([pixel_values[i, :1 + h * w] for i, (h, w) in enumerate(grids)])
        masks = torch.cat([attention_mask[i, :1 + h * w] for i, (h, w) in enumerate(grids)]).bool()
        pooled = self.crop_features(used, masks)
        sequences, start = [], 0
        for i, (h, w) in enumerate(grids):
            sequences.append(self.layout(pooled[start:start + 1 + h * w], attention_mask[i, 1:1 + h * w], h, w))
            start += 1 + h * w
        return self.img_projection(torch.cat(sequences))


class Phi4MMForCausalLM(VisionCausalLM):
    """Phi-4-multimodal (vision) over packed tokens: `encode_images` runs `image_embed`; the decoder is the Phi-3
    `Phi3ForCausalLM` fed with the spliced embeddings (see the module docstring for the weight layouts)."""

    _IMAGE = "model.embed_tokens_extend.image_embed."
    WEIGHT_RENAMES = ((_IMAGE + "global_img_feature_extensor", "image_embed.glb_GN"),
                      (_IMAGE + "sub_img_feature_extensor", "image_embed.sub_GN"),
                      (_IMAGE + "img_projection_up.", "image_embed.img_projection.0."),
                      (_IMAGE + "img_projection_down.", "image_embed.img_projection.2."),
                      (_IMAGE, "image_embed."),
                      ("model.layers.", "language_model.model.layers."),
                      ("model.embed_tokens.", "language_model.model.embed_tokens."),
                      ("model.norm.", "language_model.model.norm."),
                      ("lm_head.", "language_model.lm_head."))

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        tower, crop, feature_layer, image_token_id = vision_settings(config)
        text_config = {k: v for k, v in config.items() if k not in _NON_TEXT_KEYS}
        text_config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
        self.language_model = build_text_model(text_config, {}, dtype=dtype, device=device)
        self.config = self.language_model.config
        self.dtype = dtype
        self.image_embed = Phi4MMImageEmbedding(tower, crop, feature_layer, self.config.hidden_size, dtype=dtype,
                                                device=device)
        self.image_token_id = image_token_id
        lora = dict(config.get("vision_lora") or {})
        self.lora_scale = float(lora.get("lora_alpha", 1)) / float(lora.get("r", 1))  # vision adapter's alpha / r

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.image_embed.glb_GN.device
        pixels = inputs.tensors["image_pixel_values"].to(device=device, dtype=self.dtype)
        mask = inputs.tensors["image_attention_mask"].to(device=device)
        return self.image_embed(pixels, inputs.tensors["image_sizes"], mask)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Published or transformers names: skips the audio encoder, speech adapters and pooling head; merges the
        vision LoRA adapters into their base weights; the rest as `VisionCausalLM.load_weights`."""
        skipped, adapters, plain = set(), {}, []
        for name, tensor in weights:
            lora = _LORA.match(name)
            if _SKIPPED.match(name):
                skipped.add(name)
            elif lora:
                adapters.setdefault(lora.group(1), {})[lora.group(2)] = (name, tensor)
            else:
                plain.append((name, tensor))
        merged = {}
        for base, parts in adapters.items():
            if set(parts) != {"base_layer", "lora_A.vision", "lora_B.vision"}:
                raise ValueError(f"Phi4MM LoRA weights of {base}: expected base_layer, lora_A.vision and "
                                 f"lora_B.vision, got {sorted(parts)}")
            weight = parts["base_layer"][1].float()
            delta = parts["lora_B.vision"][1].float() @ parts["lora_A.vision"][1].float()
            merged[base + ".weight"] = [n for n, _ in parts.values()]
            plain.append((base + ".weight", (weight + self.lora_scale * delta).to(parts["base_layer"][1].dtype)))
        consumed = super().load_weights(plain)
        for name, sources in merged.items():
            if name in consumed:
                consumed |= set(sources)
        return consumed | skipped


register_vision("Phi4MM", ("Phi4MMForCausalLM", "Phi4MultimodalForCausalLM"), Phi4MMForCausalLM, Phi4MMProcessor)
