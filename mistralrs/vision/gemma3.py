"""Gemma 3 (4B and up): a SigLIP tower (fixed positions), a projector (average pooling to `mm_tokens_per_image`
tokens, Gemma's soft-embedding RMSNorm, a projection) and the Gemma 3 text decoder of `models/gemma.py`.

Preprocessing (as transformers' `Gemma3ImageProcessor` + `Gemma3Processor`): each image is resized to
`size` (896 x 896), with optional pan-and-scan crops (`do_pan_and_scan`: an image whose aspect ratio exceeds
`pan_and_scan_min_ratio_to_activate` is also cut into 2..`pan_and_scan_max_num_crops` crops along its long side,
each resized the same way). The prompt's `<start_of_image>` becomes `\\n\\n<start_of_image>` +
`<image_soft_token>` x `mm_tokens_per_image` + `<end_of_image>\\n\\n`, and, with crops, "Here is the original
image ... and here are some crops to help you see better ..." followed by one such run per crop.

Attention: as in transformers, the `<image_soft_token>` run of one image attends to itself bidirectionally (the
rest stays causal; sliding layers keep their window). The model marks the runs of each chunk as bidirectional
blocks of the step's `ForwardBatch`; a run that a chunk boundary of a chunked prefill splits is bidirectional within
each part (a part sees the earlier parts, which are in the cache, but not the later ones), which differs from
transformers' one-pass prefill. A prefix-cache hit ending inside a run is exact (the cached part saw the whole run).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mistralrs.layers.norm import GemmaRMSNorm
from mistralrs.models.config import TextModelConfig
from mistralrs.models.gemma import Gemma3ForCausalLM
from mistralrs.vision.base import TRANSFORMERS5_RENAMES, ImageInputs, ProcessorFiles, VisionCausalLM, VisionProcessor
from mistralrs.vision.images import image_digest
from mistralrs.vision.registry import register_vision
from mistralrs.vision.siglip import (Normalization, SiglipVisionConfig, SiglipVisionTransformer, replace_placeholders,
                                     resize)
from mistralrs.worker.forward_batch import ForwardBatch

# transformers' SiglipVisionConfig defaults
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)
BILINEAR = 2  # PIL's resampling id, Gemma 3's default
BOI, EOI, SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# transformers' Gemma3TextConfig defaults for the keys that a Gemma 3 multimodal checkpoint's sparse `text_config` omits
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                                        "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6}
class Gemma3MultiModalProjector(nn.Module):
    """`[n, patches, vision_hidden]` -> `[n, mm_tokens_per_image, text_hidden]`: average pooling of the patch grid
    to a `sqrt(mm_tokens)` grid, Gemma RMSNorm, then `x @ mm_input_projection_weight`."""

    def __init__(self, vision: SiglipVisionConfig, text_hidden: int, mm_tokens_per_image: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.patches_per_side = vision.patches_per_side
        tokens_per_side = math.isqrt(mm_tokens_per_image)
        if tokens_per_side**2 != mm_tokens_per_image or self.patches_per_side % tokens_per_side:
            raise ValueError(f"config field 'mm_tokens_per_image' ({mm_tokens_per_image}) must be a square whose "
                             f"side divides the patch grid side ({self.patches_per_side})")
        self.kernel = self.patches_per_side // tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vision.hidden_size, text_hidden, dtype=dtype, device=device), requires_grad=False)
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, vision.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, vision_out: torch.Tensor) -> torch.Tensor:
        n, _, width = vision_out.shape
        grid = vision_out.transpose(1, 2).reshape(n, width, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(vision_out)


@dataclass(frozen=True)
class PanAndScan:
    """Pan-and-scan settings (transformers' Gemma3Processor defaults)."""

    min_crop_size: int = 256  # smallest crop side
    max_num_crops: int = 4  # most crops per image
    min_ratio_to_activate: float = 1.2  # aspect ratio from which an image is cropped

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """The crops of `image` (none when its aspect ratio is below the threshold or they would be too small)."""
        width, height = image.width, image.height
        long, short = (width, height) if width >= height else (height, width)
        if long / short < self.min_ratio_to_activate:
            return []
        count = min(int(math.floor(long / short + 0.5)), int(math.floor(long / self.min_crop_size)))
        count = min(self.max_num_crops, max(2, count))
        crops_w, crops_h = (count, 1) if width >= height else (1, count)
        crop_w, crop_h = int(math.ceil(width / crops_w)), int(math.ceil(height / crops_h))
        if min(crop_w, crop_h) < self.min_crop_size:
            return []
        return [image.crop((x, y, min(x + crop_w, width), min(y + crop_h, height)))
                for y, x in itertools.product(range(0, crop_h * crops_h, crop_h), range(0, crop_w * crops_w, crop_w))]


def _special_token(files: ProcessorFiles, key: str, default: str) -> str:
    """A Gemma 3 tokenizer's extra special token (top level of tokenizer_config.json, or transformers 5's
    `extra_special_tokens`)."""
    config = files.tokenizer_config
    extra = config.get("extra_special_tokens")
    return config.get(key) or (extra.get(key) if isinstance(extra, dict) else None) or default


@dataclass(frozen=True)
class Gemma3Processor(VisionProcessor):
    """Gemma 3's image processor and prompt expansion (module docstring). `max_edge` does not apply (the
    reference applies it to Idefics2/3 and Qwen2-VL only): every image is resized to `size`."""

    height: int  # size.height
    width: int  # size.width
    resample: int  # PIL resampling filter
    normalization: Normalization  # rescale and normalise
    tokens_per_image: int  # <image_soft_token> per image or crop
    pan_and_scan: PanAndScan | None  # crops, when do_pan_and_scan
    image_placeholder: str = BOI
    end_of_image: str = EOI  # closes an image's run
    soft_token: str = SOFT_TOKEN  # the image token

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.tokens_per_image) <= 0:
            raise ValueError(f"Gemma 3 processor: size and image_seq_length must be positive, got "
                             f"{self.height}x{self.width}, {self.tokens_per_image}")

    @classmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> Gemma3Processor:
        pp = files.image_processor_config()
        size = pp.get("size") or {"height": 896, "width": 896}
        pas = None
        if pp.get("do_pan_and_scan"):
            given = {"min_crop_size": pp.get("pan_and_scan_min_crop_size"),
                     "max_num_crops": pp.get("pan_and_scan_max_num_crops"),
                     "min_ratio_to_activate": pp.get("pan_and_scan_min_ratio_to_activate")}
            pas = PanAndScan(**{k: v for k, v in given.items() if v is not None})
        tokens = files.processor_config.get("image_seq_length", config.get("mm_tokens_per_image", 256))
        return cls(height=int(size["height"]), width=int(size["width"]), resample=int(pp.get("resample", BILINEAR)),
                   normalization=Normalization.from_preprocessor(pp), tokens_per_image=int(tokens),
                   pan_and_scan=pas, image_placeholder=_special_token(files, "boi_token", BOI),
                   end_of_image=_special_token(files, "eoi_token", EOI),
                   soft_token=_special_token(files, "image_token", SOFT_TOKEN))

    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        tiles, num_crops = [], []
        for image in images:
            image = image.convert("RGB")
            crops = self.pan_and_scan.crops(image) if self.pan_and_scan is not None else []
            tiles += [self.normalization(resize(t, self.height, self.width, self.resample)) for t in [image, *crops]]
            num_crops.append(len(crops))
        tensors = {"pixel_values": torch.stack(tiles), "num_crops": torch.tensor(num_crops, dtype=torch.int64)}
        return ImageInputs(tensors, [self.tokens_per_image * (1 + c) for c in num_crops], image_digest(images))

    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        run = f"\n\n{self.image_placeholder}{self.soft_token * self.tokens_per_image}{self.end_of_image}\n\n"
        expansions = [run if not crops else
                      f"Here is the original image {run} and here are some crops to help you see better "
                      + " ".join([run] * crops) for crops in inputs.tensors["num_crops"].tolist()]
        return replace_placeholders(prompt, self.image_placeholder, expansions)


