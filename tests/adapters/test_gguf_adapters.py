"""LoRA and X-LoRA on a GGUF base (Which.LoraGGUF / Which.XLoraGGUF): the base stays quantized, the adapters run
in the activation dtype; the oracle is peft on transformers' dequantized reading of the same GGUF file."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

import tests.loader.gguf_fixtures as gguf_fixtures
from mistralrs import ModelDType, Which
from mistralrs.adapters.runtime import adapter_runtime_of
from mistralrs.layers.linear import Linear, UnquantizedLinearMethod
from tests.adapters.adapter_fixtures import (
    assert_close,
    hf_base,
    make_base_and_adapters,
    packed_logits,
    peft_logits,
    peft_lora_model,
    peft_xlora_model,
    scheduled,
    write_ordering,
    write_xlora_repo,
)
from tests.loading import load_which

TOKENS = list(range(3, 60, 3))
TOLERANCE = 5e-4   # relative: Q8_0 blocks read by two implementations


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(base dir, adapters dir, GGUF dir) with a Q8_0 GGUF of the base."""
    root = tmp_path_factory.mktemp("gguf_adapters")
    base, adapters = make_base_and_adapters(root, ["a1", "a2"])
    model = hf_base(base)
    (root / "gguf").mkdir()
    original = gguf_fixtures.gpt2_vocab   # the tiny vocab is smaller than a byte-level one; any unique tokens do
    gguf_fixtures.gpt2_vocab = lambda n, with_merges=True: ([f"<t{i}>" for i in range(n)], [1] * n, [])
    try:
        gguf_fixtures.write_tiny_gguf(model, model.config, root / "gguf" / "m.gguf", "llama", ggml_type="Q8_0")
    finally:
        gguf_fixtures.gpt2_vocab = original
    return base, adapters, root / "gguf"


def _dequantized(gguf_dir):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="m.gguf", dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _lora_gguf(dirs, tmp_path, **ordering) -> Which.LoraGGUF:
    base, adapters, gguf_dir = dirs
    return Which.LoraGGUF(quantized_model_id=str(gguf_dir), quantized_filename="m.gguf",
                          adapters_model_id=str(adapters), dtype=ModelDType.F32,
                          order=write_ordering(tmp_path / "ordering.json", base, **ordering))


def _runtime_logits(loaded, chunks, sets):
    runtime = adapter_runtime_of(loaded.model)
    return packed_logits(loaded, chunks, lambda b: runtime.forward(loaded.model, b, [None] * len(chunks), sets))


def test_lora_gguf_keeps_the_base_quantized_and_matches_peft(dirs, tmp_path):
    base, adapters, gguf_dir = dirs
    preload = [{"name": "a2", "adapter_model_id": str(adapters)}]
    loaded = load_which(_lora_gguf(dirs, tmp_path, order=["a1"], preload_adapters=preload), show_progress=False)
    assert loaded.tokenizer.tokenizer.get_vocab_size() == 99   # from base_model_id (tok_model_id=None)
    linears = [m for m in loaded.model.modules() if isinstance(m, Linear)]
    assert all(not isinstance(m.quant_method, UnquantizedLinearMethod) for m in linears)
    hooked = [m for m in linears if m.adapters]
    assert hooked and all(e[2].dtype == torch.float32 for m in hooked for e in m.adapters[0].entries)
    other = list(range(20, 2, -1))
    sets = [("a1",), ("a2",), ("a1", "a2"), ()]
    chunks = [TOKENS, other, TOKENS, other]
    got = _runtime_logits(loaded, chunks, sets)
    for tokens, names, logits in zip(chunks, sets, got):
        want = peft_logits(peft_lora_model(base, adapters, list(names), _dequantized(gguf_dir)), tokens)
        assert_close(logits, want, TOLERANCE)
    assert (got[0] - peft_logits(_dequantized(gguf_dir), TOKENS)).abs().max() > 1e-2


def test_lora_gguf_without_preload_applies_order(dirs, tmp_path):
    base, adapters, gguf_dir = dirs
    loaded = load_which(_lora_gguf(dirs, tmp_path, order=["a1", "a2"]), show_progress=False)
    runtime = adapter_runtime_of(loaded.model)   # quantized weights cannot be merged: hooked, all active
    got = packed_logits(loaded, [TOKENS], lambda b: runtime.forward(loaded.model, b, [None], [None]))[0]
    want = peft_logits(peft_lora_model(base, adapters, ["a1", "a2"], _dequantized(gguf_dir)), TOKENS)
    assert_close(got, want, TOLERANCE)


