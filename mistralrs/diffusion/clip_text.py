"""The CLIP text encoder (FLUX's `text_encoder`, CLIP ViT-L/14 text tower): the pooled prompt embedding.

Module names follow transformers' `CLIPTextModel` (`text_model.embeddings.token_embedding`,
`text_model.encoder.layers.N.self_attn.q_proj`, ...). Causal self-attention; the pooled output is the final-normed
hidden state at the end-of-text token (the highest id for the original checkpoints, whose config says
`eos_token_id: 2`, as transformers does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.linear import Linear

_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}
_LEGACY_EOS_ID = 2  # configs with this eos id pool at the highest token id (transformers' legacy rule)


@dataclass(frozen=True)
class ClipTextConfig:
    """The text encoder's `config.json` (transformers' names)."""

    vocab_size: int = 49408  # token embeddings
    hidden_size: int = 768  # hidden width
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12  # encoder layers
    num_attention_heads: int = 12  # attention heads
    max_position_embeddings: int = 77  # positions (the tokenizer pads to this)
    hidden_act: str = "quick_gelu"  # MLP activation
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    eos_token_id: int = 2  # end-of-text id (2: pool at the highest id)

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"ClipTextConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ClipTextConfig.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, data: dict) -> ClipTextConfig:
        """From `text_encoder/config.json` (a full CLIP config's `text_config` is used when present)."""
        data = data.get("text_config", data)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class _Attention(nn.Module):
    def __init__(self, config: ClipTextConfig, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, Linear(dim, dim, bias=True, dtype=dtype, device=device, prefix=f"{prefix}.{name}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class _Mlp(nn.Module):
    def __init__(self, config: ClipTextConfig, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, device=device,
                          prefix=f"{prefix}.fc1")
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True, dtype=dtype, device=device,
                          prefix=f"{prefix}.fc2")
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, config: ClipTextConfig, index: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        prefix = f"text_model.encoder.layers.{index}"
        eps, dim = config.layer_norm_eps, config.hidden_size
        self.self_attn = _Attention(config, f"{prefix}.self_attn", dtype, device)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)
        self.mlp = _Mlp(config, f"{prefix}.mlp", dtype, device)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, config: ClipTextConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                               device=device)


class _Encoder(nn.Module):
    def __init__(self, config: ClipTextConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config, i, dtype, device) for i in range(config.num_hidden_layers))


class _TextModel(nn.Module):
    def __init__(self, config: ClipTextConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config, dtype, device)
        self.encoder = _Encoder(config, dtype, device)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype,
                                             device=device)


class ClipTextEncoder(nn.Module):
    """Token ids `[B, L]` -> the pooled embedding `[B, hidden]` (transformers' `CLIPTextModel.pooler_output`)."""

    def __init__(self, config: ClipTextConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        self.text_model = _TextModel(config, dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.text_model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = model.embeddings.token_embedding(input_ids) + model.embeddings.position_embedding(positions)[None]
        for layer in model.encoder.layers:
            x = layer(x)
        x = model.final_layer_norm(x)
        if self.config.eos_token_id == _LEGACY_EOS_ID:
            eos = input_ids.to(torch.int).argmax(dim=-1)
        else:
            eos = (input_ids.to(torch.int) == self.config.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eos]
