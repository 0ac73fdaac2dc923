"""Idefics2: a SigLIP tower with bucketed positions, a connector (gated MLP into the text width, then a perceiver
resampler to a fixed number of latents per image) and a Mistral text decoder.

Preprocessing (as transformers' `Idefics2ImageProcessor` + `Idefics2Processor`): with `do_image_splitting` the
image is cut into its four quarters followed by the whole image; each part is resized so that its longest edge is
at most `size.longest_edge` (capped by `max_edge`) and its shortest at least `size.shortest_edge`, then all parts
of a request are zero-padded to the largest (the pixel mask marks the real pixels). One part becomes
`<fake_token_around_image>` + `<image>` x `image_seq_len` + `<fake_token_around_image>`, adjacent fake tokens merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.norm import RMSNorm
from mistralrs.models.config import TextModelConfig
from mistralrs.models.llama import MistralForCausalLM
from mistralrs.vision.base import ImageInputs, ProcessorFiles, VisionProcessor
from mistralrs.vision.idefics3 import Idefics3ForConditionalGeneration, patch_mask_of
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import Normalization, SiglipVisionConfig, pad_batch, replace_placeholders, resize

# transformers' Idefics2VisionConfig defaults
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32)
# MistralConfig defaults, with Idefics2Config's overrides
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, max_position_embeddings=32768,
                     rms_norm_eps=1e-5)
BILINEAR = 2  # PIL's resampling id, Idefics2's default
FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class PerceiverConfig:
    """`perceiver_config` (HF names and transformers' defaults)."""

    hidden_size: int = 4096  # latent width (transformers forces the text model's hidden size)
    hidden_act: str = "silu"  # MLP activation
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    resampler_n_latents: int = 64  # latents (= image tokens) per image
    resampler_depth: int = 3  # perceiver layers
    resampler_n_heads: int = 16  # query heads
    resampler_head_dim: int = 96  # features per head
    num_key_value_heads: int = 4  # key/value heads (GQA)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"perceiver_config field {f.name!r} must be a positive integer, got {value!r}")
        if self.resampler_n_heads % self.num_key_value_heads:
            raise ValueError(f"perceiver_config num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"resampler_n_heads ({self.resampler_n_heads})")
        get_act_fn(self.hidden_act)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None, text: TextModelConfig) -> PerceiverConfig:
        """Reads `perceiver_config`; as transformers does, a hidden size other than the text model's is replaced by
        it, together with the text model's norm epsilon."""
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in (d or {}).items() if k in names and v is not None})
        if config.hidden_size != text.hidden_size:
            config = cls(**{**config.__dict__, "hidden_size": text.hidden_size, "rms_norm_eps": text.rms_norm_eps})
        return config


