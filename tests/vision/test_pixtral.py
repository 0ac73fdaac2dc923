"""The Pixtral encoder against transformers' `PixtralVisionModel` on a tiny random config."""

from __future__ import annotations

import pytest
import torch

from mistralrs.vision.pixtral import PixtralVisionConfig, PixtralVisionModel, pixtral_rope_tables

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
            image_size=64, hidden_act="silu", rope_theta=10000.0)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.PixtralVisionModel(transformers.PixtralVisionConfig(**TINY)).eval()
    ours = PixtralVisionModel(PixtralVisionConfig.from_hf_dict(hf.config.to_dict()), dtype=torch.float32,
                              device="cpu")
    ours.load_state_dict(hf.state_dict())  # the same names and shapes, every one
    return hf, ours


@pytest.mark.parametrize("sizes", [[(16, 24)], [(16, 24), (24, 8)], [(8, 8), (24, 24), (16, 12)]])
def test_encoder_matches_transformers(sizes):
    hf, ours = _pair()
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.randn(len(sizes), 3, height, width)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        expected = hf(pixels, image_sizes=image_sizes, output_hidden_states=True)
        got = ours(pixels, image_sizes)
        got_all = ours(pixels, image_sizes, feature_layers=(0, 1, -1))
    assert got.shape == (sum(h * w // 16 for h, w in sizes), 32)
    torch.testing.assert_close(got, expected.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    hidden = expected.hidden_states
    torch.testing.assert_close(got_all, torch.cat([hidden[0], hidden[1], hidden[-1]], dim=-1)[0],
                               atol=1e-5, rtol=1e-5)


def test_images_do_not_attend_to_each_other():
    _, ours = _pair()
    first, second = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        alone = ours(first, [(16, 16)])
        together = ours(torch.cat([first, second]), [(16, 16), (16, 16)])
    torch.testing.assert_close(together[:16], alone, atol=1e-6, rtol=1e-6)


def test_rope_tables_match_transformers():
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

    config = transformers.PixtralVisionConfig(**TINY)
    rotary = PixtralVisionRotaryEmbedding(config)
    positions = torch.tensor([[r, c] for r in range(3) for c in range(5)])
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    our_cos, our_sin = pixtral_rope_tables([(3, 5)], 16, 10000.0, torch.float32, "cpu")
    half = 8
    torch.testing.assert_close(our_cos[:, 0], cos)
    torch.testing.assert_close(our_sin[:, 0], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_attention_heads"):
        PixtralVisionConfig(hidden_size=30, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                            patch_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        PixtralVisionConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            patch_size=0)
    _, ours = _pair()
    with pytest.raises(ValueError, match="out of range"):
        ours(torch.zeros(1, 3, 8, 8), [(8, 8)], feature_layers=(5,))
