"""The FLUX transformer (FLUX.1-schnell / -dev): double-stream and single-stream blocks over text + image tokens.

Module names follow diffusers' `FluxTransformer2DModel`, so the checkpoint's names load as they are. Each block
is modulated by the timestep (and, for dev, the guidance) embedding through AdaLN; queries and keys get a 3-axis
rotary embedding from the (t, row, column) ids of every token. The big projections are `layers.linear.Linear`, so
ISQ applies to them like to a text model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.diffusion.offload import OffloadPolicy
from mistralrs.layers.linear import Linear

ROPE_THETA = 10000  # base of the 3-axis rotary embedding
TIME_CHANNELS = 256  # width of the sinusoidal timestep / guidance projection


@dataclass(frozen=True)
class FluxConfig:
    """The transformer's `config.json` (diffusers' names)."""

    in_channels: int = 64  # packed latent channels (4 x the VAE's latent channels)
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128  # width of one head
    num_attention_heads: int = 24  # heads (inner width = heads x head_dim)
    joint_attention_dim: int = 4096  # T5 hidden width
    pooled_projection_dim: int = 768  # CLIP pooled width
    guidance_embeds: bool = False  # dev: the guidance scale is an input
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary width per id axis (sums to head_dim)
    patch_size: int = 1  # only 1 is used by FLUX.1

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"FluxConfig.axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if self.patch_size != 1:
            raise ValueError(f"FluxConfig.patch_size must be 1, got {self.patch_size}")
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"FluxConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> FluxConfig:
        """From `transformer/config.json` (unknown keys such as `_class_name` are ignored)."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        if "axes_dims_rope" in known:
            known["axes_dims_rope"] = tuple(known["axes_dims_rope"])
        return cls(**known)

    @property
    def inner_dim(self) -> int:
        """Hidden width of the token streams."""
        return self.num_attention_heads * self.attention_head_dim


