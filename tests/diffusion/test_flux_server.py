"""`POST /v1/images/generations` against the real server on a tiny FLUX model, driven by the openai client."""

from __future__ import annotations

import base64
import io
import os

import openai
import pytest
from PIL import Image

from mistralrs import ModelDType, Runner, Which
from mistralrs.server import BackgroundServer, ServerConfig
from tests.server.conftest import request

from .tiny_flux import build_pipeline, save_pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_pipeline(build_pipeline(guidance=True), tmp_path_factory.mktemp("flux-server"))
    runner = Runner(Which.DiffusionPlain(path, "flux", ModelDType.F32), seed=1)
    with BackgroundServer(runner, ServerConfig()) as server:
        yield server
    runner.close()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_gets_a_b64_image(client):
    result = client.images.generate(model="default", prompt="a lighthouse at dawn", response_format="b64_json",
                                    size="48x32")
    data_url = result.data[0].b64_json
    assert data_url.startswith("data:image/png;base64,") and result.data[0].url is None
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        assert image.size == (48, 32)


def test_reference_body_with_url_saves_a_png(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, body = request(server, "POST", "/v1/images/generations",
                           {"model": "default", "prompt": "a red cat", "response_format": "Url", "height": 16,
                            "width": 32, "n": 1})
    assert status == 200, body
    path = body["data"][0]["url"]
    assert os.path.isfile(tmp_path / path)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a cat", "height": 20, "width": 32}, "height"),
    ({"prompt": "a cat", "height": 16, "width": 0}, "width"),
    ({"prompt": "", "height": 16, "width": 16}, "prompt"),
    ({"prompt": "a cat", "response_format": "png"}, "response_format"),
])
def test_bad_image_requests_are_400_naming_the_field(server, body, param):
    status, reply = request(server, "POST", "/v1/images/generations", body)
    assert status == 400
    assert param in reply["error"]["message"] or reply["error"].get("param") == param


def test_chat_to_a_diffusion_model_is_400(client):
    with pytest.raises(openai.BadRequestError, match="diffusion model"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