def test_xlora_gguf_matches_peft(dirs, tmp_path):
    base, adapters, gguf_dir = dirs
    kwargs = dict(layerwise_scalings=True, softmax_temperature=0.5)
    oracle = peft_xlora_model(base, adapters, ["a1", "a2"], kwargs, hf_model=_dequantized(gguf_dir))
    write_xlora_repo(tmp_path / "xlora", oracle, adapters, ["a1", "a2"], str(base))
    which = Which.XLoraGGUF(quantized_model_id=str(gguf_dir), quantized_filename="m.gguf", dtype=ModelDType.F32,
                            xlora_model_id=str(tmp_path / "xlora"),
                            order=write_ordering(tmp_path / "ordering.json", base, order=["a1", "a2"]))
    loaded = load_which(which, show_progress=False)
    runtime = adapter_runtime_of(loaded.model)
    got = packed_logits(loaded, [TOKENS], lambda b: runtime.forward(loaded.model, b, scheduled([0]), [None]))
    assert_close(got[0], peft_logits(oracle, TOKENS), TOLERANCE)
    config = json.loads((tmp_path / "xlora" / "xlora_config.json").read_text())
    (tmp_path / "xlora" / "xlora_config.json").write_text(json.dumps({**config, "base_model_id": "other/base"}))
    with pytest.raises(ValueError, match="base_model_id 'other/base' disagrees"):
        load_which(which, show_progress=False)


def test_gguf_adapter_errors_name_the_value(dirs, tmp_path):
    adapters = dirs[1]
    with pytest.raises(ValueError, match="'model.layers.0.mlp.w_nope'"):
        load_which(_lora_gguf(dirs, tmp_path, order=["a1"], layers={"model.layers.0.mlp.w_nope": 0}),
                      show_progress=False)
    shutil.copytree(adapters / "a1", adapters / "bad_rank", dirs_exist_ok=True)
    config = json.loads((adapters / "bad_rank" / "adapter_config.json").read_text())
    (adapters / "bad_rank" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="rank mismatch"):
        load_which(_lora_gguf(dirs, tmp_path, order=["bad_rank"]), show_progress=False)


def test_lora_and_xlora_on_ggml(dirs, tmp_path):
    from mistralrs.loader.safetensors_loader import iter_safetensors
    from tests.loader.ggml_fixtures import write_ggjt

    base, adapters, _ = dirs
    checkpoint = dict(iter_safetensors(sorted(str(p) for p in base.glob("*.safetensors")), None))
    write_ggjt(tmp_path / "m.bin", checkpoint, json.loads((base / "config.json").read_text()), "F32")
    hf_twin = lambda: hf_base(base, rms_norm_eps=1e-5)   # GGML files carry no epsilon; llama.cpp's is 1e-5
    common = dict(quantized_model_id=str(tmp_path), quantized_filename="m.bin", gqa=2, dtype=ModelDType.F32)
    order = write_ordering(tmp_path / "ordering.json", base, order=["a2"])
    loaded = load_which(Which.LoraGGML(adapters_model_id=str(adapters), order=order, **common),
                           show_progress=False)
    got = packed_logits(loaded, [TOKENS], lambda b: adapter_runtime_of(loaded.model).forward(
        loaded.model, b, [None], [None]))[0]
    assert_close(got, peft_logits(peft_lora_model(base, adapters, ["a2"], hf_twin()), TOKENS))
    oracle = peft_xlora_model(base, adapters, ["a1", "a2"], {}, hf_model=hf_twin())
    write_xlora_repo(tmp_path / "xlora", oracle, adapters, ["a1", "a2"], str(base))
    order = write_ordering(tmp_path / "ordering.json", base, order=["a1", "a2"])
    loaded = load_which(Which.XLoraGGML(xlora_model_id=str(tmp_path / "xlora"), order=order, **common),
                           show_progress=False)
    got = packed_logits(loaded, [TOKENS], lambda b: adapter_runtime_of(loaded.model).forward(
        loaded.model, b, scheduled([0]), [None]))[0]
    assert_close(got, peft_logits(oracle, TOKENS))
