"""LLaVa (1.5): a CLIP ViT tower, a two-layer projector, and a Llama or Mistral decoder from `models/`.

Processor (transformers' `LlavaImageProcessorPil` + `LlavaProcessor`, written here with Pillow and numpy): optional
pad to a square in the mean colour, resize of the shortest edge, centre crop, rescale and normalize; each `<image>`
in the prompt becomes one `<image>` token per feature row (the patches, plus the class token when
`vision_feature_select_strategy` is "full"). The image size is fixed by the tower, so `max_edge` does not apply.
Model: the tower's `hidden_states[vision_feature_layer]` (several layers concatenated when it is a list), the class
token dropped under the "default" strategy, then `linear_2(act(linear_1(x)))`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.vision.base import (
    ProcessorFiles, TRANSFORMERS5_RENAMES, ImageInputs, VisionCausalLM, VisionProcessor, build_text_model,
)
from mistralrs.vision.clip import CLIP_TRANSFORMERS5_RENAMES, ClipVisionConfig, ClipVisionModel
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LlavaConfig's tower when config.json has no vision_config (CLIP ViT-L/14 at 336 px)
LLAVA_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                             num_hidden_layers=24, num_attention_heads=16)
# LlamaConfig's and MistralConfig's values for the keys a published text_config may leave out
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
}
_PROJECTOR_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                   "relu": F.relu, "silu": F.silu}


def _size_dict(value: Any, *, square: bool) -> dict[str, int]:
    """An HF `size`/`crop_size` value as a dict: an int is the shortest edge (or a square when `square`)."""
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"preprocessor size must be an int or a dict, got {value!r}")


def resize_shortest_edge(height: int, width: int, shortest: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes `shortest`,
    the long side `int(shortest * long / short)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` of a `[C, H, W]` array (zero-padded first when the image is smaller)."""
    _, h, w = image.shape
    if h < height or w < width:
        new_h, new_w = max(height, h), max(width, w)
        padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
        top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = image
        image, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top:top + height, left:left + width]


