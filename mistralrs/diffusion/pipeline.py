"""The FLUX text-to-image pipeline: prompt -> CLIP and T5 embeddings -> Euler denoising of packed latents -> VAE ->
an RGB image, step for step as diffusers' `FluxPipeline` does it (same latents for the same generator).

Latents are `[1, C, 2*(H//16), 2*(W//16)]` noise packed into 2x2 patches (`[1, tokens, 4C]`); every image token
has the id (0, row, column), every text token (0, 0, 0). schnell (no guidance embedding) takes 4 steps, dev 50
with guidance 4.0 (scheduler.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mistralrs.diffusion.clip_text import ClipTextEncoder
from mistralrs.diffusion.flux_transformer import FluxTransformer
from mistralrs.diffusion.offload import OffloadPolicy
from mistralrs.diffusion.scheduler import (
    DEV_GUIDANCE, DEV_STEPS, SCHNELL_STEPS, SchedulerConfig, flow_match_schedule,
)
from mistralrs.diffusion.t5 import T5Encoder
from mistralrs.diffusion.text_tokenizers import PaddedTokenizer
from mistralrs.diffusion.vae import VaeDecoder

MAX_IMAGE_SIDE = 2048  # largest height or width accepted, in pixels
IMAGE_MULTIPLE = 16  # height and width must be multiples of this (VAE factor 8 x 2x2 packing)


def check_image_size(height: int, width: int) -> None:
    """ValueError naming `height` or `width` unless each is a positive multiple of 16 of at most MAX_IMAGE_SIDE."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value <= 0 or value % IMAGE_MULTIPLE or value > MAX_IMAGE_SIDE:
            raise ValueError(f"{name} must be a positive multiple of {IMAGE_MULTIPLE} of at most {MAX_IMAGE_SIDE} "
                             f"pixels, got {value}")


def check_prompt(prompt: str) -> None:
    """ValueError naming `prompt` unless it is a non-empty string."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt must not be empty")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, h/2 * w/2, 4C]` (2x2 patches, channel-major within a patch)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latent height `h` and width `w`."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[h * w, 3]` ids (0, row, column) of the packed image tokens of an `h` x `w` patch grid."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A decoded `[1, 3, H, W]` image in [-1, 1] -> an RGB PIL image (diffusers' postprocessing)."""
    array = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def _show_progress(show: bool | None) -> bool:
    if show is None:
        return sys.stderr.isatty() and os.environ.get("MISTRALRS_NO_PROGRESS", "") in ("", "0")
    return show


@dataclass
class FluxModels:
    """The loaded components of a FLUX checkpoint (diffusers layout)."""

    clip: ClipTextEncoder  # text_encoder: pooled prompt embedding
    clip_tokenizer: PaddedTokenizer  # tokenizer: 77 ids
    t5: T5Encoder  # text_encoder_2: per-token prompt features
    t5_tokenizer: PaddedTokenizer  # tokenizer_2: max_sequence_length ids
    transformer: FluxTransformer  # the denoiser
    vae: VaeDecoder  # latents -> pixels
    scheduler: SchedulerConfig  # the flow-matching schedule's constants


class FluxImagePipeline:
    """Generates images with a loaded FLUX model on `device`.

    With `offload` (FluxOffloaded), the T5 and transformer blocks stay in CPU memory and visit the device one at a
    time; everything else is moved to the device. Without it the whole model is moved to the device.
    """

    def __init__(self, models: FluxModels, *, device: torch.device, dtype: torch.dtype, offload: bool = False):
        self.models = models
        self.device = device  # where the computation runs
        self.dtype = dtype  # weight / activation dtype
        self.offloaded = offload  # FluxOffloaded
        if offload:
            models.transformer.offload = models.t5.offload = OffloadPolicy(device)
            resident = [child for name, child in models.transformer.named_children()
                        if name not in ("transformer_blocks", "single_transformer_blocks")]
            resident += [models.t5.shared, models.t5.encoder.final_layer_norm, models.clip, models.vae]
        else:
            resident = [models.clip, models.t5, models.transformer, models.vae]
        for module in resident:
            module.to(device)

    @property
    def guided(self) -> bool:
        """A guidance-distilled model (dev): 50 steps and a guidance scale by default."""
        return self.models.transformer.config.guidance_embeds

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latent image for an image of `height` x `width` pixels (even, for the 2x2 packing)."""
        factor = 2 * self.models.vae.config.scale_factor
        return 2 * (height // factor), 2 * (width // factor)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 features `[1, L, 4096]`, CLIP pooled `[1, 768]`, text ids `[L, 3]`)."""
        clip_ids = torch.tensor([self.models.clip_tokenizer(prompt)], device=self.device)
        pooled = self.models.clip(clip_ids).to(self.dtype)
        t5_ids = torch.tensor([self.models.t5_tokenizer(prompt)], device=self.device)
        text = self.models.t5(t5_ids).to(self.dtype)
        return text, pooled, torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype)

    def initial_latents(self, height: int, width: int,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed noise, image ids) drawn exactly as diffusers' `prepare_latents` draws them."""
        h, w = self.latent_size(height, width)
        channels = self.models.transformer.config.in_channels // 4
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn((1, channels, h, w), generator=generator, device=gen_device, dtype=self.dtype)
        return pack_latents(noise.to(self.device)), image_ids(h // 2, w // 2, self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompt: str, height: int, width: int, *, generator: torch.Generator | None = None,
                 num_steps: int | None = None, guidance_scale: float | None = None,
                 show_progress: bool | None = None) -> Image.Image:
        """One image for `prompt`; `num_steps` / `guidance_scale` None: 4 / none for schnell, 50 / 4.0 for dev."""
        check_prompt(prompt)
        check_image_size(height, width)
        text, pooled, txt_ids = self.encode_prompt(prompt)
        latents, img_ids = self.initial_latents(height, width, generator)
        steps = num_steps or (DEV_STEPS if self.guided else SCHNELL_STEPS)
        schedule = flow_match_schedule(self.models.scheduler, steps, latents.shape[1], self.device)
        guidance = None
        if self.guided:
            scale = DEV_GUIDANCE if guidance_scale is None else guidance_scale
            guidance = torch.full([1], scale, device=self.device, dtype=torch.float32).expand(latents.shape[0])
        indices = range(schedule.num_steps)
        if _show_progress(show_progress):
            from tqdm import tqdm
            indices = tqdm(indices, desc="denoising", unit="step", leave=False)
        for i in indices:
            timestep = schedule.timesteps[i].expand(latents.shape[0]).to(latents.dtype)
            velocity = self.models.transformer(latents, text, pooled, timestep / 1000, img_ids, txt_ids, guidance)
            latents = schedule.step(i, velocity, latents)
        return to_pil(self.models.vae(unpack_latents(latents, *self.latent_size(height, width))))
