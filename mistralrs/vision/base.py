"""The contract between the image path and the vision models (docs: VISION-CONTRACT.md).

- `ImageInputs`: one request's images after preprocessing, carried by the engine request to the model runner.
- `VisionProcessor`: one per family; turns PIL images into `ImageInputs` and expands the prompt's placeholders.
- `VisionCausalLM`: base of the `*ForConditionalGeneration` models: a text decoder from `models/` whose embedding
  rows at the image-token positions are replaced by the features `encode_images` computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from mistralrs.models.base import CausalLM
from mistralrs.models.config import TextModelConfig
from mistralrs.models.registry import model_class_for
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec

# Checkpoint prefixes as transformers 5 writes them -> the published layout, which is our module tree
# (`language_model` is a `*ForCausalLM` from `models/`, hence its `model.` and `lm_head.`).
TRANSFORMERS5_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


# A text_config's model_type -> the text decoder's HF architecture (when the text_config names none).
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                      "phi3": "Phi3ForCausalLM"}


def build_text_model(text_config: dict[str, Any], defaults: dict[str, Any], *, dtype: torch.dtype,
                     device: torch.device | str) -> CausalLM:
    """The text decoder of a vision checkpoint: `text_config` over `defaults` (the keys transformers' config class
    fills in when a checkpoint leaves them out), built as the registered `*ForCausalLM` its `architectures` or
    `model_type` names."""
    merged = {**defaults, **{k: v for k, v in text_config.items() if v is not None}}
    architectures = merged.get("architectures") or [TEXT_ARCHITECTURES.get(merged.get("model_type"), "")]
    cls = model_class_for([a for a in architectures if a] or None)
    return cls(TextModelConfig.from_hf_dict({**merged, "architectures": architectures}), dtype=dtype, device=device)


@dataclass
class ImageInputs:
    """One request's images after preprocessing (on the CPU), in prompt order."""

    tensors: dict[str, torch.Tensor]  # the model's image inputs batched over the request's images, named as
    #                                   transformers' processor names them (pixel_values, image_sizes, ...)
    num_image_tokens: list[int]  # placeholder tokens each image expands to in the prompt, in order
    digest: str  # sha256 over the images' pixels: the prefix-cache salt (same images hit, other images miss)

    def __post_init__(self) -> None:
        if any(not isinstance(n, int) or n < 1 for n in self.num_image_tokens):
            raise ValueError(f"ImageInputs.num_image_tokens must be positive integers, got {self.num_image_tokens!r}")
        if not self.digest:
            raise ValueError("ImageInputs.digest must not be empty")

    @property
    def num_images(self) -> int:
        """How many images the request carries."""
        return len(self.num_image_tokens)

    @property
    def total_image_tokens(self) -> int:
        """Rows `encode_images` returns: the sum of `num_image_tokens`."""
        return sum(self.num_image_tokens)


@dataclass(frozen=True)
class ProcessorFiles:
    """The checkpoint's processor files, parsed (an absent file is an empty dict)."""

    preprocessor_config: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json
    processor_config: dict[str, Any] = field(default_factory=dict)  # processor_config.json
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json (special tokens)

    def image_processor_config(self) -> dict[str, Any]:
        """The image processor's parameters: preprocessor_config.json, else the `image_processor` entry that
        transformers 5 writes into processor_config.json."""
        return self.preprocessor_config or dict(self.processor_config.get("image_processor") or {})


