"""Sampling: per-request settings and the batched sampler."""

from mistralrs.sample.params import SampledToken, SamplingParams, SamplingRow
from mistralrs.sample.sampler import Sampler, dry_penalties

__all__ = ["SampledToken", "Sampler", "SamplingParams", "SamplingRow", "dry_penalties"]
