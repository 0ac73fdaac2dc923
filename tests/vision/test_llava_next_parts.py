"""LLaVA-NeXT's anyres geometry and feature packing against transformers' functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mistralrs.vision.llava_next import (
    anyres_feature_count, fit_size, pack_image_features, select_best_resolution, tile_grid, unpadded_size,
)

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import get_patch_output_size  # noqa: E402
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution  # noqa: E402
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, unpad_image  # noqa: E402
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor  # noqa: E402

PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
SIZES = [(30, 40), (50, 24), (33, 33), (14, 9), (100, 7), (7, 100), (16, 32), (300, 500)]


@pytest.mark.parametrize("size", SIZES)
def test_geometry_matches_transformers(size):
    best = select_best_resolution(size, PINPOINTS)
    assert best == hf_select_best_resolution(size, PINPOINTS)
    image = torch.zeros(3, *size)
    assert fit_size(size, best) == get_patch_output_size(image, best, input_data_format="channels_first")
    grid = (best[0] // 16 * 4, best[1] // 16 * 4)
    assert unpadded_size(size, grid) == tuple(unpad_image(torch.zeros(1, *grid), torch.tensor(size)).shape[1:])


@pytest.mark.parametrize("size", SIZES)
def test_feature_count_matches_llava_next_processor(size):
    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS), patch_size=4,
                           num_additional_image_tokens=1,
                           _get_unpadded_features=lambda *a: LlavaNextProcessor._get_unpadded_features(None, *a))
    expected = LlavaNextProcessor._get_number_of_features(fake, size[0], size[1], 16, 16) - 1  # "default": no CLS
    assert anyres_feature_count(size, PINPOINTS, tile=16, patch=4) == expected


@pytest.mark.parametrize("size", SIZES)
def test_packing_matches_transformers(size):
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=16, patch_size=4), image_grid_pinpoints=PINPOINTS)
    grid = tile_grid(size, PINPOINTS, 16)
    features = torch.randn(1 + grid[0] * grid[1], 16, 8)
    newline = torch.randn(8)
    (expected,), lengths = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [features],
                                                             torch.tensor([size]), "default", newline)
    got = pack_image_features(features, size, grid, newline)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert got.shape[0] == anyres_feature_count(size, PINPOINTS, tile=16, patch=4) == int(lengths[0])


def test_empty_pinpoints_is_an_error():
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        select_best_resolution((10, 10), [])
