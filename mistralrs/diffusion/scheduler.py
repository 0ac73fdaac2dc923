"""The flow-matching Euler schedule FLUX samples with (diffusers' `FlowMatchEulerDiscreteScheduler`, the subset the
FLUX checkpoints configure).

The sigmas run from 1 to 1/steps, shifted either by a fixed `shift` (schnell: 1.0, no change) or, with
`use_dynamic_shifting` (dev), by an exponential time shift whose `mu` grows linearly with the image's token count
between (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`); a terminal 0 is appended.
One Euler step is `x + (sigma_next - sigma) * velocity`, in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHNELL_STEPS = 4  # denoising steps of a model without guidance embedding (schnell)
DEV_STEPS = 50  # denoising steps of a guidance-distilled model (dev)
DEV_GUIDANCE = 4.0  # guidance scale fed to dev (REFERENCE §8.15)


@dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler/scheduler_config.json` (diffusers' names; defaults are FLUX.1-dev's time-shift constants)."""

    num_train_timesteps: int = 1000  # timestep = sigma x this
    shift: float = 1.0  # fixed shift (without dynamic shifting)
    use_dynamic_shifting: bool = False  # resolution-dependent exponential shift (dev)
    base_image_seq_len: int = 256  # image tokens at which mu = base_shift
    max_image_seq_len: int = 4096  # image tokens at which mu = max_shift
    base_shift: float = 0.5  # mu at base_image_seq_len
    max_shift: float = 1.15  # mu at max_image_seq_len

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"SchedulerConfig.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"SchedulerConfig.shift must be > 0, got {self.shift}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError("SchedulerConfig.max_image_seq_len must differ from base_image_seq_len")

    @classmethod
    def from_dict(cls, data: dict) -> SchedulerConfig:
        """From the checkpoint's scheduler config; options FLUX does not use must be off."""
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                       "stochastic_sampling", "shift_terminal"):
            if data.get(option):
                raise ValueError(f"scheduler_config.json: {option} is not supported")
        if data.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"scheduler_config.json: time_shift_type {data['time_shift_type']!r} is not supported "
                             "(only 'exponential')")
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for an image of `image_seq_len` packed tokens."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + (self.base_shift - slope * self.base_image_seq_len)


@dataclass(frozen=True)
class Schedule:
    """The sigmas of one generation and the matching timesteps."""

    sigmas: torch.Tensor  # [steps + 1] float32, from about 1 down to 0
    timesteps: torch.Tensor  # [steps] float32, sigma x num_train_timesteps

    @property
    def num_steps(self) -> int:
        """Denoising steps."""
        return len(self.timesteps)

    def step(self, index: int, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step from sigma[index] to sigma[index + 1], computed in float32, returned in `velocity`'s dtype."""
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)


def flow_match_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int,
                        device: torch.device | str = "cpu") -> Schedule:
    """The schedule of `num_steps` steps for an image of `image_seq_len` packed tokens."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        sigmas = math.exp(config.mu(image_seq_len)) / (math.exp(config.mu(image_seq_len)) + (1 / sigmas - 1))
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    sigmas_t = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
    timesteps = sigmas_t * config.num_train_timesteps
    return Schedule(torch.cat([sigmas_t, torch.zeros(1, device=device)]), timesteps)
