"""mistral.rs for Python: an LLM inference engine on PyTorch with the `mistralrs` 0.5.0 Python API."""

from mistralrs.dependencies import import_core_dependencies

import_core_dependencies()  # first: a user's `torch.py`, `numpy.py`, ... must not stand in for the packages

from mistralrs.api import *  # noqa: E402, F403  (the public names are listed in mistralrs.api.__all__)
from mistralrs.api import __all__ as _api_names  # noqa: E402
from mistralrs.api.runner import Runner  # noqa: E402

__all__ = [*_api_names, "Runner"]
__version__ = "0.1.0"
