"""The VAE decoder (diffusers' `AutoencoderKL`, decoder half): latents -> an RGB image in [-1, 1].

Module names follow diffusers (`decoder.mid_block.resnets.0.conv1`, `decoder.up_blocks.N.upsamplers.0.conv`,
`post_quant_conv` when the config uses it); the encoder's weights are not loaded. The pipeline undoes the
latent normalisation with `scaling_factor` and `shift_factor` before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VaeConfig:
    """The VAE's `config.json` (diffusers' names)."""

    latent_channels: int = 16  # channels of the latent image
    out_channels: int = 3  # image channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder widths; the decoder runs them reversed
    layers_per_block: int = 2  # resnets per decoder block minus one
    norm_num_groups: int = 32  # GroupNorm groups
    scaling_factor: float = 0.3611  # latents were multiplied by this
    shift_factor: float | None = 0.1159  # and shifted by this (None: 0)
    use_post_quant_conv: bool = True  # a 1x1 conv before the decoder (FLUX: False)
    mid_block_add_attention: bool = True  # self-attention in the middle block

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VaeConfig.block_out_channels {self.block_out_channels} must be non-empty multiples "
                             f"of norm_num_groups {self.norm_num_groups}")
        if self.scaling_factor == 0:
            raise ValueError("VaeConfig.scaling_factor must not be 0")

    @classmethod
    def from_dict(cls, data: dict) -> VaeConfig:
        """From `vae/config.json` (other keys ignored)."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)


class _Resnet(nn.Module):
    def __init__(self, n_in: int, n_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, n_in, eps=1e-6)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, n_out, eps=1e-6)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _Attention(nn.Module):
    """One-head self-attention over the pixels, group-normed, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x.view(batch, channels, height * width)).transpose(1, 2)
        out = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        out = self.to_out[0](out[:, 0].to(h.dtype))
        return out.transpose(1, 2).reshape(batch, channels, height, width) + x


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(channels, channels, groups), _Resnet(channels, channels, groups)])
        self.attentions = nn.ModuleList([_Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class _Upsampler(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:   # nearest upsampling of bf16 is missing on some backends (diffusers does this)
            x = x.float()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype))


class _UpBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_Resnet(n_in if i == 0 else n_out, n_out, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([_Upsampler(n_out)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class _Decoder(nn.Module):
    def __init__(self, config: VaeConfig) -> None:
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = _MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            _UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VaeDecoder(nn.Module):
    """Normalised latents `[B, C, h, w]` -> image `[B, 3, 8h, 8w]` in about [-1, 1]."""

    def __init__(self, config: VaeConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)
        self.decoder = _Decoder(config)
        self.to(dtype=dtype, device=device)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes latents as the transformer produces them (scaling and shift undone here)."""
        z = latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
