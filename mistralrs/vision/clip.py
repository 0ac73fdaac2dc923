"""The CLIP ViT vision tower (LLaVa, LLaVa-Next): patch embedding with a class token, pre-norm encoder layers.

Module names follow the published checkpoints (`vision_model.embeddings.patch_embedding`, `.pre_layrnorm`,
`.encoder.layers.N.self_attn.q_proj`, ...), so the weights load by name. The tower stays in plain torch modules
(never quantized in situ: the reference quantizes the text decoder only). `hidden_states(pixels, upto)` returns
the outputs transformers lists as `hidden_states` (index 0: the embeddings after `pre_layrnorm`, index i: after
layer i), computing only the layers up to the deepest one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's `quick_gelu`: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class ClipVisionConfig:
    """The CLIP vision tower's hyper-parameters (HF `vision_config` names; validated)."""

    hidden_size: int = 1024  # residual width
    intermediate_size: int = 4096  # MLP inner width
    num_hidden_layers: int = 24  # encoder layers
    num_attention_heads: int = 16  # attention heads
    image_size: int = 336  # the square input size the position table is for
    patch_size: int = 14  # pixels per patch edge
    num_channels: int = 3  # input channels
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    hidden_act: str = "quick_gelu"  # MLP activation

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"vision_config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r} is not supported; accepted values: "
                             f"{sorted(_ACTIVATIONS)}")

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> ClipVisionConfig:
        """The fields of an HF `vision_config` dict (other keys ignored; absent ones take CLIP-L/336's values)."""
        known = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        return cls(**known)

    @property
    def num_patches(self) -> int:
        """Patches of one `image_size` square image."""
        return (self.image_size // self.patch_size) ** 2


class ClipVisionEmbeddings(nn.Module):
    """Patch convolution, class token in front, learned absolute positions."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width = config.hidden_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(width, dtype=dtype, device=device))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False, dtype=dtype, device=device)
        self.position_embedding = nn.Embedding(config.num_patches + 1, width, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"CLIP tower: image of {height}x{width} pixels, the model takes "
                             f"{self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [batch, num_patches, width]
        cls = self.class_embedding.expand(batch, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    """Bidirectional multi-head self-attention over one image's tokens."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.q_proj = nn.Linear(width, width, dtype=dtype, device=device)
        self.k_proj = nn.Linear(width, width, dtype=dtype, device=device)
        self.v_proj = nn.Linear(width, width, dtype=dtype, device=device)
        self.out_proj = nn.Linear(width, width, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(hidden)), heads(self.k_proj(hidden)),
                                             heads(self.v_proj(hidden)))
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class ClipMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-norm block: `h += attn(ln1(h)); h += mlp(ln2(h))`."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.self_attn = ClipAttention(config, dtype=dtype, device=device)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.mlp = ClipMLP(config, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class ClipEncoder(nn.Module):
    """The encoder layers (`encoder.layers.N`)."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config, dtype=dtype, device=device)
                                    for _ in range(config.num_hidden_layers))


class ClipVisionTransformer(nn.Module):
    """`vision_model`: embeddings, `pre_layrnorm`, encoder, `post_layernorm` (the last feeds CLIP's pooled output
    only; it is loaded so that the checkpoint matches, and LLaVa never runs it)."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.config = config
        self.embeddings = ClipVisionEmbeddings(config, dtype=dtype, device=device)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)
        self.encoder = ClipEncoder(config, dtype=dtype, device=device)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, device=device)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """transformers' `hidden_states[0..upto]` for `pixel_values [batch, 3, H, W]`: `[batch, 1 + patches,
        hidden]` each, index 0 the normed embeddings, index i the output of layer i."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [hidden]
        for layer in self.encoder.layers[:upto]:
            hidden = layer(hidden)
            states.append(hidden)
        return states


class ClipVisionModel(nn.Module):
    """CLIPVisionModel's checkpoint layout: the transformer under `vision_model.`."""

    def __init__(self, config: ClipVisionConfig, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.vision_model = ClipVisionTransformer(config, dtype=dtype, device=device)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """See `ClipVisionTransformer.hidden_states`."""
        return self.vision_model.hidden_states(pixel_values, upto)


# transformers 5 writes a CLIPVisionModel without its `vision_model.` level.
CLIP_TRANSFORMERS5_RENAMES: tuple[tuple[str, str], ...] = tuple(
    (f"vision_tower.{part}.", f"vision_tower.vision_model.{part}.")
    for part in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"))
