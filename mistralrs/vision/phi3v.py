"""Phi-3/3.5-vision (`Phi3VForCausalLM`): a CLIP ViT-L/14 tower with the HD transform, a two-layer projector, and
the Phi-3 decoder from `models/phi3.py`.

Processor (the published `Phi3VImageProcessor`, written here with Pillow and torch): each image is transposed to
landscape, resized (bilinear) so that its width is `scale * crop` for the largest `scale` whose grid
`scale * ceil(scale / ratio)` holds at most `num_crops` crops, padded in white to a multiple of `crop` in height
(centred, the extra row at the bottom), transposed back; then rescaled, normalized with the CLIP constants, and
cut into `crop`-pixel sub-images in row-major order behind a global image (the normalized HD image resized bicubic
to `crop` x `crop`), zero-padded to `num_crops + 1` crops. `<|image_N|>` (numbered from 1, in order) in the
prompt becomes `IMAGE_TOKEN` repeated `(h * w + 1) * m^2 + 1 + (h + 1) * m` times, `h`, `w` the HD grid in crops
and `m` half the tower's patch grid (12 for CLIP-L/336: 144 tokens per crop), then the tokenizer's BOS token when it
adds one (the published processor tokenizes the text after each image as a new sequence).

Model: the tower's `hidden_states[layer_idx]` without the class token; each crop's `g x g` patches merged 2 x 2
into `m x m` tokens of 4 x width (the four neighbours concatenated row-major); the sub-images tiled into one
`h*m x w*m` map; `sub_GN` appended after every row of the global map and of the sub-image map; `glb_GN` between
the two, in `hd_transform_order` ("sub_glb": sub-images first, as the published configs say; or "glb_sub");
then `img_projection` (Linear, GELU, Linear).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor, build_text_model
from mistralrs.vision.clip import ClipVisionConfig, ClipVisionModel
from mistralrs.vision.images import image_digest
from mistralrs.vision.llava import CLIP_MEAN, CLIP_STD
from mistralrs.vision.registry import register_vision

IMAGE_TOKEN = "<|image|>"  # the token each image feature row takes in the expanded prompt (id 32044 published)
DEFAULT_IMAGE_TOKEN_ID = 32044
PLACEHOLDER_PATTERN = re.compile(r"<\|image_(\d+)\|>")


def count_numbered_placeholders(prompt: str) -> int:
    """The `<|image_N|>` placeholders in `prompt` (the Phi families' numbered form)."""
    return len(PLACEHOLDER_PATTERN.findall(prompt))


def expand_numbered_placeholders(prompt: str, num_images: int, expansion: Callable[[int], str]) -> str:
    """`prompt` with each `<|image_N|>` replaced by `expansion(N - 1)`; a ValueError unless the placeholders are
    `<|image_1|>` to `<|image_{num_images}|>` in order, one per image."""
    numbers = [int(n) for n in PLACEHOLDER_PATTERN.findall(prompt)]
    if numbers != list(range(1, num_images + 1)):
        raise ValueError(f"the prompt's image placeholders {['<|image_%d|>' % n for n in numbers]} must be "
                         f"<|image_1|> to <|image_{num_images}|> in order, one per image")
    return PLACEHOLDER_PATTERN.sub(lambda m: expansion(int(m.group(1)) - 1), prompt)


# the published tower: CLIP ViT-L/14 at 336 px (the checkpoint's config names it by model_name only)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# the keys of a Phi3V config.json that are not the text decoder's
_VISION_KEYS = ("img_processor", "embd_layer", "architectures", "model_type", "auto_map")


def hd_sizes(width: int, height: int, num_crops: int, crop: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """The HD transform's geometry for a `width` x `height` image: ((resized width, height), (padded width,
    height), padding before the image on the padded axis)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise ValueError(f"an image of {max(width, height)}x{min(width, height)} pixels (long x short side) is too "
                         f"elongated for the HD transform with num_crops={num_crops}")
    padded_h = math.ceil(new_h / crop) * crop
    before = int((padded_h - new_h) / 2)
    if transposed:
        return (new_h, new_w), (padded_h, new_w), before
    return (new_w, new_h), (new_w, padded_h), before


def hd_transform(image: Image.Image, num_crops: int, crop: int) -> Image.Image:
    """The published HD transform of an RGB image: landscape, bilinear resize, white padding, transposed back."""
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    (new_w, new_h), (pad_w, pad_h), top = hd_sizes(image.width, image.height, num_crops, crop)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded = Image.new("RGB", (pad_w, pad_h), (255, 255, 255))
    padded.paste(resized, (0, top))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def num_image_tokens(height: int, width: int, crop: int, merged: int) -> int:
    """Feature rows of an HD image of `height` x `width` pixels: `(h * w + 1) * m^2 + 1 + (h + 1) * m` with the
    grid `h`, `w` in crops and `m = merged` tokens per crop edge."""
    h, w = height // crop, width // crop
    return (h * w + 1) * merged * merged + 1 + (h + 1) * merged


@dataclass(frozen=True)
class Phi3VVisionConfig:
    """The image side of a Phi3V config.json (`img_processor`, `embd_layer`; validated)."""

    clip: ClipVisionConfig  # the tower (CLIP-L/336 unless `img_processor.vision_config` names a tiny one)
    layer_idx: int = -2  # the tower's hidden_states index the features come from
    hd_transform_order: str = "sub_glb"  # "sub_glb" or "glb_sub": which half comes before `glb_GN`
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID  # the token replaced by image features

    def __post_init__(self) -> None:
        if self.hd_transform_order not in ("sub_glb", "glb_sub"):
            raise ValueError(f"embd_layer.hd_transform_order={self.hd_transform_order!r}; accepted values: "
                             "['glb_sub', 'sub_glb']")
        grid = self.clip.image_size // self.clip.patch_size
        if grid % 2:
            raise ValueError(f"Phi3V: the tower's patch grid ({grid}) must be even for the 2x2 merge")
        if not -self.clip.num_hidden_layers - 1 <= self.layer_idx <= self.clip.num_hidden_layers:
            raise ValueError(f"img_processor.layer_idx={self.layer_idx} is outside the tower's "
                             f"{self.clip.num_hidden_layers} layers")

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> Phi3VVisionConfig:
        """From a Phi3V config.json dict."""
        img = dict(config.get("img_processor") or {})
        embd = dict(config.get("embd_layer") or {})
        if img.get("type_feature", "patch") != "patch":
            raise ValueError(f"img_processor.type_feature={img['type_feature']!r}; only 'patch' is supported")
        if not embd.get("use_hd_transform", True) or embd.get("projection_cls", "mlp") != "mlp":
            raise ValueError("Phi3V: only the HD transform with the 'mlp' projection is supported (embd_layer "
                             f"{embd!r})")
        clip = ClipVisionConfig.from_hf_dict(img.get("vision_config") or CLIP_L_336)
        if int(img.get("image_dim_out", clip.hidden_size)) != clip.hidden_size:
            raise ValueError(f"img_processor.image_dim_out={img['image_dim_out']} differs from the tower's width "
                             f"{clip.hidden_size}")
        return cls(clip, int(img.get("layer_idx", -2)), str(embd.get("hd_transform_order", "sub_glb")),
                   int(config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)))

    @property
    def merged(self) -> int:
        """Tokens per crop edge after the 2x2 merge."""
        return self.clip.image_size // self.clip.patch_size // 2


def _added_bos(tokenizer_config: dict[str, Any]) -> str:
    """The BOS token text when the tokenizer adds one (`add_bos_token`, true by default for Phi-3's Llama
    tokenizer), else "". The published processor tokenizes the text after each image as a new sequence, so that
    text starts with BOS; the expansion writes it."""
    bos = tokenizer_config.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    return bos if isinstance(bos, str) and tokenizer_config.get("add_bos_token", True) else ""


class Phi3VProcessor(VisionProcessor):
    """Phi3V's HD image processor and `<|image_N|>` expansion (see the module docstring)."""

    image_placeholder = "<|image_1|>"

    def __init__(self, num_crops: int, crop: int, merged: int, mean: tuple[float, ...],
                 std: tuple[float, ...], after_image: str = "") -> None:
        if num_crops < 1:
            raise ValueError(f"num_crops must be a positive integer, got {num_crops!r}")
        self.num_crops = num_crops  # most sub-images per image
        self.crop = crop  # the tower's image size (336)
        self.merged = merged  # tokens per crop edge after the 2x2 merge (12)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.after_image = after_image  # text after each image run: the BOS token where the tokenizer adds one

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> Phi3VProcessor:
        vision = Phi3VVisionConfig.from_hf_dict(config)
        params = files.image_processor_config()
        return cls(int(params.get("num_crops", 4)), vision.clip.image_size, vision.merged,
                   tuple(params.get("image_mean", CLIP_MEAN)), tuple(params.get("image_std", CLIP_STD)),
                   _added_bos(files.tokenizer_config))

    def crops(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """`[num_crops + 1, 3, crop, crop]` (global image first, zero padding last) and the HD size (h, w)."""
        hd = hd_transform(image.convert("RGB"), self.num_crops, self.crop)
        pixels = torch.from_numpy(np.asarray(hd, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        pixels = (pixels - self.mean) / self.std
        _, height, width = pixels.shape
        c = self.crop
        global_image = F.interpolate(pixels[None], size=(c, c), mode="bicubic", align_corners=False)
        subs = pixels.reshape(3, height // c, c, width // c, c).permute(1, 3, 0, 2, 4).reshape(-1, 3, c, c)
        out = torch.zeros(self.num_crops + 1, 3, c, c)
        out[:1 + subs.shape[0]] = torch.cat([global_image, subs])
        return out, (height, width)

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        crops, sizes = zip(*(self.crops(image) for image in images))
        tokens = [num_image_tokens(h, w, self.crop, self.merged) for h, w in sizes]
        return ImageInputs({"pixel_values": torch.stack(crops), "image_sizes": torch.tensor(sizes)}, tokens,
                           image_digest(images))

    def count_placeholders(self, prompt: str) -> int:
        return count_numbered_placeholders(prompt)

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        return expand_numbered_placeholders(
            prompt, inputs.num_images, lambda i: IMAGE_TOKEN * inputs.num_image_tokens[i] + self.after_image)


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """`[B, g, g, C]` -> `[B, g/2, g/2, 4C]`: each 2x2 block's four tokens concatenated in row-major order."""
    batch, g, _, width = features.shape
    blocks = features.reshape(batch, g // 2, 2, g // 2, 2, width).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch, g // 2, g // 2, 4 * width)


class Phi3VImageEmbedding(nn.Module):
    """`model.vision_embed_tokens`: the CLIP tower (`img_processor`), the separators and `img_projection`."""

    def __init__(self, vision: Phi3VVisionConfig, text_hidden: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.vision = vision
        width = 4 * vision.clip.hidden_size
        self.img_processor = ClipVisionModel(vision.clip, dtype=dtype, device=device)
        self.glb_GN = nn.Parameter(torch.empty(1, 1, width, dtype=dtype, device=device))  # noqa: N815
        self.sub_GN = nn.Parameter(torch.empty(1, 1, 1, width, dtype=dtype, device=device))  # noqa: N815
        self.img_projection = nn.Sequential(nn.Linear(width, text_hidden, dtype=dtype, device=device), nn.GELU(),
                                            nn.Linear(text_hidden, text_hidden, dtype=dtype, device=device))

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """`[N, 3, c, c]` -> the merged `[N, m, m, 4 * width]` features of each crop."""
        num_layers = self.vision.clip.num_hidden_layers
        index = self.vision.layer_idx % (num_layers + 1)
        patches = self.img_processor.hidden_states(crops, index)[index][:, 1:]
        grid = self.vision.clip.image_size // self.vision.clip.patch_size
        return merge_2x2(patches.reshape(crops.shape[0], grid, grid, -1))

    def layout(self, merged: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One image's `[1 + rows*cols, m, m, 4C]` merged crops (global first) -> its `[tokens, 4C]` sequence."""
        m, width = merged.shape[1], merged.shape[-1]
        newline = self.sub_GN.reshape(1, 1, width)
        glb = torch.cat([merged[0], newline.expand(m, 1, width)], dim=1).reshape(-1, width)
        grid = merged[1:].reshape(rows, cols, m, m, width).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, width)
        sub = torch.cat([grid, newline.expand(rows * m, 1, width)], dim=1).reshape(-1, width)
        first, last = (sub, glb) if self.vision.hd_transform_order == "sub_glb" else (glb, sub)
        return torch.cat([first, self.glb_GN.reshape(1, width), last])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """`[images, K, 3, c, c]` crops and `[images, 2]` HD sizes -> `[image tokens, text_hidden]`."""
        crop = self.vision.clip.image_size
        grids = [(int(h) // crop, int(w) // crop) for h, w in image_sizes.tolist()]
        used = torch.cat([pixel_values[i, :1 + h * w] for i, (h, w) in enumerate(grids)])
        merged = self.crop_features(used)
        sequences, start = [], 0
        for h, w in grids:
            sequences.append(self.layout(merged[start:start + 1 + h * w], h, w))
            start += 1 + h * w
        return self.img_projection(torch.cat(sequences))


class Phi3VForCausalLM(VisionCausalLM):
    """Phi-3-vision over packed tokens: `encode_images` runs `vision_embed_tokens`; the decoder is the Phi-3
    `Phi3ForCausalLM` fed with the spliced embeddings. Checkpoint names are the published ones (`model.*`,
    `lm_head.*`, `model.vision_embed_tokens.*`), mapped onto this module tree by `WEIGHT_RENAMES`."""

    WEIGHT_RENAMES = (("model.vision_embed_tokens.wte.", "language_model.model.embed_tokens."),
                      ("model.vision_embed_tokens.", "vision_embed_tokens."),
                      ("model.", "language_model.model."),
                      ("lm_head.", "language_model.lm_head."))

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        vision = Phi3VVisionConfig.from_hf_dict(config)
        text_config = {k: v for k, v in config.items() if k not in _VISION_KEYS}
        text_config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
        self.language_model = build_text_model(text_config, {}, dtype=dtype, device=device)
        self.config = self.language_model.config
        self.dtype = dtype
        self.vision_embed_tokens = Phi3VImageEmbedding(vision, self.config.hidden_size, dtype=dtype, device=device)
        self.image_token_id = vision.image_token_id

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.vision_embed_tokens.glb_GN.device
        pixels = inputs.tensors["pixel_values"].to(device=device, dtype=self.dtype)
        return self.vision_embed_tokens(pixels, inputs.tensors["image_sizes"])


register_vision("Phi3V", ("Phi3VForCausalLM",), Phi3VForCausalLM, Phi3VProcessor)
