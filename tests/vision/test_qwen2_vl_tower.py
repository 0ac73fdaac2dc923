"""Qwen2-VL / Qwen2.5-VL vision towers against transformers' (tiny random configs, f32)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from mistralrs.vision.qwen2_5_vl import Qwen2_5VisionTransformer
from mistralrs.vision.qwen2_vl import QwenVisionConfig, QwenVisionTransformer, segment_attention

GRIDS = [[1, 6, 8], [1, 4, 4]]  # two images of different sizes (patch grids)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=gen))


def _compare(hf, qwen2_5: bool, grids: list[list[int]]) -> None:
    _randomize(hf, 0)
    tower_cls = Qwen2_5VisionTransformer if qwen2_5 else QwenVisionTransformer
    ours = tower_cls(QwenVisionConfig.from_hf(hf.config.to_dict(), qwen2_5), dtype=torch.float32, device="cpu")
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected
    c = hf.config
    num_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(num_patches, c.in_channels * c.temporal_patch_size * c.patch_size**2,
                         generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(pixels, grids)
    assert got.shape == (num_patches // c.spatial_merge_size**2, expected.shape[-1])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if len(grids) == 1:
        return
    # each image alone gives its own rows: attention does not cross images
    with torch.inference_mode():
        alone = ours(pixels[grids[0][0] * grids[0][1] * grids[0][2]:], grids[1:])
    torch.testing.assert_close(alone, got[-alone.shape[0]:], atol=1e-5, rtol=1e-5)


def test_qwen2_vl_tower_matches_transformers():
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=4, mlp_ratio=2, patch_size=4,
                                 spatial_merge_size=2, temporal_patch_size=2)
    _compare(Qwen2VisionTransformerPretrainedModel(config).eval(), False, GRIDS)


@pytest.mark.parametrize("grids", [GRIDS, [[1, 10, 6]]])
def test_qwen2_5_vl_tower_matches_transformers(grids):
    # window_size 16 px = 2 merged units of 2x2 patches of 4 px: 4x4-patch windows, cut at the edges (10 and 6 rows)
    config = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, out_hidden_size=24, intermediate_size=40, num_heads=4,
                                    patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                                    fullatt_block_indexes=[1])
    _compare(Qwen2_5_VisionTransformerPretrainedModel(config).eval(), True, grids)


def test_segment_attention_equals_masked_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(13, 2, 8, generator=gen) for _ in range(3))
    seg_lens = [4, 5, 4]
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor(seg_lens))
    mask = segment[:, None] == segment[None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3).transpose(0, 1)
    torch.testing.assert_close(segment_attention(q, k, v, seg_lens, 0.3), expected, atol=1e-6, rtol=1e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="depth"):
        QwenVisionConfig(depth=0, embed_dim=32, num_heads=4, mlp_hidden=8, out_hidden_size=8)
    with pytest.raises(ValueError, match="window_size"):
        QwenVisionConfig(depth=1, embed_dim=32, num_heads=4, mlp_hidden=8, out_hidden_size=8, window_size=10)


@pytest.mark.parametrize("qwen2_5", [False, True])
def test_bf16_tower_is_close_to_transformers_bf16(qwen2_5):
    if qwen2_5:
        config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, out_hidden_size=24, intermediate_size=40,
                                        num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                        window_size=16, fullatt_block_indexes=[1])
        hf = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    else:
        config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=4, mlp_ratio=2, patch_size=4,
                                     spatial_merge_size=2, temporal_patch_size=2)
        hf = Qwen2VisionTransformerPretrainedModel(config).eval()
    _randomize(hf, 0)
    hf = hf.to(torch.bfloat16)
    tower_cls = Qwen2_5VisionTransformer if qwen2_5 else QwenVisionTransformer
    ours = tower_cls(QwenVisionConfig.from_hf(hf.config.to_dict(), qwen2_5), dtype=torch.bfloat16, device="cpu")
    ours.load_state_dict(hf.state_dict())
    num_patches = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(num_patches, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output.float()
        got = ours(pixels, GRIDS)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