def pad_to_square(image: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """A `[C, H, W]` array centred on a square of side max(H, W) filled with `fill` per channel."""
    channels, h, w = image.shape
    side = max(h, w)
    if h == w:
        return image
    result = np.empty((channels, side, side), dtype=image.dtype)
    result[:] = np.asarray(fill, dtype=image.dtype).reshape(channels, 1, 1)
    if w > h:
        start = (side - h) // 2
        result[:, start:start + h, :] = image
    else:
        start = (side - w) // 2
        result[:, :, start:start + w] = image
    return result


def rescale_normalize(image: np.ndarray, scale: float, mean: tuple[float, ...] | None,
                      std: tuple[float, ...] | None) -> np.ndarray:
    """transformers' rescale (float64 product, then float32) and normalize (float32) of a `[C, H, W]` array."""
    out = (image.astype(np.float64) * scale).astype(np.float32)
    if mean is not None and std is not None:
        m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        out = ((out.T - m) / s).T
    return out


class LlavaProcessor(VisionProcessor):
    """LLaVa's image processor and `<image>` expansion (see the module docstring)."""

    image_placeholder = "<image>"

    def __init__(self, params: dict[str, Any], image_token: str, tokens_per_image: int) -> None:
        self.do_pad = bool(params.get("do_pad", False))  # pad to a square in the mean colour first
        self.do_resize = bool(params.get("do_resize", True))
        self.size = _size_dict(params.get("size", {"shortest_edge": 224}), square=False)
        self.resample = int(params.get("resample", Image.Resampling.BICUBIC))
        self.do_center_crop = bool(params.get("do_center_crop", True))
        crop = _size_dict(params.get("crop_size", {"height": 224, "width": 224}), square=True)
        self.crop_size = (int(crop["height"]), int(crop["width"]))
        self.rescale_factor = float(params.get("rescale_factor", 1 / 255)) if params.get("do_rescale", True) else 1.0
        normalize = params.get("do_normalize", True)
        self.mean = tuple(params.get("image_mean", CLIP_MEAN)) if normalize else None
        self.std = tuple(params.get("image_std", CLIP_STD)) if normalize else None
        self.image_placeholder = image_token
        self.tokens_per_image = tokens_per_image  # `<image>` tokens one image expands to

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> LlavaProcessor:
        vision = ClipVisionConfig.from_hf_dict(config.get("vision_config") or LLAVA_VISION_DEFAULTS)
        strategy = config.get("vision_feature_select_strategy", "default")
        tokens = vision.num_patches + (1 if strategy == "full" else 0)
        image_token = files.processor_config.get("image_token", "<image>")
        return cls(files.image_processor_config(), image_token, tokens)

    def _pixels(self, image: Image.Image) -> np.ndarray:
        array = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)  # [3, H, W] uint8
        if self.do_pad:
            array = pad_to_square(array, tuple(int(x * 255) for x in (self.mean or (0, 0, 0))))
        if self.do_resize:
            if "shortest_edge" in self.size:
                height, width = resize_shortest_edge(array.shape[1], array.shape[2], int(self.size["shortest_edge"]))
            else:
                height, width = int(self.size["height"]), int(self.size["width"])
            resized = Image.fromarray(np.moveaxis(array, 0, -1)).resize((width, height), resample=self.resample)
            array = np.moveaxis(np.asarray(resized), -1, 0)
        if self.do_center_crop:
            array = center_crop(array, *self.crop_size)
        return rescale_normalize(array, self.rescale_factor, self.mean, self.std)

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        pixels = np.stack([self._pixels(image) for image in images])
        return ImageInputs({"pixel_values": torch.from_numpy(pixels)}, [self.tokens_per_image] * len(images),
                           image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        pieces = prompt.split(self.image_placeholder)
        if len(pieces) - 1 != inputs.num_images:
            raise ValueError(f"the prompt has {len(pieces) - 1} {self.image_placeholder} placeholders for "
                             f"{inputs.num_images} images")
        expanded = [pieces[0]]
        for count, piece in zip(inputs.num_image_tokens, pieces[1:]):
            expanded.append(self.image_placeholder * count + piece)
        return "".join(expanded)


class LlavaMultiModalProjector(nn.Module):
    """`linear_2(act(linear_1(features)))`: tower width (times the feature layers) -> text width."""

    def __init__(self, in_features: int, out_features: int, act: str, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        if act not in _PROJECTOR_ACTS:
            raise ValueError(f"projector_hidden_act={act!r} is not supported; accepted values: "
                             f"{sorted(_PROJECTOR_ACTS)}")
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.act = _PROJECTOR_ACTS[act]
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(VisionCausalLM):
    """LLaVa over packed tokens: `encode_images` runs the CLIP tower and the projector; the decoder is a
    Llama/Mistral `*ForCausalLM` from `models/` fed with the spliced embeddings."""

    WEIGHT_RENAMES = TRANSFORMERS5_RENAMES + CLIP_TRANSFORMERS5_RENAMES

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        text_config = dict(config.get("text_config") or {"model_type": "llama"})
        model_type = text_config.setdefault("model_type", "llama")
        self.language_model = build_text_model(text_config, TEXT_DEFAULTS.get(model_type, {}), dtype=dtype,
                                               device=device)
        self.config = self.language_model.config
        self.dtype = dtype
        vision = ClipVisionConfig.from_hf_dict(config.get("vision_config") or LLAVA_VISION_DEFAULTS)
        self.vision_tower = ClipVisionModel(vision, dtype=dtype, device=device)
        layers = config.get("vision_feature_layer", -2)
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select_strategy = config.get("vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={self.select_strategy!r}; accepted values: "
                             "['default', 'full']")
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision.hidden_size * len(self.feature_layers), self.config.hidden_size,
            config.get("projector_hidden_act", "gelu"), bool(config.get("multimodal_projector_bias", True)),
            dtype=dtype, device=device)
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 32000)))

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        pixels = inputs.tensors["pixel_values"].to(device=self.multi_modal_projector.linear_1.weight.device,
                                                   dtype=self.dtype)
        num_layers = len(self.vision_tower.vision_model.encoder.layers)
        indices = [i % (num_layers + 1) for i in self.feature_layers]  # hidden_states indices, negatives resolved
        states = self.vision_tower.hidden_states(pixels, max(indices))
        selected = [states[i][:, 1:] if self.select_strategy == "default" else states[i] for i in indices]
        features = self.multi_modal_projector(torch.cat(selected, dim=-1))  # [images, tokens, text_hidden]
        return features.reshape(-1, features.shape[-1])


register_vision("LLaVA", ("LlavaForConditionalGeneration",), LlavaForConditionalGeneration, LlavaProcessor)
