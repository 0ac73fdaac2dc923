"""Typed per-family config extras (`read_family_extras`, mistralrs/models/config.py): how a field reads its
config.json key, each family's extras from sparse and explicit configs, and that no model file reads
`config.extra` directly."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import mistralrs.models as models_package
from mistralrs.models.config import TextModelConfig, extra_key, read_family_extras
from mistralrs.models.deepseek import DeepseekDims, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from mistralrs.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaExtras, GemmaForCausalLM
from mistralrs.models.mixtral import MixtralExtras
from mistralrs.models.phi2 import PhiExtras
from mistralrs.models.phimoe import PhiMoEExtras
from mistralrs.models.starcoder2 import Starcoder2Extras

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def _config(**extra) -> TextModelConfig:
    return TextModelConfig.from_hf_dict(dict(BASE, **extra))


@dataclasses.dataclass(frozen=True)
class _Toy:
    plain: int | None = 1  # a key read as given
    loose: float = extra_key(2.0, aliases=("_loose",), falsy_is_default=True)  # `or`-style key with a spelling


def test_a_field_reads_its_key_as_given_else_the_variant_default_else_its_own():
    assert read_family_extras(_Toy, _config()) == _Toy(1, 2.0)
    assert read_family_extras(_Toy, _config(plain=None)).plain is None   # a null is a value
    assert read_family_extras(_Toy, _config(), {"plain": 7}).plain == 7
    assert read_family_extras(_Toy, _config(plain=3), {"plain": 7}).plain == 3


@pytest.mark.parametrize("extra, expected", [
    ({"loose": 5.0}, 5.0), ({"loose": None}, 2.0), ({"loose": 0}, 2.0), ({"_loose": 4.0}, 4.0),
    ({"loose": None, "_loose": 4.0}, 4.0), ({"loose": 3.0, "_loose": 4.0}, 3.0)])
def test_falsy_is_default_reads_the_first_non_empty_spelling(extra, expected):
    assert read_family_extras(_Toy, _config(**extra)).loose == expected


def test_gemma_extras_per_version():
    def extras(cls, **extra):
        return read_family_extras(GemmaExtras, _config(**extra), cls.EXTRA_DEFAULTS)

    assert extras(GemmaForCausalLM).attn_logit_softcapping is None
    gemma2 = extras(Gemma2ForCausalLM)
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)
    assert extras(Gemma2ForCausalLM, attn_logit_softcapping=None).attn_logit_softcapping is None   # null: no cap
    gemma3 = extras(Gemma3ForCausalLM, _sliding_window_pattern=3, rope_local_base_freq=None, hidden_activation="")
    assert (gemma3.final_logit_softcapping, gemma3.sliding_window_pattern) == (None, 3)
    assert (gemma3.rope_local_base_freq, gemma3.hidden_activation) == (10000.0, "gelu_pytorch_tanh")
    with pytest.raises(ValueError, match="sliding_window_pattern.*-2"):
        extras(Gemma3ForCausalLM, sliding_window_pattern=-2)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        extras(GemmaForCausalLM, use_bidirectional_attention=True)


def test_dense_and_moe_family_extras():
    assert read_family_extras(PhiExtras, _config(layer_norm_eps=None)) == PhiExtras(1e-5, False)
    assert read_family_extras(PhiExtras, _config(layer_norm_eps=1e-6)).layer_norm_eps == 1e-6
    with pytest.raises(ValueError, match="qk_layernorm"):
        read_family_extras(PhiExtras, _config(qk_layernorm=True))
    assert read_family_extras(Starcoder2Extras, _config()) == Starcoder2Extras(True, 1e-5)
    assert not read_family_extras(Starcoder2Extras, _config(use_bias=None, norm_epsilon=0)).use_bias
    assert read_family_extras(MixtralExtras, _config()) == MixtralExtras(8, 2)
    with pytest.raises(ValueError, match="'num_local_experts' must be a positive integer, got None"):
        read_family_extras(MixtralExtras, _config(num_local_experts=None))
    phimoe = read_family_extras(PhiMoEExtras, _config(num_local_experts=16, lm_head_bias=True))
    assert phimoe == PhiMoEExtras(16, 2, True, 0.01)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        read_family_extras(PhiMoEExtras, _config(router_jitter_noise=-1))


def test_deepseek_dims_keep_their_variant_defaults():
    v2 = DeepseekV2ForCausalLM.read_dims(_config(q_lora_rank=None, topk_method=None))
    assert (v2.q_lora_rank, v2.topk_method, v2.n_routed_experts, v2.num_nextn_predict_layers) == \
        (None, "greedy", 64, 0)
    v3 = DeepseekV3ForCausalLM.read_dims(_config(num_nextn_predict_layers=1, rope_interleave=False))
    assert (v3.topk_method, v3.n_routed_experts, v3.num_nextn_predict_layers, v3.rope_interleave) == \
        ("noaux_tc", 256, 1, False)
    assert DeepseekV3ForCausalLM.read_dims(_config(num_nextn_predict_layers=None)).num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        DeepseekV3ForCausalLM.read_dims(_config(num_nextn_predict_layers=-1))
    assert isinstance(v3, DeepseekDims)


def test_no_model_file_reads_config_extra_directly():
    folder = Path(models_package.__file__).parent
    reads = re.compile(r"\.extra(\.get\(|\[)")
    readers = [p.name for p in folder.glob("*.py") if p.name != "config.py" and reads.search(p.read_text())]
    assert readers == []
