"""Token embedding table, dense or kept in GGML blocks (rows dequantized on lookup)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.layers.linear import CheckpointModule, Linear, copy_checked
from mistralrs.quant.ggml_tensor import GGMLTensor


class VocabEmbedding(CheckpointModule):
    """Looks up `[num_tokens]` ids in a `[vocab_size, hidden_size]` table.

    The table is a dense `weight` in the model dtype, or, when a quant config has set `keep_quantized` and the
    checkpoint gives GGML blocks (GGUF), those blocks (`quantized`), of which only the looked-up rows are
    dequantized. A tied LM head either shares the dense `weight` Parameter (set by the model:
    `lm_head.weight = embed_tokens.weight`) or, once a quant config has given the head its own method, is
    registered with `tie_head` and loaded from the same checkpoint tensor; the table then reuses the head's
    dense weight when it keeps one, or else looks its rows up in the head's own storage when the head's form
    offers that (`row_lookup`: the int8 dot-product form, mistralrs/quant/qdot.py), so the table is held once.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.params_device = torch.device(device)
        self.weight: nn.Parameter | torch.Tensor | None = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.keep_quantized = False  # set by a QuantConfig: keep GGML blocks rather than a dense copy
        self.quantized: GGMLTensor | None = None  # the table as GGML blocks, when kept
        self.row_lookup = None  # (ids, dtype) -> rows, read from a tied head's storage, when it has such a lookup
        self.tied_heads: list[Linear] = []  # LM heads loaded from this table's checkpoint tensor (not submodules)

    def tie_head(self, head: Linear) -> None:
        """Loads `head` from this table's checkpoint tensor (a tied LM head with its own quant method)."""
        self.tied_heads.append(head)

    def checkpoint_param_names(self) -> list[str]:
        return ["weight"]

    def load_weight(self, param_name: str, loaded: torch.Tensor | GGMLTensor, shard_index: int | None = None) -> None:
        if param_name != "weight" or shard_index is not None:
            raise ValueError(f"embedding: unexpected checkpoint tensor {param_name!r} (shard {shard_index})")
        for head in self.tied_heads:
            head.load_weight("weight", loaded)
        shared = next((w for w in (h.quant_method.dense_weight(h) for h in self.tied_heads) if w is not None), None)
        lookup = next((f for f in (h.quant_method.row_lookup(h) for h in self.tied_heads) if f is not None), None)
        if shared is not None and shared.dtype == self.dtype and tuple(shared.shape) == tuple(loaded.shape):
            self._drop_dense()
            self.weight = shared  # the head's dense weight, one copy for both
        elif isinstance(loaded, GGMLTensor) and self.keep_quantized:
            if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
                raise ValueError(f"embedding weight has shape {tuple(loaded.shape)}, "
                                 f"expected {(self.vocab_size, self.hidden_size)}")
            self._drop_dense()
            if lookup is not None:
                self.row_lookup = lookup  # the head's packed rows, one copy for both
            else:
                self.quantized = loaded.to(self.params_device)
        else:
            copy_checked(self.weight, loaded, "embedding weight")

    def _drop_dense(self) -> None:
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.row_lookup is not None:
            return self.row_lookup(input_ids, self.dtype)
        if self.quantized is not None:
            return self.quantized.dequantize_selected_rows(input_ids, self.dtype)
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        table = f", quantized={self.quantized.ggml_type}" if self.quantized is not None else ""
        table = ", rows from the tied head" if self.row_lookup is not None else table
        return f"{self.vocab_size}, {self.hidden_size}{table}"