class _Build:
    """dtype/device every layer of one model is created with."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dtype = dtype
        self.device = device

    def linear(self, n_in: int, n_out: int, prefix: str, bias: bool = True) -> Linear:
        return Linear(n_in, n_out, bias=bias, dtype=self.dtype, device=self.device, prefix=prefix)

    def rms(self, dim: int) -> nn.RMSNorm:
        return nn.RMSNorm(dim, eps=1e-6, dtype=self.dtype, device=self.device)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_CHANNELS) -> torch.Tensor:
    """Sinusoidal embedding `[cos, sin]` of `t` `[B]` (diffusers' `Timesteps(flip_sin_to_cos=True, shift 0)`)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (timestep, guidance and pooled-text embedders)."""

    def __init__(self, build: _Build, n_in: int, dim: int, prefix: str) -> None:
        super().__init__()
        self.linear_1 = build.linear(n_in, dim, f"{prefix}.linear_1")
        self.linear_2 = build.linear(dim, dim, f"{prefix}.linear_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    """The conditioning vector: timestep (+ guidance) embedding + projected CLIP pooled embedding."""

    def __init__(self, build: _Build, config: FluxConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.timestep_embedder = _MLPEmbedder(build, TIME_CHANNELS, dim, "time_text_embed.timestep_embedder")
        self.guidance_embedder = (_MLPEmbedder(build, TIME_CHANNELS, dim, "time_text_embed.guidance_embedder")
                                  if config.guidance_embeds else None)
        self.text_embedder = _MLPEmbedder(build, config.pooled_projection_dim, dim, "time_text_embed.text_embedder")

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("guidance: this FLUX model embeds the guidance scale (dev); it is required")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) of `x` `[B, S, D]`, scaled by `1 + scale` and shifted, per batch row."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class _AdaNorm(nn.Module):
    """LayerNorm without affine, modulated by `chunks` vectors from `linear(silu(temb))` (AdaLayerNormZero(Single))."""

    def __init__(self, build: _Build, dim: int, chunks: int, prefix: str) -> None:
        super().__init__()
        self.linear = build.linear(dim, chunks * dim, f"{prefix}.linear")
        self.chunks = chunks

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The modulated norm of `x` and the remaining modulation vectors (gate, then the MLP's shift/scale/gate)."""
        mods = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)
        return _modulate(x, mods[0], mods[1]), list(mods[2:])


def rotary_embedding(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[S, head_dim]` of every token's (t, row, column) ids `[S, 3]`, each frequency twice in a row."""
    cos_parts, sin_parts = [], []
    freqs_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    for axis, dim in enumerate(axes_dims):
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(ids[:, axis].float().to(freqs_dtype), inv)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate `x` `[B, S, H, D]` by interleaved pairs (diffusers' `apply_rotary_emb(use_real_unbind_dim=-1)`)."""
    cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class _Attention(nn.Module):
    """Joint attention: image q/k/v (+ text q/k/v for a double block), per-head RMS norms, rotary, SDPA."""

    def __init__(self, build: _Build, config: FluxConfig, prefix: str, joint: bool) -> None:
        super().__init__()
        dim, head_dim = config.inner_dim, config.attention_head_dim
        self.head_dim = head_dim
        self.to_q = build.linear(dim, dim, f"{prefix}.to_q")
        self.to_k = build.linear(dim, dim, f"{prefix}.to_k")
        self.to_v = build.linear(dim, dim, f"{prefix}.to_v")
        self.norm_q, self.norm_k = build.rms(head_dim), build.rms(head_dim)
        self.joint = joint
        if joint:
            self.add_q_proj = build.linear(dim, dim, f"{prefix}.add_q_proj")
            self.add_k_proj = build.linear(dim, dim, f"{prefix}.add_k_proj")
            self.add_v_proj = build.linear(dim, dim, f"{prefix}.add_v_proj")
            self.norm_added_q, self.norm_added_k = build.rms(head_dim), build.rms(head_dim)
            self.to_out = nn.ModuleList([build.linear(dim, dim, f"{prefix}.to_out.0")])
            self.to_add_out = build.linear(dim, dim, f"{prefix}.to_add_out")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                context: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:
            q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(context))), q], dim=1)
            k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(context))), k], dim=1)
            v = torch.cat([self._heads(self.add_v_proj(context)), v], dim=1)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if context is None:
            return out
        text_len = context.shape[1]
        return self.to_out[0](out[:, text_len:].contiguous()), self.to_add_out(out[:, :text_len].contiguous())


class _GeluProj(nn.Module):
    """`net.0` of diffusers' FeedForward: a projection followed by tanh-GELU."""

    def __init__(self, build: _Build, n_in: int, n_out: int, prefix: str) -> None:
        super().__init__()
        self.proj = build.linear(n_in, n_out, f"{prefix}.proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    """dim -> 4 dim (tanh-GELU) -> dim; `net.1` is diffusers' dropout slot."""

    def __init__(self, build: _Build, dim: int, prefix: str) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(build, dim, 4 * dim, f"{prefix}.net.0"), nn.Identity(),
                                  build.linear(4 * dim, dim, f"{prefix}.net.2")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


def _clip_half(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (diffusers' `FluxTransformerBlock`)."""

    def __init__(self, build: _Build, config: FluxConfig, prefix: str) -> None:
        super().__init__()
        dim = config.inner_dim
        self.norm1 = _AdaNorm(build, dim, 6, f"{prefix}.norm1")
        self.norm1_context = _AdaNorm(build, dim, 6, f"{prefix}.norm1_context")
        self.attn = _Attention(build, config, f"{prefix}.attn", joint=True)
        self.ff = _FeedForward(build, dim, f"{prefix}.ff")
        self.ff_context = _FeedForward(build, dim, f"{prefix}.ff_context")

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text stream, image stream) after the block."""
        normed, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        c_normed, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)
        attn, c_attn = self.attn(normed, rope, c_normed)
        x = x + gate[:, None] * attn
        x = x + gate_mlp[:, None] * self.ff(_modulate(x, shift_mlp, scale_mlp))
        context = context + c_gate[:, None] * c_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp))
        return _clip_half(context), x


class SingleStreamBlock(nn.Module):
    """Text + image as one sequence; attention and MLP in parallel (diffusers' `FluxSingleTransformerBlock`)."""

    def __init__(self, build: _Build, config: FluxConfig, prefix: str) -> None:
        super().__init__()
        dim, mlp = config.inner_dim, 4 * config.inner_dim
        self.norm = _AdaNorm(build, dim, 3, f"{prefix}.norm")
        self.proj_mlp = build.linear(dim, mlp, f"{prefix}.proj_mlp")
        self.proj_out = build.linear(dim + mlp, dim, f"{prefix}.proj_out")
        self.attn = _Attention(build, config, f"{prefix}.attn", joint=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text stream, image stream) after the block."""
        text_len = context.shape[1]
        joint = torch.cat([context, x], dim=1)
        normed, (gate,) = self.norm(joint, temb)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        out = torch.cat([self.attn(normed, rope), mlp], dim=2)
        joint = _clip_half(joint + gate[:, None] * self.proj_out(out))
        return joint[:, :text_len], joint[:, text_len:]


class _NormOut(nn.Module):
    """AdaLayerNormContinuous: LayerNorm modulated by (scale, shift) from `linear(silu(temb))`."""

    def __init__(self, build: _Build, dim: int) -> None:
        super().__init__()
        self.linear = build.linear(dim, 2 * dim, "norm_out.linear")

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return _modulate(x, shift, scale)


class FluxTransformer(nn.Module):
    """The FLUX denoiser: packed latents `[B, S_img, in_channels]` -> velocity of the same shape.

    `offload` (FluxOffloaded) keeps the blocks' weights in CPU memory and moves each block's weights to the
    compute device only while it runs; the embedders and the output layer stay on the device.
    """

    def __init__(self, config: FluxConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        build = _Build(dtype, device)
        dim = config.inner_dim
        self.time_text_embed = _TimeTextEmbed(build, config)
        self.context_embedder = build.linear(config.joint_attention_dim, dim, "context_embedder")
        self.x_embedder = build.linear(config.in_channels, dim, "x_embedder")
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(build, config, f"transformer_blocks.{i}") for i in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(build, config, f"single_transformer_blocks.{i}") for i in range(config.num_single_layers))
        self.norm_out = _NormOut(build, dim)
        self.proj_out = build.linear(dim, config.out_channels or config.in_channels, "proj_out")
        self.offload: OffloadPolicy | None = None  # set by the pipeline for FluxOffloaded

    def forward(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """`timestep` and `guidance` `[B]` in [0, 1] units (scaled by 1000 here, as diffusers does)."""
        x = self.x_embedder(latents)
        timestep = timestep.to(x.dtype) * 1000
        guidance = guidance.to(x.dtype) * 1000 if guidance is not None else None
        temb = self.time_text_embed(timestep, guidance, pooled)
        context = self.context_embedder(text)
        rope = rotary_embedding(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            if self.offload is not None:
                context, x = self.offload.run(block, x, context, temb, rope)
            else:
                context, x = block(x, context, temb, rope)
        return self.proj_out(self.norm_out(x, temb))
