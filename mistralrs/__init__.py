"""mistral.rs for Python: an LLM inference engine on PyTorch with the `mistralrs` 0.5.0 Python API."""

import os
import sys

from mistralrs.dependencies import import_core_dependencies


def _import_with_passive_openmp_waits() -> None:
    """Imports the core packages; when torch is first loaded here, its OpenMP runtime waits passively.

    An OpenMP thread that waits for work (or for the other threads at the end of a parallel region) spins by default,
    for milliseconds: on a machine whose cores are busy with other processes it burns the time slices the others
    need, and SmolLM2 decoded at 2 tok/s on two threads against 36 with `OMP_WAIT_POLICY=PASSIVE` (see
    docs/benchmarks.md). The runtime reads the policy once, when torch loads it, so this is set only for that import
    and only when torch is not loaded yet and neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT` is set (they win); the
    environment is restored afterwards.
    """
    passive = "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys()
    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import_core_dependencies()  # first: a user's `torch.py`, `numpy.py`, ... must not stand in for the packages
        if passive:
            sys.modules["torch"].get_num_threads()  # an OpenMP runtime that reads it at first use reads it now
    finally:
        if passive:
            del os.environ["OMP_WAIT_POLICY"]


_import_with_passive_openmp_waits()

from mistralrs.api import *  # noqa: E402, F403  (the public names are listed in mistralrs.api.__all__)
from mistralrs.api import __all__ as _api_names  # noqa: E402
from mistralrs.api.runner import Runner  # noqa: E402

__all__ = [*_api_names, "Runner"]
__version__ = "0.1.0"
