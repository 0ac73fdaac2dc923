"""ISQ on every text architecture: quantization enters only through `Linear` and `FusedMoE` (DESIGN rule 1), so
each family's tiny model, quantized to Q8_0 while it loads, must keep `transformers`' logits within Q8_0's error,
with every projection (and every expert) actually quantized.

The tiny configs are the ones each family's own tests use (`tests/models`). Widths that are not a multiple of the
32-weight block stay unquantized, as in the reference (Phi-2's 80-wide hidden state).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import transformers

from mistralrs.layers.linear import Linear
from mistralrs.layers.moe import FusedMoE
from mistralrs.loader.safetensors_loader import iter_safetensors, load_model
from mistralrs.quant.isq import IsqLinearMethod, IsqQuantConfig, isq_layers
from mistralrs.quant.isq_moe import IsqMoEMethod
from tests.models import family_harness as harness

from tests.models import (
    test_deepseek,
    test_gemma,
    test_llama_family,
    test_mixtral,
    test_phi2,
    test_phi3,
    test_phimoe,
    test_starcoder2,
)

# |logits - transformers| / |transformers|, L2 over the prompt: 0.01-0.04 observed on dense families; with MoE a
# token's expert choice can flip under quantization noise (Phi-3.5-MoE's jittered sparsemixer most), hence more room.
REL_TOLERANCE = {"dense": 0.05, "moe": 0.15}


def _gemma(name):
    config_cls, hf_cls, _, overrides = test_gemma.FAMILIES[name]
    return config_cls(**test_gemma.TINY, **overrides), hf_cls, dict(norm_center=0.0, embed_std=0.15 / 8)


def _llama(name):
    config_cls, hf_cls, overrides = test_llama_family.FAMILIES[name]
    return config_cls(**test_llama_family.TINY, **overrides), hf_cls, {}


def _deepseek(name):
    config_cls, hf_cls, overrides = test_deepseek.CONFIGS[name]
    return config_cls(**test_deepseek.TINY, **overrides), hf_cls, {}


FAMILIES = {  # name -> () -> (config, transformers class, harness.sharpen arguments)
    "llama": lambda: _llama("llama"),
    "mistral": lambda: _llama("mistral"),
    "qwen2": lambda: _llama("qwen2"),
    "gemma": lambda: _gemma("gemma"),
    "gemma2": lambda: _gemma("gemma2"),
    "gemma3": lambda: _gemma("gemma3"),
    "phi2": lambda: (transformers.PhiConfig(**test_phi2.TINY), transformers.PhiForCausalLM, {}),
    "phi3": lambda: (transformers.Phi3Config(**test_phi3.TINY, **test_phi3.CONFIGS["phi3.5_mini"][0]),
                     transformers.Phi3ForCausalLM, {}),
    "starcoder2": lambda: (transformers.Starcoder2Config(**test_starcoder2.TINY), transformers.Starcoder2ForCausalLM,
                           dict(embed_std=0.05)),
    "mixtral": lambda: (transformers.MixtralConfig(**test_mixtral.TINY), transformers.MixtralForCausalLM, {}),
    "phimoe": lambda: (transformers.PhimoeConfig(**test_phimoe.TINY), transformers.PhimoeForCausalLM, {}),
    "deepseek_v2": lambda: _deepseek("v2"),
    "deepseek_v3": lambda: _deepseek("v3"),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_q8_0_isq_keeps_transformers_logits(name, tmp_path):
    config, hf_cls, sharpen = FAMILIES[name]()
    torch.manual_seed(0)
    hf = hf_cls(config).eval()
    harness.sharpen(hf, seed=1, **sharpen)
    hf.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        config_dict = json.load(f)
    files = sorted(glob.glob(os.path.join(str(tmp_path), "*.safetensors")))
    model = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu",
                       quant_config=IsqQuantConfig(isq="Q8_0"))

    layers = [layer.module for layer in isq_layers(model)]   # the reference's list (routers may be left out)
    linears = [m for m in layers if isinstance(m, Linear)]
    assert all(isinstance(m.quant_method, IsqLinearMethod) for m in linears)
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert all(m in layers and isinstance(m.quant_method, IsqMoEMethod) for m in experts)
    assert any(s.ggml is not None for m in linears for s in m.quant_method.states), "no layer was quantized"
    for linear in linears:   # every weight whose width holds whole 32-blocks is quantized
        assert all(s.ggml is not None for s in linear.quant_method.states) == (linear.in_features % 32 == 0)

    token_ids = harness.prompt(1, 20)
    (ours,) = harness.TinyRunner(model).step([(0, token_ids)])
    reference = harness.hf_logits(hf, token_ids)
    tolerance = REL_TOLERANCE["moe" if experts else "dense"]
    assert float((ours - reference).norm() / reference.norm()) < tolerance


def test_quantized_load_allocates_no_dense_copy_first(tmp_path, monkeypatch):
    """With a quant config the model is built with its dense linear weights on the meta device (on CUDA an
    `empty` weight is real memory); layers the config leaves dense (MoQE: everything but the experts and the
    head) get their storage afterwards, before loading, and no parameter stays on meta."""
    from mistralrs.layers.linear import UnquantizedLinearMethod

    devices: list[str] = []
    real = UnquantizedLinearMethod.create_weights

    def spy(self, layer, dtype, device):
        real(self, layer, dtype, device)
        devices.append(layer.weight.device.type)

    monkeypatch.setattr(UnquantizedLinearMethod, "create_weights", spy)
    config, hf_cls, _ = FAMILIES["mixtral"]()
    torch.manual_seed(0)
    hf_cls(config).save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        config_dict = json.load(f)
    files = sorted(glob.glob(os.path.join(str(tmp_path), "*.safetensors")))
    model = load_model(config_dict, iter_safetensors(files, torch.float32), dtype=torch.float32, device="cpu",
                       quant_config=IsqQuantConfig(isq="Q8_0", moqe=True))
    num_linears = sum(isinstance(m, Linear) for m in model.modules())
    assert devices[:num_linears] == ["meta"] * num_linears   # built: nothing dense allocated
    assert devices[num_linears:] and set(devices[num_linears:]) == {"cpu"}   # MoQE's dense layers, after prepare
    assert not any(p.is_meta for p in model.parameters())
