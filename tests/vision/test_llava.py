"""LLaVa against transformers on a tiny random checkpoint: processor, prompt logits, greedy tokens via a Runner."""

from __future__ import annotations

import json

import pytest
import torch

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.llava import LlavaForConditionalGeneration, LlavaProcessor
from tests.loading import load_which
from tests.vision.tiny_vision import (
    CHATML_WITH_IMAGES, chat_tokens, data_url, hf_llava_greedy, image_part, make_tiny_llava_dir,
    sample_images, vision_prompt_logits,
)

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


def test_greedy_tokens_match_transformers_through_a_runner(tiny_llava, tmp_path):
    path, hf_model, hf_processor = tiny_llava
    images = sample_images()[:2]
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"image{i}.png"))
        image.save(files[-1])
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    # one image, placed by the front door (this template prints no placeholder): "<image>\n" before the text
    assert chat_tokens(runner, [image_part(files[0]), {"type": "text", "text": "What is in the picture?"}]) == \
        hf_llava_greedy(hf_model, hf_processor, images[:1], PROMPT_ONE)
    # two images whose places the user typed (the reference's way), the parts in any order
    typed = [{"type": "text", "text": "Compare <image> with\n<image>\nplease."}, image_part(files[0]),
             image_part(files[1])]
    assert chat_tokens(runner, typed) == hf_llava_greedy(hf_model, hf_processor, images, PROMPT_TWO)
    # two images placed by the front door where their parts are, text in between
    placed = [{"type": "text", "text": "Compare"}, image_part(files[0]), {"type": "text", "text": "with"},
              image_part(files[1]), {"type": "text", "text": "please."}]
    prompt = "<|im_start|>user\nCompare\n<image>\nwith\n<image>\nplease.<|im_end|>\n<|im_start|>assistant\n"
    assert chat_tokens(runner, placed) == hf_llava_greedy(hf_model, hf_processor, images, prompt)


def test_a_template_that_prints_image_parts_places_the_images(tmp_path):
    path = tmp_path / "model"
    hf_model, hf_processor = make_tiny_llava_dir(path, chat_template=CHATML_WITH_IMAGES)
    image = sample_images()[0]
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    content = [{"type": "text", "text": "Look: "}, image_part(data_url(image))]
    prompt = "<|im_start|>user\nLook: <image><|im_end|>\n<|im_start|>assistant\n"
    assert chat_tokens(runner, content) == hf_llava_greedy(hf_model, hf_processor, [image], prompt)


def test_in_situ_quant_applies_to_the_text_decoder_only(tiny_llava):
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod

    path, hf_model, _ = tiny_llava
    which = Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32)
    loaded = load_which(which, in_situ_quant="Q8_0")
    decoder_linears = [m for m in loaded.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder_linears and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder_linears)
    assert not any(isinstance(m, Linear) for m in loaded.model.vision_tower.modules())
    tower = loaded.model.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(tower, hf_model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight)
    inputs = loaded.vision_processor.preprocess(sample_images()[:1])
    prompt = [5] + [loaded.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    assert torch.isfinite(vision_prompt_logits(loaded.model, prompt, inputs)).all()


def test_what_vision_loading_refuses():
    from mistralrs.api.load_spec import load_spec

    from mistralrs.vision.registry import supported_vision_archs

    assert {arch.name.lower() for arch in VisionArchitecture} == {name.lower() for name in supported_vision_archs()}
    spec = load_spec(Which.VisionPlain(model_id="m", arch="llava", max_edge=512, imatrix="m.imatrix"),
                     in_situ_quant="Q4K")
    assert (spec.kind.value, spec.arch, spec.max_edge, spec.isq.imatrix) == ("vision", "LLaVA", 512, "m.imatrix")


def test_write_uqff_then_from_uqff_gives_the_same_model(tiny_llava, tmp_path):
    import shutil

    path, _, _ = tiny_llava
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    kwargs = dict(model_id=str(model_dir), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32)
    quantized = load_which(Which.VisionPlain(**kwargs, write_uqff=str(tmp_path / "out" / "llava-q8_0.uqff")),
                           in_situ_quant="Q8_0")
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path / "out"), arch=VisionArchitecture.LLaVA,
                                            dtype=ModelDType.F32, from_uqff="llava-q8_0.uqff"))
    inputs = quantized.vision_processor.preprocess(sample_images()[:2])
    prompt = [5] + [quantized.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    expected = vision_prompt_logits(quantized.model, prompt, inputs)
    assert torch.equal(vision_prompt_logits(reloaded.model, prompt, inputs), expected)
