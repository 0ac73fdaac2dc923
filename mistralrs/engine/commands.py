"""Typed control commands: changes to the served model that run on the engine thread between two steps.

The front door (`llm_engine.LLMEngine`) registers one handler per command type with the `Engine`, which runs a
command by its type (`Engine.call` waits for the handler's result, `Engine.post` does not). A new capability
(loading a draft model, generating an image) adds a command dataclass here and its handler in the front door.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mistralrs.quant.isq_types import IsqType


class Command:
    """Base of the control commands; the engine thread picks a command's handler by its exact type."""


@dataclass(frozen=True)
class ReIsq(Command):
    """Re-quantize the live model in situ (requests submitted afterwards see the new weights)."""

    isq_type: IsqType  # the new global ISQ type (the topology, MoQE and imatrix of the load are kept)

    def __post_init__(self) -> None:
        if not isinstance(self.isq_type, IsqType):
            raise ValueError(f"ReIsq.isq_type must be a parsed IsqType, got {self.isq_type!r}")


@dataclass(frozen=True)
class ActivateAdapters(Command):
    """Replace the active set of preloaded LoRA adapters."""

    names: tuple[str, ...]  # the adapters to activate (all preloaded)

    def __post_init__(self) -> None:
        if isinstance(self.names, str) or not all(isinstance(name, str) for name in self.names):
            raise ValueError(f"ActivateAdapters.names must be adapter names, got {self.names!r}")


@dataclass(frozen=True)
class GenerateImage(Command):
    """Generate one image with the served diffusion model; the handler returns it as a PIL image."""

    prompt: str  # the text to draw (non-empty)
    height: int  # pixels, a positive multiple of 16
    width: int  # pixels, a positive multiple of 16

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"GenerateImage.prompt must be a non-empty string, got {self.prompt!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GenerateImage.{name} must be a positive int, got {value!r}")


# Command type -> the function the engine thread runs it with (its return value goes back to `Engine.call`).
CommandHandlers = Mapping[type[Command], Callable[[Any], Any]]


def unknown_command(command: object, handlers: CommandHandlers) -> TypeError:
    """The error for a command no handler takes, naming the ones that exist."""
    known = ", ".join(sorted(kind.__name__ for kind in handlers)) or "none"
    return TypeError(f"unknown engine command {type(command).__name__!r}: this engine handles {known}")
