"""The whole FLUX pipeline against diffusers' FluxPipeline: same seed, same latents, the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs.diffusion.pipeline import MAX_IMAGE_SIDE

from .conftest import load_tiny

PROMPT = "a lighthouse at dawn"
HEIGHT, WIDTH = 32, 48


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_initial_latents_equal_diffusers_for_the_same_seed(flux):
    pipe, ours, _ = flux
    latents, ids = ours.initial_latents(HEIGHT, WIDTH, torch.Generator("cpu").manual_seed(11))
    theirs, their_ids = pipe.prepare_latents(1, 4, HEIGHT, WIDTH, torch.float32, torch.device("cpu"),
                                             torch.Generator("cpu").manual_seed(11))
    assert torch.equal(latents, theirs)
    assert torch.equal(ids, their_ids)


def test_image_equals_flux_pipeline(flux):
    """schnell-style: 4 steps, no guidance; dev-style: 50 steps, guidance 4.0, dynamic shift."""
    pipe, ours, _ = flux
    steps = 50 if ours.guided else 4
    theirs = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=4.0,
                  generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]
    mine = ours.generate(PROMPT, HEIGHT, WIDTH, generator=torch.Generator("cpu").manual_seed(3), show_progress=False)
    assert mine.size == (WIDTH, HEIGHT) == theirs.size
    assert _pixels(mine).std() > 1   # a real picture, not a flat one
    assert np.abs(_pixels(mine) - _pixels(theirs)).max() <= 1


def test_offloaded_gives_the_same_image(flux):
    """FluxOffloaded runs each block through the offload policy; on the CPU the result is identical."""
    _, ours, path = flux
    offloaded = load_tiny(path, arch="FluxOffloaded")
    assert offloaded.models.transformer.offload is not None
    images = [p.generate(PROMPT, HEIGHT, WIDTH, generator=torch.Generator("cpu").manual_seed(5), num_steps=2,
                         show_progress=False) for p in (ours, offloaded)]
    assert np.array_equal(_pixels(images[0]), _pixels(images[1]))


@pytest.mark.parametrize("height,width,field", [(0, 32, "height"), (32, 40, "width"), (-16, 32, "height"),
                                                (32, MAX_IMAGE_SIDE + 16, "width"), (33, 32, "height")])
def test_bad_sizes_name_the_field(flux, height, width, field):
    _, ours, _ = flux
    with pytest.raises(ValueError, match=field):
        ours.generate(PROMPT, height, width)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(flux, prompt):
    _, ours, _ = flux
    with pytest.raises(ValueError, match="prompt"):
        ours.generate(prompt, HEIGHT, WIDTH)


def test_progress_bar_only_when_asked_or_on_a_terminal(flux, capsys):
    _, ours, _ = flux
    ours.generate(PROMPT, 16, 16, num_steps=2)   # pytest's stderr is no terminal: quiet
    assert "denoising" not in capsys.readouterr().err
    ours.generate(PROMPT, 16, 16, num_steps=2, show_progress=True)
    assert "denoising" in capsys.readouterr().err
