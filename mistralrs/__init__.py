"""mistral.rs for Python: an LLM inference engine on PyTorch with the `mistralrs` 0.5.0 Python API."""

from mistralrs.api import *  # noqa: F403  (the public names are listed in mistralrs.api.__all__)
from mistralrs.api import __all__ as _api_names
from mistralrs.api.runner import Runner

__all__ = [*_api_names, "Runner"]
__version__ = "0.1.0"
