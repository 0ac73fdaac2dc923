"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest

from tests.models.family_harness import torch_threads


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models: one intra-op thread for the whole module (much faster than two on a busy two-core machine).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    with torch_threads(1):
        yield
