"""Llama 3.2 Vision (Mllama) parts against transformers on tiny random configs: the Pillow image processor (tiling,
aspect-ratio ids and masks), the vision encoder with the projector, and the gated cross-attention decoder layer
(with its cross-attention and full-text-row masks)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.mllama import (IMAGE_TOKEN, MllamaCrossAttentionDecoderLayer, MllamaProcessor,
                                     MllamaVisionConfig, MllamaVisionModel, optimal_canvas)
from tests.vision.siglip_helpers import random_image, sharpen

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PREPROCESSOR = {"size": {"height": 14, "width": 14}, "max_image_tiles": 4, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3}
# wide, tall, small (upscaled), large (downscaled), square
IMAGES = [random_image(45, 20, seed=1), random_image(11, 40, seed=2), random_image(6, 5, seed=3),
          random_image(90, 70, seed=4), random_image(28, 28, seed=5)]
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
              image_size=14, patch_size=7, max_num_tiles=4, vision_output_dim=48, intermediate_layers_indices=[0, 2])


def hf_image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(**PREPROCESSOR)


def our_processor() -> MllamaProcessor:
    return MllamaProcessor.from_checkpoint(ProcessorFiles(preprocessor_config=PREPROCESSOR), {}, None)


def test_processor_matches_transformers():
    hf = hf_image_processor()(images=[IMAGES], return_tensors="pt")
    ours = our_processor().preprocess(IMAGES)
    assert hf["pixel_values"].shape[:2] == (1, len(IMAGES))
    torch.testing.assert_close(ours.tensors["pixel_values"], hf["pixel_values"][0], rtol=0, atol=1e-6)
    assert ours.tensors["aspect_ratio_ids"].tolist() == hf["aspect_ratio_ids"][0].tolist()
    assert ours.tensors["aspect_ratio_mask"].tolist() == hf["aspect_ratio_mask"][0].tolist()
    assert ours.num_image_tokens == [1] * len(IMAGES)
    assert len(set(ours.tensors["aspect_ratio_ids"].tolist())) > 2  # the images pick different canvases


def test_canvas_prefers_least_upscaling_then_least_downscaling():
    # no canvas upscales: the largest scale (0.7), where 1x3 and 1x4 tie and 1x3 is smaller
    assert optimal_canvas(20, 45, 4, 14) == (14, 42)
    assert optimal_canvas(5, 6, 4, 14) == (14, 14)  # every canvas upscales: the smallest scale, 1x1
    assert optimal_canvas(14, 14, 4, 14) == (14, 14)  # scale 1 exactly


def test_expand_prompt_keeps_one_token_per_image():
    processor = our_processor()
    inputs = processor.preprocess(IMAGES[:2])
    prompt = f"{IMAGE_TOKEN}a{IMAGE_TOKEN}b"
    assert processor.expand_prompt(prompt, inputs) == prompt
    with pytest.raises(ValueError, match="placeholder"):
        processor.expand_prompt(IMAGE_TOKEN, inputs)


def hf_vision():
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig as HFConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel as HFVision

    torch.manual_seed(0)
    model = HFVision(HFConfig(**VISION)).eval()
    sharpen(model, seed=7)
    with torch.no_grad():  # gates away from 0 so every gated branch shows
        for name, param in model.named_parameters():
            if name.endswith("gate") or "gate_" in name:
                param.fill_(0.6)
    return model


def ours_from(hf_model) -> MllamaVisionModel:
    ours = MllamaVisionModel(MllamaVisionConfig.from_hf_dict(VISION), dtype=torch.float32, device="cpu")
    state = hf_model.state_dict()
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state)
    return ours


def test_vision_encoder_matches_transformers():
    hf = hf_vision()
    inputs = our_processor().preprocess(IMAGES)
    t = inputs.tensors
    with torch.no_grad():
        expected = hf(pixel_values=t["pixel_values"][None], aspect_ratio_ids=t["aspect_ratio_ids"][None],
                      aspect_ratio_mask=t["aspect_ratio_mask"][None]).last_hidden_state[0]
        got = ours_from(hf)(t["pixel_values"], t["aspect_ratio_ids"], t["aspect_ratio_mask"])
    assert got.shape == expected.shape == (len(IMAGES), 4, 5, 48)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            num_hidden_layers=2, cross_attention_layers=[1], vocab_size=50)


def test_cross_attention_layer_matches_transformers():
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import (MllamaCrossAttentionDecoderLayer as HFLayer,
                                                            _prepare_cross_attention_mask)

    config = MllamaTextConfig(**TEXT)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = HFLayer(config, layer_idx=1).eval()
    sharpen(hf, seed=3)
    with torch.no_grad():
        hf.cross_attn_attn_gate.fill_(0.7)
        hf.cross_attn_mlp_gate.fill_(-0.5)
    tokens, images, tiles, patches = 7, 2, 2, 3
    x = torch.randn(1, tokens, 32)
    states = torch.randn(1, images * tiles * patches, 32)
    sparse = torch.zeros(1, tokens, images, tiles, dtype=torch.int64)
    sparse[0, 2:5, 0, :2] = 1  # tokens 0-1: before the first image (attend to nothing)
    sparse[0, 5:, 1, :1] = 1  # the second image has one real tile
    mask, row = _prepare_cross_attention_mask(sparse, patches, torch.float32)
    with torch.no_grad():
        expected = hf(x, cross_attention_states=states, cross_attention_mask=mask, attention_mask=None,
                      full_text_row_masked_out_mask=row)[0]
        ours = MllamaCrossAttentionDecoderLayer(1, 32, 64, 4, 2, 1e-5, dtype=torch.float32, device="cpu")
        ours.load_state_dict(hf.state_dict())
        allowed = sparse[0].repeat_interleave(patches, dim=2).reshape(tokens, -1).bool()
        our_mask, our_row = ours.masks(allowed, torch.float32)
        got = ours.attend(x[0], ours.cross_attn.image_kv(states[0]), our_mask, our_row)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert our_row[:2].eq(0).all() and our_row[2:].eq(1).all()
