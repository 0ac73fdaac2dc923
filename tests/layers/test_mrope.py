"""M-RoPE (Qwen2-VL's multimodal rotary) as a RotaryEmbedding variant, against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from mistralrs.layers.rotary import RotaryEmbedding, rope_type_of
from mistralrs.models.config import TextModelConfig

SECTION = [2, 3, 3]  # head_dim 16: 8 frequencies


def _positions() -> torch.Tensor:
    text = torch.arange(5)
    image_t, image_h, image_w = torch.full((6,), 5), 5 + torch.arange(6) // 3, 5 + torch.arange(6) % 3
    tail = 8 + torch.arange(4)
    return torch.stack([torch.cat([text, image_t, tail]), torch.cat([text, image_h, tail]),
                        torch.cat([text, image_w, tail])])


def test_mrope_tables_match_transformers():
    hf_config = Qwen2VLTextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                  rope_parameters={"rope_type": "default", "mrope_section": SECTION,
                                                   "rope_theta": 1000.0})
    hf = Qwen2VLRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(16, 1000.0, {"type": "mrope", "mrope_section": SECTION}, 4096, device="cpu")
    positions = _positions()
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    cos, sin = ours.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], hf_cos[0], atol=1e-6, rtol=0)
    folded = torch.cat([-hf_sin[0, :, :8], hf_sin[0, :, 8:]], dim=-1)  # our sin table carries rotate_half's sign
    torch.testing.assert_close(sin[:, 0], folded, atol=1e-6, rtol=0)
    assert not torch.equal(cos, ours.cos_sin(positions[0], torch.float32)[0])  # the image rows differ from 1-D


def test_equal_axes_are_plain_rope():
    ours = RotaryEmbedding(16, 1000.0, {"type": "mrope", "mrope_section": SECTION}, 4096, device="cpu")
    plain = RotaryEmbedding(16, 1000.0, None, 4096, device="cpu")
    positions = torch.arange(9)
    for table, expected in zip(ours.cos_sin(positions.expand(3, -1), torch.float32),
                               plain.cos_sin(positions, torch.float32)):
        torch.testing.assert_close(table, expected, atol=0, rtol=0)
    for table, expected in zip(ours.cos_sin(positions, torch.float32), plain.cos_sin(positions, torch.float32)):
        torch.testing.assert_close(table, expected, atol=0, rtol=0)


def test_both_config_layouts_keep_the_section():
    published = {"hidden_size": 32, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "vocab_size": 10, "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": SECTION}}
    transformers5 = {k: v for k, v in published.items() if k not in ("rope_theta", "rope_scaling")}
    transformers5["rope_parameters"] = {"rope_type": "default", "mrope_section": SECTION, "rope_theta": 1e6}
    for d in (published, transformers5):
        config = TextModelConfig.from_hf_dict(d)
        assert config.rope_type == "mrope" and config.rope_scaling["mrope_section"] == SECTION
        assert config.rope_theta == 1e6
    assert rope_type_of({"rope_type": "default"}) == "default"


def test_bad_sections_and_positions_are_rejected():
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding(16, 1000.0, {"type": "mrope", "mrope_section": [2, 3, 4]}, 4096, device="cpu")
    plain = RotaryEmbedding(16, 1000.0, None, 4096, device="cpu")
    with pytest.raises(ValueError, match="M-RoPE"):
        plain.cos_sin(_positions(), torch.float32)
