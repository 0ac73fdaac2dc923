"""Idefics2 against transformers on a tiny random checkpoint: the processor (with and without image splitting,
`max_edge`), the perceiver connector with padded images, prompt logits with one and two images, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from tests.vision.siglip_helpers import (VisionDriver, idefics_greedy_matches, idefics_runner_matches, load_ours,
                                         random_image, save_checkpoint, sharpen, tiny_hf_tokenizer)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
PERCEIVER = dict(hidden_size=64, resampler_n_latents=3, resampler_depth=2, resampler_n_heads=4,
                 resampler_head_dim=8, num_key_value_heads=2, rms_norm_eps=1e-5)
PREPROCESSOR = {"size": {"shortest_edge": 14, "longest_edge": 28}}
# sizes chosen so that the parts of a request differ in size (padding, partial patches)
# Idefics-style: the template prints <image> for an image part
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
IMAGES = [random_image(45, 26, seed=1), random_image(19, 33, seed=2)]


def hf_processor(tokenizer, **image_kwargs):
    from transformers import Idefics2Processor as HFProcessor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return HFProcessor(Idefics2ImageProcessorPil(**{**PREPROCESSOR, **image_kwargs}), tokenizer, image_seq_len=3)


def config_dict(tokenizer) -> dict:
    return {"vision_config": VISION, "perceiver_config": PERCEIVER,
            "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
            "text_config": dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=64,
                                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=None, max_position_embeddings=1024)}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_hf_tokenizer(SPECIALS)


def our_processor(tokenizer, split: bool = False, max_edge: int | None = None) -> Idefics2Processor:
    pp = {**PREPROCESSOR, "do_image_splitting": split}
    return Idefics2Processor.from_checkpoint(ProcessorFiles(pp, {"image_seq_len": 3}), config_dict(tokenizer),
                                             max_edge)


@pytest.mark.parametrize("variant", ["plain", "split", "max_edge"])
def test_processor_matches_transformers(tokenizer, variant):
    hf_kwargs = {"split": {"do_image_splitting": True},
                 "max_edge": {"size": {"shortest_edge": 14, "longest_edge": 20}}}.get(variant, {})
    hf = hf_processor(tokenizer, **hf_kwargs)
    ours = our_processor(tokenizer, split=variant == "split", max_edge=20 if variant == "max_edge" else None)
    prompt = "User:<image><image>Look.<image>x<end_of_utterance>\nAssistant:"
    images = IMAGES + [random_image(30, 30, seed=3)]
    expected = hf(text=prompt, images=images, return_tensors="pt")
    inputs = ours.preprocess(images)
    torch.testing.assert_close(inputs.tensors["pixel_values"], expected["pixel_values"][0], atol=1e-5, rtol=0)
    assert torch.equal(inputs.tensors["pixel_attention_mask"], expected["pixel_attention_mask"][0].long())
    expanded = ours.expand_prompt(prompt, inputs)
    assert tokenizer(expanded)["input_ids"] == expected["input_ids"][0].tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert inputs.total_image_tokens == int((expected["input_ids"][0] == image_id).sum())


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration as HFModel

    torch.manual_seed(0)
    hf = HFModel(Idefics2Config(**config_dict(tokenizer))).eval()
    sharpen(hf, seed=1)
    path = str(tmp_path_factory.mktemp("idefics2"))
    save_checkpoint(path, hf, hf_processor(tokenizer), CHAT_TEMPLATE)
    return hf, load_ours(Idefics2ForConditionalGeneration, path), path


def _case(tokenizer, num_images: int, split: bool = False):
    prompt = "User:" + "<image>Say" * num_images + "<end_of_utterance>\nAssistant:"
    hf_kwargs = {"do_image_splitting": True} if split else {}
    hf_inputs = hf_processor(tokenizer, **hf_kwargs)(text=prompt, images=IMAGES[:num_images], return_tensors="pt")
    processor = our_processor(tokenizer, split=split)
    inputs = processor.preprocess(IMAGES[:num_images])
    ids = tokenizer(processor.expand_prompt(prompt, inputs))["input_ids"]
    assert ids == hf_inputs["input_ids"][0].tolist()
    return hf_inputs, inputs, ids


@pytest.mark.parametrize("num_images,split", [(1, False), (2, False), (2, True)])
def test_prompt_logits_match_transformers(tokenizer, models, num_images, split):
    hf, ours, _ = models
    hf_inputs, inputs, ids = _case(tokenizer, num_images, split)
    assert not bool(inputs.tensors["pixel_attention_mask"].all()) or num_images == 1  # padded parts are covered
    with torch.inference_mode():
        expected = hf(**hf_inputs).logits[0]
    driver = VisionDriver(ours)
    driver.add(0, ids, inputs)
    (logits,) = driver.step([(0, len(ids))])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(tokenizer, models):
    hf, ours, _ = models
    idefics_greedy_matches(hf, ours, *_case(tokenizer, 2))


def test_greedy_tokens_through_a_runner(tokenizer, models):
    """Two images placed by the chat template, then a text-only request, through `Runner(Which.VisionPlain)`."""
    hf, _, path = models
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.Idefics2, dtype=ModelDType.F32))
    idefics_runner_matches(runner, hf, hf_processor(tokenizer), tokenizer, IMAGES)