class VisionProcessor(ABC):
    """A family's image processor: PIL images -> `ImageInputs`, and prompt placeholders -> image token runs.

    Built once per model by `from_checkpoint`; stateless afterwards (used from several threads).
    """

    image_placeholder: str  # the text one image is written as in a prompt before expansion ("<image>", ...)
    max_images: int | None = None  # most images per request the model accepts (None: no limit of its own)

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, files: ProcessorFiles, config: dict[str, Any], max_edge: int | None) -> VisionProcessor:
        """The processor of a checkpoint: `files` parsed, `config` its config.json, `max_edge` the longest image
        edge the user allows (None: the checkpoint's sizes)."""

    @abstractmethod
    def preprocess(self, images: list[Image.Image]) -> ImageInputs:
        """The model's inputs for `images` (RGB), in order."""

    @abstractmethod
    def expand_prompt(self, prompt: str, inputs: ImageInputs) -> str:
        """`prompt` with each placeholder occurrence replaced by that image's full expansion; ValueError when the
        number of placeholders differs from `inputs.num_images`."""

    def count_placeholders(self, prompt: str) -> int:
        """How many image placeholders `prompt` holds."""
        return prompt.count(self.image_placeholder)


class VisionCausalLM(CausalLM):
    """Base of the `*ForConditionalGeneration` models: `language_model` (a `CausalLM` from `models/`) fed with
    embeddings in which the rows at `image_token_id` are the image features.

    A family sets `language_model`, `image_token_id` and its vision modules, and implements `encode_images`.
    Checkpoint names are the published layout (`language_model.model.*`, `vision_tower.*`,
    `multi_modal_projector.*`); `WEIGHT_RENAMES` maps other layouts onto it (transformers 5's by default).
    """

    WEIGHT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = TRANSFORMERS5_RENAMES
    language_model: CausalLM  # the text decoder (and its LM head)
    image_token_id: int  # the token whose embedding rows are replaced by image features

    @abstractmethod
    def encode_images(self, inputs: ImageInputs) -> torch.Tensor:
        """`[inputs.total_image_tokens, text_hidden]` features in prompt order (model dtype, model device)."""

    def rope_positions(self, prompt_token_ids: list[int],
                       inputs: ImageInputs | None) -> tuple[torch.Tensor, int] | None:
        """M-RoPE models: (`[3, len(prompt_token_ids)]` positions, delta); a token at index p >= the prompt's length
        then has position p + delta on the three axes. None (the default): positions are token indices."""
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text embeddings of `input_ids` as the decoder computes them (its scaling included)."""
        return self.language_model.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, fb, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.language_model.kv_cache_spec()

    @property
    def STACKED_PARAMS(self) -> tuple:  # noqa: N802 (the name ISQ and UQFF read from every model)
        """The text decoder's fused checkpoint shards (ISQ/UQFF name its layers by them)."""
        return self.language_model.STACKED_PARAMS

    @property
    def device_map(self):
        """The text decoder's device map (worker/device_map.py), None when it runs on one device."""
        return getattr(self.language_model, "device_map", None)

    @classmethod
    def canonical_weight_name(cls, name: str) -> str:
        """`name` in the published layout: the rules of `WEIGHT_RENAMES` applied in order, each to the name as the
        rules before it left it (a rule replaces a matching prefix)."""
        for old, new in cls.WEIGHT_RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads published-layout names: `language_model.*` into the text model, the rest into this module's own
        parameters (`load_vision_weights`); returns the names consumed."""
        text, vision = [], []
        for name, tensor in weights:
            (text if name.startswith("language_model.") else vision).append((name, tensor))
        prefix = "language_model."
        consumed = {prefix + n for n in self.language_model.load_weights((n[len(prefix):], t) for n, t in text)}
        return consumed | self.load_vision_weights(vision)

    def load_vision_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies tensors into this module's parameters and buffers of the same name (the vision tower and
        projector are plain torch modules); returns the names consumed."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        consumed = set()
        for name, tensor in weights:
            target = own.get(name)
            if target is None or name.startswith("language_model."):
                continue
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} does not match {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            consumed.add(name)
        return consumed

    def expected_weight_names(self) -> set[str]:
        """Published-layout names this model needs."""
        text = {"language_model." + n for n in self.language_model.expected_weight_names()}
        vision = {n for n, _ in self.named_parameters() if not n.startswith("language_model.")}
        return text | vision
