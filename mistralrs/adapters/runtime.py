"""Per-token adapter weights for each engine step: one mechanism for per-request LoRA sets and X-LoRA scalings.

Every sequence of a model with separately held adapters carries an adapter set, fixed when its request is added
(the request's `adapters`, else the Runner's active set at that moment). Each step the `AdapterRuntime` turns the
step's sets into `ForwardBatch.adapter_weights` (`[num_tokens, num_adapters]`: 1 in the columns of a token's
adapters), or for X-LoRA runs the scaling pass and the classifier to get them (`[num_tokens, num_adapters]`, or
`[num_tokens, num_lora_layers, num_adapters]` with layerwise scalings), and runs the model with them; every
`LoraHook` applies them. A batch mixing requests with different sets thus gives each its own adapters.

The prefix cache is keyed by the set (`adapter_cache_salt` -> `Sequence.cache_salt`), so it stays on. X-LoRA's
scaling pass attends to its own history: it reads and writes a second KV cache of the same block layout (the
scratch cache), so the real pass's cache is never touched by it; both are functions of the token prefix, so
prefix caching stays valid (except with `tgt_non_granular_index`, which freezes scalings per sequence).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mistralrs.adapters.lora import LoraState, lora_state_of


def request_adapter_set(model: nn.Module, names: list[str] | None) -> tuple[str, ...] | None:
    """Checks a request's `adapters` against the model (for the API layer, before submitting): the set, or None
    when the request names none. ValueError naming an unknown adapter and the loaded ones, or when the model has
    no switchable adapters."""
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapters: must be a list of adapter names, got {names!r}")
    state = lora_state_of(model)
    if state is None or state.xlora is not None:
        if not names:
            return None
        kind = "is X-LoRA (its classifier chooses the adapters)" if state is not None else \
            "has no switchable LoRA adapters (adapters without preload_adapters are merged into the base)"
        raise ValueError(f"adapters: cannot use {list(names)!r}: this model {kind}")
    return state.check(list(names), "adapters")


def adapter_cache_salt(names: tuple[str, ...] | None) -> str | None:
    """The prefix-cache salt of an adapter set (None for the base model)."""
    if not names:
        return None
    return "lora:" + "\x00".join(sorted(names))


def adapter_runtime_of(model: nn.Module) -> AdapterRuntime | None:
    """The runtime of a model with separately held adapters; None for a model without."""
    state = lora_state_of(model)
    return None if state is None else AdapterRuntime(state)


class AdapterRuntime:
    """Runs a model's steps with per-token adapter weights (see the module docstring). Engine thread only."""

    def __init__(self, state: LoraState) -> None:
        self.state = state
        self._scratch: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # (id of K0, caches)
        self._frozen: dict[int, torch.Tensor] = {}  # seq_id -> frozen scalings row (tgt_non_granular_index)
        self._rows_key: tuple | None = None  # (sets, query lens, device) of the cached LoRA weights
        self._rows: torch.Tensor | None = None  # the cached LoRA weights

    @property
    def is_xlora(self) -> bool:
        """True when the adapters are X-LoRA experts."""
        return self.state.xlora is not None

    @property
    def kv_cache_factor(self) -> int:
        """KV caches the model needs: 2 for X-LoRA (the scaling pass has its own), 1 otherwise."""
        return 2 if self.is_xlora else 1

    def resolve(self, names: tuple[str, ...] | None) -> tuple[str, ...]:
        """A new sequence's adapter set: its request's, else the active set now (empty for X-LoRA)."""
        if self.is_xlora:
            return ()
        return self.state.active if names is None else tuple(names)

    def forward(self, model: nn.Module, batch, scheduled: list, sets: list[tuple[str, ...] | None]) -> torch.Tensor:
        """Runs `model` on `batch` (a ForwardBatch) with each sequence's adapters: `sets[i]` for `scheduled[i]`
        (a ScheduledSequence; None: the active set). Sets `batch.adapter_weights` and runs the model with `batch`
        active (`ForwardBatch.active`), where the hooks read them; returns the hidden states."""
        if self.is_xlora:
            weights = self._xlora_weights(model, batch, scheduled)
        else:
            weights = self._lora_weights(batch, [self.resolve(s) for s in sets])
        batch.adapter_weights = weights
        with batch.active():
            return model(batch.input_ids, batch.positions, batch)

    def _lora_weights(self, batch, sets: list[tuple[str, ...]]) -> torch.Tensor | None:
        key = (tuple(sets), tuple(batch.query_lens), batch.input_ids.device)
        if key != self._rows_key:
            rows = self.state.set_weights(sets)
            if rows is not None:
                lens = torch.tensor(batch.query_lens)
                rows = rows.repeat_interleave(lens, dim=0).to(batch.input_ids.device)  # [num_tokens, num_adapters]
            self._rows_key, self._rows = key, rows
        return self._rows

    def _scratch_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """The scaling pass's KV cache: same shapes and block layout as the real one, allocated once."""
        if self._scratch is None or self._scratch[0] != id(kv_caches[0][0]):
            self._scratch = (id(kv_caches[0][0]), [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kv_caches])
        return self._scratch[1]

    def _xlora_weights(self, model: nn.Module, batch, scheduled: list) -> torch.Tensor:
        spec = self.state.xlora
        seq_ids = [s.seq.seq_id for s in scheduled]
        self._frozen = {sid: row for sid, row in self._frozen.items() if sid in seq_ids}
        lens = torch.tensor(batch.query_lens, device=batch.input_ids.device)
        if all(sid in self._frozen for sid in seq_ids):
            scalings = torch.stack([self._frozen[sid] for sid in seq_ids]).repeat_interleave(lens, dim=0)
            return spec.finish(scalings)
        scratch = dataclasses.replace(batch, kv_caches=self._scratch_caches(batch.kv_caches),
                                      adapter_weights=spec.pass_weights(batch.num_tokens, batch.input_ids.device))
        with scratch.active():
            hidden = model(batch.input_ids, batch.positions, scratch)  # after the final norm
        scalings = spec.classifier(hidden.to(spec.classifier.last.weight.dtype))
        if spec.non_granular_index is not None:
            scalings = self._freeze(scalings, batch, scheduled, spec.non_granular_index)
        return spec.finish(scalings)

    def _freeze(self, scalings: torch.Tensor, batch, scheduled: list, index: int) -> torch.Tensor:
        """Non-granular scalings: a sequence with `index` completion tokens keeps the scalings of its last token
        from then on (its rows are replaced by the frozen row)."""
        for i, s in enumerate(scheduled):
            start, end = batch.query_start_locs[i], batch.query_start_locs[i + 1]
            seq_id = s.seq.seq_id
            if seq_id in self._frozen:
                scalings[start:end] = self._frozen[seq_id]
            elif s.seq.num_output_tokens >= index:
                self._frozen[seq_id] = scalings[end - 1].clone()
        return scalings
