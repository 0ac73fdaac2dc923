"""The part every decoder-only family shares: `self.model` (embeddings, layers, norm) under an LM head."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import head_shard, vocab_shard
from mistralrs.layers.linear import Linear, StackedParam, expected_checkpoint_names, load_checkpoint_weights
from mistralrs.layers.rotary import context_lens_per_token
from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec


# Checkpoint shards fused into one projection: (our fused module, checkpoint module, shard index).
QKV_PARAMS = (
    StackedParam("qkv_proj", "q_proj", 0),
    StackedParam("qkv_proj", "k_proj", 1),
    StackedParam("qkv_proj", "v_proj", 2),
)
GATE_UP_PARAMS = (
    StackedParam("gate_up_proj", "gate_proj", 0),
    StackedParam("gate_up_proj", "up_proj", 1),
)


class CausalLM(nn.Module):
    """Base of the `*ForCausalLM` classes: packed forward, float32 logits, paged-KV shape and weight loading.

    A family sets `self.config`, `self.model` and `self.lm_head`, and lists in `STACKED_PARAMS` how checkpoint
    shards fuse into its projections; it overrides a method only where it really differs.

    Built inside `distributed.group.building_for(group)`, every layer holds its rank's shard (see
    mistralrs/distributed/parallel.py) and `tp_group` keeps the group; the model's outputs are then the whole
    model's on every rank (the ranks run each step on the same inputs).
    """

    STACKED_PARAMS: ClassVar[tuple[StackedParam, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.tp_group = current_group()  # the tensor-parallel group the model is sharded over; None: whole

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, fb, inputs_embeds=inputs_embeds)

    def tied_lm_head(self, config, *, dtype: torch.dtype, device: torch.device | str, bias: bool = False) -> Linear:
        """The LM head `[hidden_size -> vocab_size]`, sharing `self.model.embed_tokens`' weight when the config ties
        them (build `self.model` first). Under a tensor-parallel group each rank holds its vocabulary rows and the
        logits are gathered."""
        head = Linear(config.hidden_size, config.vocab_size, bias=bias, dtype=dtype, device=device, prefix="lm_head",
                      tp=vocab_shard(self.tp_group, config.vocab_size))
        head.float_output = True  # logits in float32, unrounded where the kernels sum in float32
        if config.tie_word_embeddings:
            head.weight = self.model.embed_tokens.weight
        return head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[rows, hidden_size]` -> `[rows, vocab_size]` float32."""
        return self.lm_head(hidden).float()

    def kv_cache_spec(self) -> KVCacheSpec:
        """Shape of the paged KV cache this model reads (this rank's KV heads when sharded)."""
        heads = head_shard(self.config.num_attention_heads, self.config.num_key_value_heads, self.tp_group)
        return KVCacheSpec(self.config.num_hidden_layers, heads.num_kv_heads, self.config.head_dim)

    def _not_in_checkpoint(self, name: str) -> bool:
        """Checkpoint names that are accepted and dropped (rotary buffers; the LM head when tied)."""
        return name.endswith("rotary_emb.inv_freq") or (self.config.tie_word_embeddings and name == "lm_head.weight")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors (fusing shards per `STACKED_PARAMS`); returns the names consumed."""
        return load_checkpoint_weights(self, weights, self.STACKED_PARAMS, self._not_in_checkpoint)

    def expected_weight_names(self) -> set[str]:
        """HF checkpoint names this model needs (the tied LM head is not needed)."""
        return expected_checkpoint_names(self, self.STACKED_PARAMS, self._not_in_checkpoint)


class DecoderModel(nn.Module):
    """Base of the `*Model` stacks (the checkpoint's `model.` prefix): embeddings, decoder layers, final norm.

    A family sets `embed_tokens`, `layers`, `norm` and `rotary_emb`; each layer is called as
    `layer(hidden, cos, sin, fb)` with RoPE tables computed once per step (LongRoPE tables per sequence length).
    `inputs_embeds` (`[num_tokens, hidden]`, what `embed` returns with some rows replaced, e.g. by image features)
    stands in for the embedding of `input_ids` when given.
    """

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden]` input embeddings of `input_ids` (a family's scaling included)."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        context_lens = context_lens_per_token(fb) if self.rotary_emb.is_longrope else None
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype, context_lens)  # shared by all layers
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, fb)
        return self.norm(hidden)