class Gemma3ForConditionalGeneration(VisionCausalLM):
    """Gemma 3: `vision_tower` (SigLIP) -> `multi_modal_projector` -> `<image_soft_token>` rows of the Gemma 3
    `language_model`, whose image runs attend bidirectionally (module docstring)."""

    # the published layout nests the tower as `vision_tower.vision_model.`; transformers 5 writes `vision_tower.`
    WEIGHT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        *TRANSFORMERS5_RENAMES,
    )
    UNUSED_PREFIX: ClassVar[str] = "vision_tower.head."  # SigLIP's pooling head, which Gemma 3 does not use

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The Gemma 3 text decoder's config dict: `text_config` over transformers' defaults; the LM head tied by the
        top-level `tie_word_embeddings` (default true), as transformers ties it."""
        return {**GEMMA3_TEXT_DEFAULTS, **(config.get("text_config") or {}), "architectures": ["Gemma3ForCausalLM"],
                "tie_word_embeddings": bool(config.get("tie_word_embeddings", True))}

    def __init__(self, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        vision = SiglipVisionConfig.from_hf_dict(config.get("vision_config"), VISION_DEFAULTS)
        text = TextModelConfig.from_hf_dict(self.text_config_dict(config))
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id", 262_144)))
        self.vision_tower = SiglipVisionTransformer(vision, bucketed_positions=False, dtype=dtype, device=device)
        self.multi_modal_projector = Gemma3MultiModalProjector(
            vision, text.hidden_size, int(config.get("mm_tokens_per_image", 256)), dtype=dtype, device=device)
        self.language_model = Gemma3ForCausalLM(text, dtype=dtype, device=device)
        self.config = text
        self.dtype = dtype

    def load_weights(self, weights) -> set[str]:
        """As the base class, and SigLIP's pooling head (in checkpoints saved with it) consumed unused."""
        unused: set[str] = set()

        def used():
            for name, tensor in weights:
                if name.startswith(self.UNUSED_PREFIX):
                    unused.add(name)
                else:
                    yield name, tensor

        return super().load_weights(used()) | unused

    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        pixels = inputs.tensors["pixel_values"].to(self.vision_tower.post_layernorm.weight.device)
        features = self.multi_modal_projector(self.vision_tower(pixels))
        return features.reshape(-1, features.shape[-1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings; an image token outside the vocabulary embeds as token 0 (its row is replaced)."""
        vocab = self.language_model.config.vocab_size
        if self.image_token_id >= vocab:
            input_ids = torch.where(input_ids == self.image_token_id, torch.zeros_like(input_ids), input_ids)
        return super().embed(input_ids)

    def image_blocks(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor | None:
        """`[num_tokens]` id of the image-token run each token belongs to within its chunk (-1: none); None when
        the step has no image token."""
        is_image = input_ids == self.image_token_id
        if not bool(is_image.any()):
            return None
        continues = torch.zeros_like(is_image)
        continues[1:] = is_image[:-1]
        continues[torch.tensor(fb.query_start_locs[:-1], device=input_ids.device)] = False  # runs end at chunks
        run_ids = torch.cumsum((is_image & ~continues).long(), dim=0) - 1
        return torch.where(is_image, run_ids, torch.full_like(run_ids, -1))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        fb = fb.with_bidirectional_blocks(self.image_blocks(input_ids, fb))
        return self.language_model(input_ids, positions, fb, inputs_embeds=inputs_embeds)


register_vision("Gemma3", ("Gemma3ForConditionalGeneration",), Gemma3ForConditionalGeneration, Gemma3Processor)
