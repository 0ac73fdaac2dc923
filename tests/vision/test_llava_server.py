"""Images over HTTP on a tiny LLaVa: the openai client, and the server never reading its files unless allowed."""

from __future__ import annotations

import openai
import pytest

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.server import BackgroundServer, ServerConfig
from tests.vision.tiny_vision import (
    LLAVA_BANNED, NUM_GREEDY_TOKENS, data_url, hf_llava_greedy, image_part, make_tiny_llava_dir, sample_images,
)

PROMPT = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    hf_model, hf_processor = make_tiny_llava_dir(path)
    images_dir = tmp_path_factory.mktemp("images")
    sample_images()[0].save(images_dir / "one.png")
    outside = tmp_path_factory.mktemp("outside")
    sample_images()[0].save(outside / "one.png")
    expected = hf_llava_greedy(hf_model, hf_processor, sample_images()[:1], PROMPT)
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    yield runner, images_dir, outside, expected
    runner.close()


def ask(server: BackgroundServer, url: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.chat.completions.create(
        model="llava", max_tokens=NUM_GREEDY_TOKENS, temperature=0.0,
        logit_bias={str(k): -100 for k in LLAVA_BANNED},
        messages=[{"role": "user", "content": [image_part(url), {"type": "text", "text": "What is it?"}]}])
    return response.choices[0].message.content


def test_chat_with_an_image_through_the_openai_client(llava):
    runner, images_dir, _, expected = llava
    with BackgroundServer(runner, ServerConfig()) as server:
        text = ask(server, data_url(sample_images()[0]))
    assert runner.tokenize_text(text, add_special_tokens=False) == expected


def test_the_server_reads_no_local_file_unless_a_directory_is_allowed(llava):
    runner, images_dir, outside, expected = llava
    inside = images_dir / "one.png"
    with BackgroundServer(runner, ServerConfig()) as server:
        for url in (inside.as_uri(), str(inside)):
            with pytest.raises(openai.BadRequestError) as info:
                ask(server, url)
            error = info.value.body
            assert error["param"] == "messages[0].content[0]" and error["code"] == "invalid_image"
            assert "not accepted" in error["message"] and str(images_dir) not in error["message"]
    with BackgroundServer(runner, ServerConfig(allowed_image_dir=str(images_dir))) as server:
        assert runner.tokenize_text(ask(server, inside.as_uri()), add_special_tokens=False) == expected
        with pytest.raises(openai.BadRequestError, match="outside the allowed image directory"):
            ask(server, str(outside / "one.png"))


def test_the_allowed_directory_must_exist(tmp_path):
    with pytest.raises(ValueError, match="allowed_image_dir must be an existing directory"):
        ServerConfig(allowed_image_dir=str(tmp_path / "nowhere"))


def test_the_cli_option_names_the_allowed_directory(tmp_path):
    from mistralrs.cli import build_parser, server_config_from_args

    config = server_config_from_args(build_parser().parse_args(["serve", "--allowed-image-dir", str(tmp_path)]))
    assert config.allowed_image_dir == str(tmp_path) and config.image_policy.allowed_dir == str(tmp_path.resolve())
    assert server_config_from_args(build_parser().parse_args(["serve"])).image_policy.allow_local_files is False
