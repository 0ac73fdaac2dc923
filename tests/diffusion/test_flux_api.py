"""`Runner.generate_image` on a tiny FLUX checkpoint: formats, seeding, the engine thread, refusals, bad input."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs import (ChatCompletionRequest, DiffusionArchitecture, ImageGenerationResponseFormat, ModelDType,
                       Runner, Which)
from mistralrs.diffusion.pipeline import FluxImagePipeline

from .tiny_flux import build_pipeline, save_pipeline

SEED = 42


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pipe = build_pipeline(guidance=False)
    return pipe, save_pipeline(pipe, tmp_path_factory.mktemp("flux-api"))


@pytest.fixture(scope="module")
def runner(checkpoint):
    runner = Runner(Which.DiffusionPlain(checkpoint[1], DiffusionArchitecture.Flux, ModelDType.F32), seed=SEED)
    yield runner
    runner.close()


def _decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))


def test_b64_image_equals_diffusers_with_the_runner_seed(checkpoint):
    """Runner(seed=S): the first image's latents are those of diffusers with Generator().manual_seed(S)."""
    pipe, path = checkpoint
    runner = Runner(Which.DiffusionPlain(path, "flux", "f32"), seed=SEED)
    try:
        response = runner.generate_image("a red cat", ImageGenerationResponseFormat.B64Json, height=32, width=48)
    finally:
        runner.close()
    assert len(response.data) == 1 and response.data[0].url is None and response.created > 0
    image = _decode(response.data[0].b64_json)
    theirs = pipe("a red cat", height=32, width=48, num_inference_steps=4,
                  generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert image.size == (48, 32)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(theirs, np.int16)).max() <= 1


def test_url_saves_a_png_in_the_working_directory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    response = runner.generate_image("the moon", "url", height=16, width=32)
    choice = response.data[0]
    assert choice.b64_json is None
    assert re.fullmatch(r"image-generation-[0-9a-f-]{36}\.png", choice.url)
    with Image.open(tmp_path / choice.url) as image:
        assert image.format == "PNG" and image.size == (32, 16)


def test_images_are_generated_on_the_engine_thread(runner, monkeypatch):
    threads = []
    generate = FluxImagePipeline.generate

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(FluxImagePipeline, "generate", recording)
    runner.generate_image("a cat", ImageGenerationResponseFormat.B64Json, height=16, width=16)
    assert threads == ["mistralrs-engine"]


def test_a_diffusion_model_refuses_chat_and_completion(runner):
    with pytest.raises(ValueError, match="diffusion model"):
        runner.send_chat_completion_request(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                                                  model="default"))
    with pytest.raises(ValueError, match="diffusion model"):
        runner.tokenize_text("hi", True)


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="", response_format="url"), "prompt"),
    (dict(prompt="a cat", response_format="png"), "response_format"),
    (dict(prompt="a cat", response_format="url", height=0), "height"),
    (dict(prompt="a cat", response_format="url", width=72), "width"),
    (dict(prompt="a cat", response_format="url", width=4096), "width"),
])
def test_bad_requests_name_the_field(runner, kwargs, field):
    with pytest.raises(ValueError, match=field):
        runner.generate_image(**kwargs)


@pytest.mark.parametrize("remove,field", [
    ("model_index.json", "model_index.json"), ("vae", "vae"), ("text_encoder_2", "text_encoder_2"),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer"), ("tokenizer_2", "tokenizer_2"),
    ("scheduler", "scheduler"),
])
def test_missing_components_name_the_component(checkpoint, tmp_path, remove, field):
    broken = tmp_path / "flux"
    shutil.copytree(checkpoint[1], broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else os.remove(target)
    with pytest.raises(ValueError, match=field):
        Runner(Which.DiffusionPlain(str(broken), "flux", "f32"))


def test_a_text_model_refuses_image_requests(tmp_path):
    from tests.tiny_models import make_tiny_model_dir

    make_tiny_model_dir(tmp_path, "llama")
    runner = Runner(Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32))
    try:
        with pytest.raises(ValueError, match="text model"):
            runner.generate_image("a cat", ImageGenerationResponseFormat.Url)
    finally:
        runner.close()


def test_isq_quantizes_the_transformer_and_t5_blocks(checkpoint):
    from mistralrs.quant.isq import IsqLinearMethod

    runner = Runner(Which.DiffusionPlain(checkpoint[1], "flux", "f32"), in_situ_quant="Q8_0", seed=SEED)
    try:
        models = runner.llm_engine._diffusion.pipeline.models
        assert isinstance(models.transformer.single_transformer_blocks[0].proj_mlp.quant_method, IsqLinearMethod)
        assert isinstance(models.t5.encoder.block[0].layer[0].SelfAttention.q.quant_method, IsqLinearMethod)
        image = _decode(runner.generate_image("a red cat", "b64_json", height=32, width=48).data[0].b64_json)
    finally:
        runner.close()
    theirs = checkpoint[0]("a red cat", height=32, width=48, num_inference_steps=4,
                           generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(np.asarray(image, np.int16) - np.asarray(theirs, np.int16)).mean() < 2   # close, not equal


def test_isq_with_flux_offloaded_is_refused(checkpoint):
    with pytest.raises(ValueError, match="FluxOffloaded"):
        Runner(Which.DiffusionPlain(checkpoint[1], "flux-offloaded", "f32"), in_situ_quant="Q8_0")


def test_generate_image_after_close_fails_at_once(checkpoint):
    runner = Runner(Which.DiffusionPlain(checkpoint[1], "flux", "f32"))
    runner.close()
    with pytest.raises(RuntimeError, match="shut down"):
        runner.generate_image("a cat", "url", height=16, width=16)


@pytest.mark.parametrize("kwargs,field", [(dict(prompt=" ", height=16, width=16), "prompt"),
                                          (dict(prompt="a", height=0, width=16), "height"),
                                          (dict(prompt="a", height=16, width=True), "width")])
def test_generate_image_command_validates_its_fields(kwargs, field):
    from mistralrs.engine.commands import GenerateImage

    with pytest.raises(ValueError, match=f"GenerateImage.{field}"):
        GenerateImage(**kwargs)
