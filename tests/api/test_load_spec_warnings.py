"""`auto_map_params` is accepted but automatic device mapping is not built: the user is told so."""

from __future__ import annotations

import warnings

import pytest

from mistralrs import ModelDType, Runner, Which
from mistralrs.api.enums import TextAutoMapParams
from mistralrs.api.load_spec import load_spec
from tests.tiny_models import make_tiny_model_dir


def test_auto_map_params_warns_that_it_is_ignored():
    params = TextAutoMapParams(max_seq_len=4096, max_batch_size=2)
    with pytest.warns(UserWarning, match=r"Which\.GGUF\.auto_map_params is ignored: automatic device mapping"):
        load_spec(Which.GGUF(quantized_model_id="dir", quantized_filename="m.gguf", auto_map_params=params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_spec(Which.GGUF(quantized_model_id="dir", quantized_filename="m.gguf"))


def test_the_warning_points_at_the_runner_call(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")
    which = Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32, auto_map_params=TextAutoMapParams())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Runner(which).close()
    ours = [w for w in caught if "auto_map_params" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__
