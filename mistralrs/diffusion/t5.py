"""The T5 encoder (FLUX's `text_encoder_2`, T5 v1.1 XXL): per-token text features for the transformer.

Module names follow transformers' `T5EncoderModel` (`shared`, `encoder.block.N.layer.0.SelfAttention.q`, ...),
so the checkpoint loads by name. Attention is unscaled and biased by bucketed relative positions computed once
(block 0 owns the bias table) and shared by every block; no attention mask (the FLUX pipeline pads and attends
to the padding, as diffusers does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.diffusion.offload import OffloadPolicy
from mistralrs.layers.linear import Linear

_ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh":
                lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


@dataclass(frozen=True)
class T5Config:
    """The encoder's `config.json` (transformers' names)."""

    vocab_size: int = 32128  # token embeddings
    d_model: int = 4096  # hidden width
    d_kv: int = 64  # width of one head
    d_ff: int = 10240  # feed-forward width
    num_layers: int = 24  # encoder blocks
    num_heads: int = 64  # attention heads
    relative_attention_num_buckets: int = 32  # relative-position buckets
    relative_attention_max_distance: int = 128  # distance beyond which buckets are shared
    layer_norm_epsilon: float = 1e-6  # RMS norm epsilon
    feed_forward_proj: str = "gated-gelu"  # "gated-<act>" (wi_0, wi_1) or "<act>" (wi)
    dense_act_fn: str | None = None  # activation name; None: from feed_forward_proj

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"T5Config.dense_act_fn must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(f"T5Config.relative_attention_num_buckets must be >= 2, got "
                             f"{self.relative_attention_num_buckets}")

    @property
    def gated(self) -> bool:
        """Gated feed-forward (wi_0 activated times wi_1)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Name of the feed-forward activation ("gated-gelu" uses gelu_new, as transformers does)."""
        if self.dense_act_fn is not None:
            return self.dense_act_fn
        name = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if name == "gelu" and self.gated else name

    @classmethod
    def from_dict(cls, data: dict) -> T5Config:
        """From `text_encoder_2/config.json` (other keys ignored)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction, statistics in float32 (transformers' T5LayerNorm)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of each (key - query) offset."""
    num_buckets //= 2
    buckets = (relative > 0).long() * num_buckets
    relative = relative.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(relative < max_exact, relative, large)


class _SelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.config = config
        for name, (n_in, n_out) in {"q": (config.d_model, inner), "k": (config.d_model, inner),
                                    "v": (config.d_model, inner), "o": (inner, config.d_model)}.items():
            setattr(self, name, Linear(n_in, n_out, bias=False, dtype=dtype, device=device, prefix=f"{prefix}.{name}"))
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads,
                                                        dtype=dtype, device=device)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """`[1, heads, length, length]` bias of every (query, key) pair."""
        positions = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                           self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, d_kv = self.config.num_heads, self.config.d_kv

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, d_kv).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(3, 2)) + bias
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, heads * d_kv))


class _AttentionLayer(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.SelfAttention = _SelfAttention(config, has_bias_table, f"{prefix}.SelfAttention", dtype, device)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class _DenseActDense(nn.Module):
    def __init__(self, config: T5Config, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        names = ("wi_0", "wi_1") if config.gated else ("wi",)
        for name in names:
            setattr(self, name, Linear(config.d_model, config.d_ff, bias=False, dtype=dtype, device=device,
                                       prefix=f"{prefix}.{name}"))
        self.wo = Linear(config.d_ff, config.d_model, bias=False, dtype=dtype, device=device, prefix=f"{prefix}.wo")
        self.act = _ACTIVATIONS[config.activation]
        self.gated = config.gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _FeedForwardLayer(nn.Module):
    def __init__(self, config: T5Config, prefix: str, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.DenseReluDense = _DenseActDense(config, f"{prefix}.DenseReluDense", dtype, device)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(x.dtype).max - 1000 if torch.isinf(x).any() else torch.finfo(x.dtype).max
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    """Self-attention then feed-forward, each pre-normed and residual."""

    def __init__(self, config: T5Config, index: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        prefix = f"encoder.block.{index}.layer"
        self.layer = nn.ModuleList([_AttentionLayer(config, index == 0, f"{prefix}.0", dtype, device),
                                    _FeedForwardLayer(config, f"{prefix}.1", dtype, device)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _clamp_half(self.layer[1](_clamp_half(self.layer[0](x, bias))))


class _Stack(nn.Module):
    def __init__(self, config: T5Config, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, i, dtype, device) for i in range(config.num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype, device)


class T5Encoder(nn.Module):
    """Token ids `[B, L]` -> the last hidden state `[B, L, d_model]` (transformers' `T5EncoderModel`)."""

    def __init__(self, config: T5Config, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model, dtype=dtype, device=device)
        self.encoder = _Stack(config, dtype, device)
        self.offload: OffloadPolicy | None = None  # FluxOffloaded: blocks visit the device one at a time

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.shared(input_ids)
        table = self.encoder.block[0].layer[0].SelfAttention   # in CPU memory when offloaded
        bias = table.position_bias(input_ids.shape[1], table.relative_attention_bias.weight.device).to(x.device)
        for block in self.encoder.block:
            x = self.offload.run(block, x, bias) if self.offload is not None else block(x, bias)
        return self.encoder.final_layer_norm(x)
