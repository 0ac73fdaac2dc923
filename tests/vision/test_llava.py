"""LLaVa against transformers on a tiny random checkpoint: processor, prompt logits, greedy tokens via a Runner."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.llava import LlavaForConditionalGeneration, LlavaProcessor
from tests.loading import load_which
from tests.tiny_models import CHARACTERS, SPECIAL_TOKENS
from tests.vision.tiny_vision import CHATML_WITH_IMAGES, make_tiny_llava_dir, sample_images, vision_prompt_logits

NUM_TOKENS = 16
BANNED = {i: -1e9 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS) + 1)}  # specials, <image>
PROMPT_ONE = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
PROMPT_TWO = "<|im_start|>user\nCompare <image> with\n<image>\nplease.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=[
    dict(),  # Llama decoder, layer -2, "default" (the class token dropped)
    dict(text_arch="mistral", feature_layer=[-3, -1], strategy="full"),  # two layers concatenated, class token kept
], ids=["llama-default", "mistral-full-2layers"])
def tiny_llava(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    hf_model, hf_processor = make_tiny_llava_dir(path, **request.param)
    return path, hf_model, hf_processor


def our_processor(path) -> LlavaProcessor:
    config = json.loads((path / "config.json").read_text())
    files = ProcessorFiles(processor_config=json.loads((path / "processor_config.json").read_text()))
    return LlavaProcessor.from_checkpoint(files, config, None)


def test_processor_matches_transformers(tiny_llava):
    path, _, hf_processor = tiny_llava
    processor = our_processor(path)
    images = sample_images()
    ours = processor.preprocess(images)
    theirs = hf_processor(images=images, text=["<image>"] * len(images), return_tensors="pt")
    assert ours.tensors["pixel_values"].shape == theirs["pixel_values"].shape
    assert torch.allclose(ours.tensors["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    expanded = processor.expand_prompt(PROMPT_TWO, processor.preprocess(images[:2]))
    hf_ids = hf_processor(images=images[:2], text=PROMPT_TWO, return_tensors="pt")["input_ids"][0].tolist()
    assert hf_processor.tokenizer(expanded, add_special_tokens=False)["input_ids"] == hf_ids
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        processor.expand_prompt(PROMPT_TWO, processor.preprocess(images[:1]))


@pytest.mark.parametrize("prompt,num_images", [(PROMPT_ONE, 1), (PROMPT_TWO, 2)])
def test_prompt_logits_match_transformers(tiny_llava, prompt, num_images):
    path, hf_model, hf_processor = tiny_llava
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    images = sample_images()[:num_images]
    hf_inputs = hf_processor(images=images, text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**hf_inputs).logits[0]
    inputs = loaded.vision_processor.preprocess(images)
    ours = vision_prompt_logits(loaded.model, hf_inputs["input_ids"][0].tolist(), inputs)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()


def hf_greedy(hf_model, hf_processor, images, prompt: str) -> list[int]:
    inputs = hf_processor(images=images, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(NUM_TOKENS):
            logits = hf_model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]
            logits[list(BANNED)] = float("-inf")
            token = int(logits.argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated


def chat(runner: Runner, content) -> list[int]:
    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": content}], model="llava", max_tokens=NUM_TOKENS, temperature=0.0,
        logit_bias=BANNED))
    return runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": image}}


def test_greedy_tokens_match_transformers_through_a_runner(tiny_llava, tmp_path):
    path, hf_model, hf_processor = tiny_llava
    images = sample_images()[:2]
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"image{i}.png"))
        image.save(files[-1])
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    # one image, placed by the front door (this template prints no placeholder): "<image>\n" before the text
    assert chat(runner, [image_part(files[0]), {"type": "text", "text": "What is in the picture?"}]) == \
        hf_greedy(hf_model, hf_processor, images[:1], PROMPT_ONE)
    # two images whose places the user typed (the reference's way), the parts in any order
    typed = [{"type": "text", "text": "Compare <image> with\n<image>\nplease."}, image_part(files[0]),
             image_part(files[1])]
    assert chat(runner, typed) == hf_greedy(hf_model, hf_processor, images, PROMPT_TWO)
    # two images placed by the front door where their parts are, text in between
    placed = [{"type": "text", "text": "Compare"}, image_part(files[0]), {"type": "text", "text": "with"},
              image_part(files[1]), {"type": "text", "text": "please."}]
    prompt = "<|im_start|>user\nCompare\n<image>\nwith\n<image>\nplease.<|im_end|>\n<|im_start|>assistant\n"
    assert chat(runner, placed) == hf_greedy(hf_model, hf_processor, images, prompt)


def test_a_template_that_prints_image_parts_places_the_images(tmp_path):
    path = tmp_path / "model"
    hf_model, hf_processor = make_tiny_llava_dir(path, chat_template=CHATML_WITH_IMAGES)
    image = sample_images()[0]
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    content = [{"type": "text", "text": "Look: "}, image_part(data_url(image))]
    prompt = "<|im_start|>user\nLook: <image><|im_end|>\n<|im_start|>assistant\n"
    assert chat(runner, content) == hf_greedy(hf_model, hf_processor, [image], prompt)
