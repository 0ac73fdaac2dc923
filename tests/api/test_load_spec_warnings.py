"""`auto_map_params` is read (it sizes the automatic device map, tests/worker/test_auto_device_map.py), so the
Runner no longer warns that it is ignored."""

from __future__ import annotations

import warnings

from mistralrs import ModelDType, Runner, Which
from mistralrs.api.enums import TextAutoMapParams, VisionAutoMapParams
from mistralrs.api.load_spec import _auto_map, load_spec
from mistralrs.worker.auto_device_map import AutoMapParams
from tests.tiny_models import make_tiny_model_dir


def test_auto_map_params_reach_the_load_spec_without_a_warning():
    params = TextAutoMapParams(max_seq_len=1024, max_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = load_spec(Which.GGUF(quantized_model_id="dir", quantized_filename="m.gguf", auto_map_params=params))
    assert spec.auto_map == AutoMapParams(max_seq_len=1024, max_batch_size=2)
    assert load_spec(Which.GGUF(quantized_model_id="dir", quantized_filename="m.gguf")).auto_map is None
    assert _auto_map(VisionAutoMapParams(max_num_images=3)) == AutoMapParams(max_num_images=3, max_image_length=1024)


def test_the_runner_call_warns_nothing(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")
    which = Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32, auto_map_params=TextAutoMapParams())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Runner(which, show_progress=False).close()
    assert not [w for w in caught if "auto_map_params" in str(w.message)]
