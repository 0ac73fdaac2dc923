"""What a pre-norm decoder layer is made of, as a family declares it for twins that run the same computation
another way.

A decoder layer class that follows the layout `h += attn(norm(h)); h += down(act(gate) * up)(norm(h))` (with the
optional Gemma additions below) says so with a method `decoder_layout() -> PreNormDecoderLayout`, returning handles
to its own modules (None when a module was replaced by one the layout cannot express, e.g. an AnyMoE MLP). The model runner attaches the fused C++ decoder layer (mistralrs/layers/fused_decode.py) to
every layer that has the method, when the execution options enable it; a model file knows nothing of that path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mistralrs.layers.attention import PagedAttention
    from mistralrs.layers.linear import Linear


@dataclass(frozen=True)
class PreNormDecoderLayout:
    """A decoder layer's modules in the Llama layout, optionally with Gemma 1/2/3's additions."""

    norms: tuple[nn.Module, nn.Module]  # (input norm, post-attention norm)
    linears: tuple[Linear, Linear, Linear, Linear]  # (qkv_proj, o_proj, gate_up_proj, down_proj)
    attn: PagedAttention  # geometry, scale, window, soft-cap and KV cache index
    act_fn: Callable[[torch.Tensor], torch.Tensor]  # the gated MLP's activation (applied to the gate half)
    feedforward_norms: tuple[nn.Module, nn.Module] | None = None  # sandwich (pre-, post-feedforward) norms
    qk_norms: tuple[nn.Module, nn.Module] | None = None  # per-head (q, k) norms before RoPE
    concat_qk: bool = False  # RoPE over cat(q, k) of the split heads (Gemma) rather than the q/k slice of qkv

    @property
    def is_sharded(self) -> bool:
        """Whether a linear layer is tensor-parallel (the fused C++ layer has no collectives: its twin is not
        attached and the plain modules run)."""
        return any(linear.tp is not None for linear in self.linears)
