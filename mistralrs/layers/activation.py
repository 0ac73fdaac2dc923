"""Activation functions by their Hugging Face `hidden_act` names, and the gated `act(gate) * up` form."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ActFn = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (`gelu_pytorch_tanh`; the fused decode path recognises this function)."""
    return F.gelu(x, approximate="tanh")


# HF `hidden_act` name -> function. Add a name here to support it everywhere.
_ACTIVATIONS: dict[str, ActFn] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
}


def supported_activations() -> list[str]:
    """The `hidden_act` names this package understands, sorted."""
    return sorted(_ACTIVATIONS)


def get_act_fn(name: str) -> ActFn:
    """The activation function for an HF `hidden_act` name; ValueError listing the accepted names."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"hidden_act={name!r} is not supported; accepted values: {supported_activations()}"
        ) from None


def act_and_mul(gate_up: torch.Tensor, act_fn: ActFn) -> torch.Tensor:
    """Gated MLP activation: `gate_up` is `[..., 2 * d]` = cat(gate, up); returns `act(gate) * up` `[..., d]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up
