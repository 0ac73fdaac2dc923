"""Loading details the real checkpoints need: sharded components, the non-legacy CLIP pooling, bf16, strict names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from mistralrs.diffusion.clip_text import ClipTextConfig, ClipTextEncoder
from mistralrs.layers.linear import load_checkpoint_weights

from .conftest import load_tiny

PROMPT = "a red cat on the moon"


def _shard(folder, single: str, index: str) -> None:
    """Split `folder/single` into two safetensors files named by an index file, as the hub checkpoints are."""
    tensors = load_file(folder / single)
    names = sorted(tensors)
    halves = {"part-00001.safetensors": names[: len(names) // 2], "part-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, folder / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / single).unlink()


def _image(pipeline):
    image = pipeline.generate(PROMPT, 32, 32, generator=torch.Generator().manual_seed(4), num_steps=2,
                              show_progress=False)
    return np.asarray(image, np.int16)


def test_sharded_components_load_like_single_files(flux, tmp_path):
    _, ours, path = flux
    copy = tmp_path / "sharded"
    shutil.copytree(path, copy)
    _shard(copy / "transformer", "diffusion_pytorch_model.safetensors",
           "diffusion_pytorch_model.safetensors.index.json")
    _shard(copy / "text_encoder_2", "model.safetensors", "model.safetensors.index.json")
    assert np.array_equal(_image(load_tiny(str(copy))), _image(ours))


def test_an_unused_weight_is_an_error_naming_it(flux, tmp_path):
    _, _, path = flux
    copy = tmp_path / "extra"
    shutil.copytree(path, copy)
    file = copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    tensors["decoder.surprise.weight"] = torch.zeros(2)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"vae: .*unexpected weights: decoder\.surprise\.weight"):
        load_tiny(str(copy))


def test_bf16_generation_stays_close_to_f32(flux):
    _, ours, path = flux
    from mistralrs.loader.diffusion_loader import load_flux
    from mistralrs.loader.spec import LoadKind, LoadSpec

    spec = LoadSpec(LoadKind.DIFFUSION, label="test", model_id=path, arch="Flux", dtype=torch.bfloat16)
    bf16 = load_flux(spec, torch.device("cpu"), torch.bfloat16).pipeline
    assert np.abs(_image(bf16) - _image(ours)).mean() < 8


@torch.no_grad()
def test_clip_pools_at_the_eos_id_when_the_config_names_one():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=16, eos_token_id=7)
    theirs = CLIPTextModel(config).eval()
    ours = ClipTextEncoder(ClipTextConfig.from_dict(config.to_dict()), dtype=torch.float32, device="cpu")
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in theirs.state_dict().items()}
    load_checkpoint_weights(ours, state.items(), (), lambda name: name.endswith("position_ids"))
    ids = torch.tensor([[3, 9, 7, 50, 50, 7, 1, 1]])   # the first 7 is the end of text; 50 is the highest id
    assert (ours(ids) - theirs(ids).pooler_output).abs().max() < 1e-4
