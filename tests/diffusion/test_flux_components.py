"""Each FLUX component, loaded from a tiny diffusers-layout checkpoint, against diffusers / transformers in f32."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mistralrs.diffusion.pipeline import image_ids, pack_latents, unpack_latents
from mistralrs.diffusion.scheduler import SchedulerConfig, flow_match_schedule
from mistralrs.diffusion.text_tokenizers import load_clip_tokenizer

TOL = 1e-4


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < TOL


@torch.no_grad()
def test_clip_pooled_output_matches_transformers(flux):
    pipe, ours, _ = flux
    ids = torch.tensor([ours.models.clip_tokenizer("a red cat on the moon")])
    assert ids.shape == (1, 77)
    _close(ours.models.clip(ids), pipe.text_encoder(ids).pooler_output)


@torch.no_grad()
def test_t5_hidden_states_match_transformers(flux):
    pipe, ours, _ = flux
    ids = torch.tensor([ours.models.t5_tokenizer("a lighthouse at dawn")])
    assert ids.shape == (1, 512)
    _close(ours.models.t5(ids), pipe.text_encoder_2(ids)[0])


def test_tokenizers_match_the_oracle_tokenizers(flux):
    pipe, ours, _ = flux
    prompt = "A  Lighthouse at dawn!"
    theirs = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.models.clip_tokenizer(prompt) == theirs
    theirs_2 = pipe.tokenizer_2(prompt, padding="max_length", max_length=512, truncation=True).input_ids
    assert ours.models.t5_tokenizer(prompt) == theirs_2


def test_clip_tokenizer_from_vocab_and_merges(flux, tmp_path):
    """The original checkpoints ship vocab.json + merges.txt only: the BPE built from them tokenizes the same."""
    pipe, ours, path = flux
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(pipe.tokenizer.get_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with open(os.path.join(path, "tokenizer", "tokenizer_config.json")) as f:
        (folder / "tokenizer_config.json").write_text(f.read())
    prompt = "The red cat, on the MOON."
    assert load_clip_tokenizer(str(folder))(prompt) == ours.models.clip_tokenizer(prompt)


@torch.no_grad()
def test_transformer_matches_diffusers(flux):
    pipe, ours, _ = flux
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 16)
    text, pooled = torch.randn(1, 7, 32), torch.randn(1, 32)
    img, txt = image_ids(4, 4, torch.device("cpu"), torch.float32), torch.zeros(7, 3)
    timestep = torch.tensor([0.7])
    guidance = torch.tensor([4.0]) if ours.guided else None
    theirs = pipe.transformer(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                              timestep=timestep, img_ids=img, txt_ids=txt, guidance=guidance,
                              return_dict=False)[0]
    _close(ours.models.transformer(latents, text, pooled, timestep, img, txt, guidance), theirs)


@torch.no_grad()
def test_vae_decoder_matches_diffusers(flux):
    pipe, ours, _ = flux
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 6, 4)
    config = pipe.vae.config
    theirs = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    _close(ours.models.vae(latents), theirs)


def test_packing_round_trips_like_diffusers(flux):
    pipe, _, _ = flux
    latents = torch.randn(1, 4, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 1, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(image_ids(3, 4, torch.device("cpu"), torch.float32),
                       pipe._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("steps,seq_len", [(4, 16), (50, 16), (28, 4096)])
def test_schedule_matches_flow_match_euler(flux, steps, seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe, ours, _ = flux
    config = pipe.scheduler.config
    mu = calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    schedule = flow_match_schedule(ours.models.scheduler, steps, seq_len)
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)


def test_scheduler_config_refuses_options_flux_does_not_use():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="shift"):
        SchedulerConfig.from_dict({"shift": 0})
