"""Tiny FLUX checkpoints shared by the diffusion tests (built once per session)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.loader.diffusion_loader import load_flux
from mistralrs.loader.spec import LoadKind, LoadSpec

from .tiny_flux import build_pipeline, save_pipeline


def load_tiny(path: str, arch: str = "Flux"):
    """Our pipeline for the checkpoint at `path`, in f32 on the CPU."""
    spec = LoadSpec(LoadKind.DIFFUSION, label="test", model_id=path, arch=arch, dtype=torch.float32)
    return load_flux(spec, torch.device("cpu"), torch.float32).pipeline


@pytest.fixture(scope="session", params=[False, True], ids=["schnell", "dev"])
def flux(request, tmp_path_factory):
    """(diffusers pipeline, our loaded pipeline, checkpoint dir)."""
    pipe = build_pipeline(guidance=request.param)
    path = save_pipeline(pipe, tmp_path_factory.mktemp("flux"))
    return pipe, load_tiny(path), path


