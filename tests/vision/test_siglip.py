"""The SigLIP tower against transformers' SiglipVisionModel (fixed positions, Gemma 3) and the Idefics2/3 vision
transformers (bucketed positions with a patch mask), on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from mistralrs.vision.siglip import SiglipVisionConfig, SiglipVisionTransformer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=7)


def _ours(hf_module: torch.nn.Module, bucketed: bool) -> SiglipVisionTransformer:
    config = SiglipVisionConfig.from_hf_dict(TINY, {})
    ours = SiglipVisionTransformer(config, bucketed_positions=bucketed, dtype=torch.float32, device="cpu")
    ours.load_state_dict(hf_module.state_dict())
    return ours


def test_fixed_positions_match_siglip_vision_model():
    from transformers import SiglipVisionConfig as HFConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf = SiglipVisionModel(HFConfig(**TINY, vision_use_head=False)).eval()
    ours = _ours(hf, bucketed=False)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["idefics2", "idefics3"])
def test_bucketed_positions_with_padding_match_idefics(family):
    if family == "idefics2":
        from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig as HFConfig
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer as HFTower
    else:
        from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig as HFConfig
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer as HFTower

    torch.manual_seed(0)
    hf_config = HFConfig(**TINY)
    hf_config._attn_implementation = "sdpa"
    hf = HFTower(hf_config).eval()
    ours = _ours(hf, bucketed=True)
    pixels = torch.randn(3, 3, 28, 35)  # 4x5 patches; image 1 has 3x4 valid patches, image 2 2x5
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)
    mask[0] = True
    mask[1, :3, :4] = True
    mask[2, :2, :] = True
    with torch.no_grad():
        expected = hf(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        got = ours(pixels, mask)
        unmasked = ours(pixels[:1], None)
    valid = mask.view(3, -1)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmasked, got[:1], atol=1e-5, rtol=1e-5)
    # the bucketed positions differ from the fixed ones for a partial image (the mask is what makes them differ)
    assert not torch.equal(ours.embeddings.position_ids(mask[1:2]), torch.arange(20).view(1, 20))


def test_config_validation():
    with pytest.raises(ValueError, match="num_attention_heads"):
        SiglipVisionConfig.from_hf_dict({**TINY, "num_attention_heads": 5}, {})
    with pytest.raises(ValueError, match="missing"):
        SiglipVisionConfig.from_hf_dict({"hidden_size": 8}, {})