class Idefics2MLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, bias-free."""

    def __init__(self, hidden: int, intermediate: int, output: int, act: str, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.act_fn = get_act_fn(act)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, output, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """Latents attend to the context followed by themselves (GQA, no RoPE, no causality)."""

    def __init__(self, config: PerceiverConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.resampler_n_heads, config.num_key_value_heads,
                                                    config.resampler_head_dim)
        width = config.hidden_size

        def linear(i: int, o: int) -> nn.Linear:
            return nn.Linear(i, o, bias=False, dtype=dtype, device=device)

        self.q_proj = linear(width, self.heads * self.head_dim)
        self.k_proj = linear(width, self.kv_heads * self.head_dim)
        self.v_proj = linear(width, self.kv_heads * self.head_dim)
        self.o_proj = linear(self.heads * self.head_dim, width)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """latents `[n, L, width]`, context `[n, S, width]`, key_mask `[n, 1, 1, S + L]` bool or None."""
        n, num_latents, _ = latents.shape
        keys_in = torch.cat([context, latents], dim=1)

        def heads(x: torch.Tensor, count: int) -> torch.Tensor:
            return x.view(n, x.shape[1], count, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(latents), self.heads), heads(self.k_proj(keys_in), self.kv_heads),
            heads(self.v_proj(keys_in), self.kv_heads), attn_mask=key_mask, scale=self.head_dim**-0.5,
            enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, num_latents, -1))


class PerceiverLayer(nn.Module):
    """`l += attn(norm(l), norm(context)); l += mlp(norm(l))`."""

    def __init__(self, config: PerceiverConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(width, eps, dtype=dtype, device=device)
        self.input_context_norm = RMSNorm(width, eps, dtype=dtype, device=device)
        self.self_attn = PerceiverAttention(config, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(width, eps, dtype=dtype, device=device)
        self.mlp = Idefics2MLP(width, 4 * width, width, config.hidden_act, dtype=dtype, device=device)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context),
                                           key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Learned latents cross-attending to the image's patches: `[n, S, width]` -> `[n, n_latents, width]`."""

    def __init__(self, config: PerceiverConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(config.resampler_n_latents, config.hidden_size, dtype=dtype,
                                               device=device), requires_grad=False)
        self.layers = nn.ModuleList(PerceiverLayer(config, dtype=dtype, device=device)
                                    for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """context_mask `[n, S]` bool: the context rows (valid patches) the latents may attend to."""
        n = context.shape[0]
        latents = self.latents.unsqueeze(0).expand(n, -1, -1)
        key_mask = None
        if not bool(context_mask.all()):
            latent_keys = torch.ones(n, latents.shape[1], dtype=torch.bool, device=context.device)
            key_mask = torch.cat([context_mask, latent_keys], dim=1).view(n, 1, 1, -1)
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    """`modality_projection` (gated MLP into the text width) then the perceiver resampler."""

    def __init__(self, vision: SiglipVisionConfig, text: TextModelConfig, perceiver: PerceiverConfig, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.modality_projection = Idefics2MLP(vision.hidden_size, text.intermediate_size, text.hidden_size,
                                               text.hidden_act, dtype=dtype, device=device)
        self.perceiver_resampler = PerceiverResampler(perceiver, dtype=dtype, device=device)

    def forward(self, image_hidden: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(image_hidden), patch_mask)


def _bounded_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """transformers' Idefics2 `get_resize_output_image_size`."""
    aspect = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / aspect)
    elif height > width and height > longest:
        height, width = longest, int(longest * aspect)
    return max(height, shortest), max(width, shortest)


@dataclass(frozen=True)
class Idefics2Processor(VisionProcessor):
    """Idefics2's image processor and prompt expansion (module docstring)."""

    shortest_edge: int  # size.shortest_edge
    longest_edge: int  # size.longest_edge, capped by max_edge
    do_image_splitting: bool  # four quarters plus the whole image
    image_seq_len: int  # <image> tokens per part
    resample: int  # PIL resampling filter
    normalization: Normalization  # rescale and normalise
    image_placeholder: str = IMAGE_TOKEN

    def __post_init__(self) -> None:
        for name in ("shortest_edge", "longest_edge", "image_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Idefics2 processor: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> Idefics2Processor:
        pp = files.image_processor_config()
        size = pp.get("size") or {}
        longest = int(size.get("longest_edge", 980))
        if max_edge is not None:
            longest = min(longest, max_edge)
        latents = (config.get("perceiver_config") or {}).get("resampler_n_latents", 64)
        return cls(shortest_edge=int(size.get("shortest_edge", 378)), longest_edge=longest,
                   do_image_splitting=bool(pp.get("do_image_splitting", False)),
                   image_seq_len=int(files.processor_config.get("image_seq_len", latents)),
                   resample=int(pp.get("resample", BILINEAR)), normalization=Normalization.from_preprocessor(pp))

    def parts(self, image: Image.Image) -> list[Image.Image]:
        """The image's parts in prompt order (quarters then the whole image when splitting), resized."""
        image = image.convert("RGB")
        parts = [image]
        if self.do_image_splitting:
            w, h = image.width // 2, image.height // 2
            quarters = [(0, 0, w, h), (w, 0, image.width, h), (0, h, w, image.height),
                        (w, h, image.width, image.height)]
            parts = [image.crop(box) for box in quarters] + [image]
        sizes = [_bounded_size(p.height, p.width, self.shortest_edge, self.longest_edge) for p in parts]
        return [resize(p, height, width, self.resample) for p, (height, width) in zip(parts, sizes)]

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        tiles = [self.normalization(part) for image in images for part in self.parts(image)]
        per_image = self.image_seq_len * (5 if self.do_image_splitting else 1)
        return ImageInputs(pad_batch(tiles), [per_image] * len(images), image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        one = f"{FAKE_TOKEN}{IMAGE_TOKEN * self.image_seq_len}{FAKE_TOKEN}" * (5 if self.do_image_splitting else 1)
        text = replace_placeholders(prompt, self.image_placeholder, [one] * inputs.num_images)
        text = text.replace(FAKE_TOKEN * 2, FAKE_TOKEN)
        # as transformers does: a word right after a closing fake token gets a space before it
        return re.sub(rf"{re.escape(FAKE_TOKEN)}(?=[^\s<])", f"{FAKE_TOKEN} ", text)


class Idefics2ForConditionalGeneration(Idefics3ForConditionalGeneration):
    """Idefics2: Idefics3's layout and tower, with the perceiver connector (a patch counts only when all its pixels
    are real) and a Mistral `language_model`."""

    VISION_DEFAULTS: ClassVar[dict[str, Any]] = VISION_DEFAULTS
    TEXT_DEFAULTS: ClassVar[dict[str, Any]] = TEXT_DEFAULTS
    DEFAULT_IMAGE_TOKEN_ID: ClassVar[int] = 32001  # transformers' Idefics2Config default
    TEXT_MODEL: ClassVar[type] = MistralForCausalLM

    def build_connector(self, config: dict[str, Any], vision: SiglipVisionConfig, text: TextModelConfig, *,
                        dtype: torch.dtype, device: torch.device | str) -> None:
        perceiver = PerceiverConfig.from_hf_dict(config.get("perceiver_config"), text)
        self.connector = Idefics2Connector(vision, text, perceiver, dtype=dtype, device=device)

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        device = self.vision_model.post_layernorm.weight.device
        pixels = inputs.tensors["pixel_values"].to(device)
        patch_mask = patch_mask_of(inputs.tensors["pixel_attention_mask"].to(device),
                                   self.vision_model.config.patch_size, full_patches_only=True)
        hidden = self.vision_model(pixels, patch_mask)
        features = self.connector(hidden, patch_mask.view(patch_mask.shape[0], -1))
        return features.reshape(-1, features.shape[-1])


register_vision("Idefics2", ("Idefics2ForConditionalGeneration",), Idefics2ForConditionalGeneration,
                Idefics2Processor)
