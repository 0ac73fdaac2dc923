"""Idefics3 (SmolVLM) against transformers on a tiny random checkpoint: the processor (pixel values, masks and
token expansion), the pixel-shuffle connector, prompt logits with one and two images, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
from tests.loading import load_which
from tests.models.family_harness import TinyRunner
from tests.vision.siglip_helpers import (VisionDriver, idefics_greedy_matches, idefics_runner_matches, load_ours,
                                         random_image, save_checkpoint, sharpen, tiny_hf_tokenizer)

SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
PREPROCESSOR = {"size": {"longest_edge": 84}, "max_image_size": {"longest_edge": 28}}
# Idefics-style: the template prints <image> for an image part
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
IMAGES = [random_image(70, 45, seed=1), random_image(20, 30, seed=2)]


def hf_processor(tokenizer, **image_kwargs):
    from transformers import Idefics3Processor as HFProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return HFProcessor(Idefics3ImageProcessorPil(**{**PREPROCESSOR, **image_kwargs}), tokenizer, image_seq_len=4)


def config_dict(tokenizer) -> dict:
    return {"vision_config": VISION, "scale_factor": 2, "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
            "text_config": dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024)}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_hf_tokenizer(SPECIALS)


@pytest.mark.parametrize("variant", ["split", "no_split", "max_edge"])
def test_processor_matches_transformers(tokenizer, variant):
    kwargs = {"no_split": {"do_image_splitting": False}, "max_edge": {"size": {"longest_edge": 40}}}.get(variant, {})
    hf = hf_processor(tokenizer, **kwargs)
    split = {"do_image_splitting": False} if variant == "no_split" else {}
    ours = Idefics3Processor.from_checkpoint(
        ProcessorFiles(preprocessor_config={**PREPROCESSOR, **split}, processor_config={"image_seq_len": 4}),
        config_dict(tokenizer), max_edge=40 if variant == "max_edge" else None)
    prompt = "User:<image>Look.<image>\nAnd this?<end_of_utterance>\nAssistant:"
    expected = hf(text=prompt, images=IMAGES, return_tensors="pt")
    inputs = ours.preprocess(IMAGES)
    assert (inputs.tensors["rows"] > 0).all() == (variant != "no_split")
    torch.testing.assert_close(inputs.tensors["pixel_values"], expected["pixel_values"][0], atol=1e-5, rtol=0)
    assert torch.equal(inputs.tensors["pixel_attention_mask"], expected["pixel_attention_mask"][0].long())
    assert tokenizer(ours.expand_prompt(prompt, inputs))["input_ids"] == expected["input_ids"][0].tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert inputs.total_image_tokens == int((expected["input_ids"][0] == image_id).sum())
    with pytest.raises(ValueError, match="placeholder"):
        ours.expand_prompt("one <image> only", inputs)


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration as HFModel

    torch.manual_seed(0)
    hf = HFModel(Idefics3Config(**config_dict(tokenizer))).eval()
    sharpen(hf, seed=1)
    path = str(tmp_path_factory.mktemp("idefics3"))
    save_checkpoint(path, hf, hf_processor(tokenizer), CHAT_TEMPLATE)
    return hf, load_ours(Idefics3ForConditionalGeneration, path), path


def _case(tokenizer, num_images: int):
    prompt = "User:" + "<image>Say" * num_images + "<end_of_utterance>\nAssistant:"
    hf_inputs = hf_processor(tokenizer)(text=prompt, images=IMAGES[:num_images], return_tensors="pt")
    processor = Idefics3Processor.from_checkpoint(ProcessorFiles(PREPROCESSOR, {"image_seq_len": 4}),
                                                  config_dict(tokenizer), None)
    inputs = processor.preprocess(IMAGES[:num_images])
    ids = tokenizer(processor.expand_prompt(prompt, inputs))["input_ids"]
    assert ids == hf_inputs["input_ids"][0].tolist()
    return hf_inputs, inputs, ids


@pytest.mark.parametrize("num_images", [1, 2])
def test_prompt_logits_match_transformers(tokenizer, models, num_images):
    hf, ours, _ = models
    hf_inputs, inputs, ids = _case(tokenizer, num_images)
    with torch.inference_mode():
        expected = hf(**hf_inputs).logits[0]
    driver = VisionDriver(ours)
    driver.add(0, ids, inputs)
    (logits,) = driver.step([(0, len(ids))])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    # the same prompt in chunks that split the image runs
    chunked = VisionDriver(ours, seed=1)
    chunked.add(0, ids, inputs)
    bounds = [0, 9, 30, len(ids)]
    parts = [chunked.step([(0, b - a)])[0] for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(parts), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(tokenizer, models):
    hf, ours, _ = models
    idefics_greedy_matches(hf, ours, *_case(tokenizer, 2))


def test_greedy_tokens_through_a_runner(tokenizer, models):
    """Two images placed by the chat template, then a text-only request, through `Runner(Which.VisionPlain)`."""
    hf, _, path = models
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.Idefics3, dtype=ModelDType.F32))
    idefics_runner_matches(runner, hf, hf_processor(tokenizer), tokenizer, IMAGES)


def test_checkpoint_loads_text_only_with_plain(tokenizer, models):
    """`Which.Plain` on the Idefics3 checkpoint loads its Llama text decoder alone, with transformers' text logits."""
    hf, _, path = models
    loaded = load_which(Which.Plain(model_id=path, dtype=ModelDType.F32), show_progress=False)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    text_ids = tokenizer("User:hello there<end_of_utterance>\n")["input_ids"]
    (logits,) = TinyRunner(loaded.model).step([(0, text_ids)])
    with torch.inference_mode():
        expected = hf(input_ids=torch.tensor([text_ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
