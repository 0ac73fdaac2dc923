"""Mistral 3's projector (patch merger) and Pixtral's image processing against transformers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from mistralrs.vision.mistral3 import (
    Mistral3MultiModalProjector, PixtralImageOptions, image_grid_text, image_to_tensor, pad_and_stack,
    pixtral_options_from_files,
)

transformers = pytest.importorskip("transformers")
from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector as HFProjector  # noqa: E402
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil  # noqa: E402


def pixtral_replace_image_token(fake_processor, image_inputs: dict, index: int) -> str:
    """transformers' `PixtralProcessor.replace_image_token` (the class is never instantiated: it requires
    torchvision). Its module imports one size helper from the torchvision image processor module, which the Pil
    module defines too: that module stands in for it while the processor module is imported."""
    import importlib
    import sys

    name = "transformers.models.pixtral.image_processing_pixtral"
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    saved = sys.modules.get(name)
    sys.modules[name] = pil
    try:
        processor_cls = importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved
    return processor_cls.replace_image_token(fake_processor, image_inputs, index)


def _random_image(height: int, width: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def test_projector_matches_transformers():
    text = transformers.MistralConfig(hidden_size=48, rms_norm_eps=1e-5)
    vision = transformers.PixtralVisionConfig(hidden_size=16, patch_size=4, num_attention_heads=2)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2)
    torch.manual_seed(0)
    hf = HFProjector(config).eval()
    ours = Mistral3MultiModalProjector(16, 48, merge=2, norm_eps=1e-5, act="gelu", bias=False, dtype=torch.float32,
                                       device="cpu")
    ours.load_state_dict(hf.state_dict())  # the same names and shapes, every one
    sizes = [(16, 24), (8, 8), (24, 8)]  # pixels; patch grids (4, 6), (2, 2), (6, 2)
    features = torch.randn(sum(h * w // 16 for h, w in sizes), 16)
    with torch.no_grad():
        expected = hf(features, torch.tensor(sizes))
        got = ours(features, [(h // 4, w // 4) for h, w in sizes])
    assert got.shape == (6 + 1 + 3, 48)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("longest_edge", [64, 1024])
def test_images_match_pixtral_image_processor(longest_edge):
    images = [_random_image(50, 30, 0), _random_image(90, 130, 1, "L"), _random_image(8, 200, 2, "RGBA")]
    hf = PixtralImageProcessorPil(patch_size={"height": 4, "width": 4}, size={"longest_edge": longest_edge})
    expected = hf(images, patch_size=8, return_tensors="pt")  # what PixtralProcessor passes: patch * merge
    options = pixtral_options_from_files(hf.to_dict(), {"patch_size": 4, "spatial_merge_size": 2}, None)
    assert options.patch_size == 8 and options.longest_edge == longest_edge
    pixel_values, image_sizes = pad_and_stack([image_to_tensor(image, options) for image in images])
    assert image_sizes.tolist() == expected["image_sizes"].tolist()
    torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)


def test_max_edge_caps_the_longest_edge():
    options = pixtral_options_from_files({"size": {"longest_edge": 1540}, "patch_size": {"height": 14}},
                                         {"patch_size": 14, "spatial_merge_size": 2}, 512)
    assert options.longest_edge == 512 and options.patch_size == 28
    assert options.output_size(2000, 1000) == (532, 280)  # 512 x 256, rounded up to multiples of 28
    assert options.output_size(10, 30) == (28, 56)
    with pytest.raises(ValueError, match="longest_edge"):
        PixtralImageOptions(patch_size=28, longest_edge=0)


@pytest.mark.parametrize("size", [(16, 24), (8, 8), (32, 8)])
def test_grid_text_matches_pixtral_processor(size):
    fake = SimpleNamespace(patch_size=4, spatial_merge_size=2, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                           image_end_token="[IMG_END]")
    expected = pixtral_replace_image_token(fake, {"image_sizes": [size]}, 0)
    assert image_grid_text(size[0] // 8, size[1] // 8, "[IMG]", "[IMG_BREAK]", "[IMG_END]") == expected
