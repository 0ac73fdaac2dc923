"""Loading a `Which` selection without an engine, as the front door does: the API's conversion to a `LoadSpec`,
then the loader."""

from __future__ import annotations

from mistralrs.api.load_spec import load_spec
from mistralrs.loader.pipeline import LoadedModel, load


def load_which(which, **kwargs) -> LoadedModel:
    """`load(load_spec(which, **kwargs))`: the model and tokenizer `which` selects (kwargs: the load arguments)."""
    return load(load_spec(which, **kwargs))
