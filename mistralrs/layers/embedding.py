"""Token embedding table, dense or kept in GGML blocks (rows dequantized on lookup)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.distributed.group import current_group
from mistralrs.distributed.parallel import all_reduce, narrow_rows, vocab_ranges
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

    Built for a tensor-parallel group (`distributed.group.building_for`), the table holds only its rank's rows
    (`row_start`, `num_rows`: `distributed.parallel.vocab_ranges`); a lookup embeds the ids in that range, zeros
    the others and sums over the ranks (an all-reduce). The LM head splits its rows the same way
    (`vocab_shard`), so a tied head still shares the table (and its row lookup reads the same rank's rows).
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.params_device = torch.device(device)
        self.tp_group = current_group()  # the tensor-parallel group, or None: the whole table
        self.row_start, self.num_rows = vocab_ranges(vocab_size, self.tp_group)[
            0 if self.tp_group is None else self.tp_group.rank]  # this rank's rows of the table
        self.weight: nn.Parameter | torch.Tensor | None = nn.Parameter(
            torch.empty(self.num_rows, hidden_size, dtype=dtype, device=device), requires_grad=False)
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
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"embedding weight has shape {tuple(loaded.shape)}, "
                             f"expected {(self.vocab_size, self.hidden_size)}")
        for head in self.tied_heads:
            head.load_weight("weight", loaded)
        rows = loaded if self.tp_group is None else narrow_rows(loaded, self.row_start, self.num_rows)
        shared = next((w for w in (h.quant_method.dense_weight(h) for h in self.tied_heads) if w is not None), None)
        lookup = next((f for f in (h.quant_method.row_lookup(h) for h in self.tied_heads) if f is not None), None)
        if shared is not None and shared.dtype == self.dtype and tuple(shared.shape) == tuple(rows.shape):
            self._drop_dense()
            self.weight = shared  # the head's dense weight, one copy for both
        elif isinstance(rows, GGMLTensor) and self.keep_quantized:
            self._drop_dense()
            if lookup is not None:
                self.row_lookup = lookup  # the head's packed rows, one copy for both
            else:
                self.quantized = rows.to(self.params_device)
        else:
            copy_checked(self.weight, rows, "embedding weight")

    def _drop_dense(self) -> None:
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return self._lookup(input_ids)
        local_ids = input_ids - self.row_start
        outside = (local_ids < 0) | (local_ids >= self.num_rows)
        rows = self._lookup(local_ids.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(rows, self.tp_group)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of this rank's table."""
        if self.row_lookup is not None:
            return self.row_lookup(ids, self.dtype)
        if self.quantized is not None:
            return self.quantized.dequantize_selected_rows(ids, self.dtype)
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        table = f", quantized={self.quantized.ggml_type}" if self.quantized is not None else ""
        table = ", rows from the tied head" if self.row_lookup is not None else table
        rows = "" if self.tp_group is None else f", rows=[{self.row_start}, {self.row_start + self.num_rows})"
        return f"{self.vocab_size}, {self.hidden_size}{table}{rows}"
