"""Gemma 3 (multimodal) against transformers on a tiny random checkpoint: the processor (with pan-and-scan), the
pooling projector, the bidirectional attention inside image runs (and its reference twin), prompt logits with one
and two images, greedy tokens, and the checkpoint loaded text-only with `Which.Plain`."""

from __future__ import annotations

import json

import pytest
import torch

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ImageInputs, ProcessorFiles
from mistralrs.vision.gemma3 import Gemma3ForConditionalGeneration, Gemma3Processor
from mistralrs.worker.options import ExecutionOptions
from tests.loading import load_which
from tests.models.family_harness import TinyRunner
from tests.vision.siglip_helpers import (VisionDriver, banned_ids, data_url, hf_greedy, load_ours, random_image,
                                         runner_greedy, save_checkpoint, sharpen, tiny_hf_tokenizer)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)  # default vision_use_head: the pooling head is in the checkpoint, unused
PREPROCESSOR = {"size": {"height": 28, "width": 28}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 3,
                "pan_and_scan_min_ratio_to_activate": 1.2}
# Gemma-style: the template prints <start_of_image> for an image part
CHAT_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
                 "<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
IMAGES = [random_image(45, 26, seed=1), random_image(19, 33, seed=2)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_hf_tokenizer(list(TOKENS.values()), extra_special_tokens=TOKENS)


def hf_processor(tokenizer):
    from transformers import Gemma3Processor as HFProcessor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return HFProcessor(Gemma3ImageProcessorPil(**PREPROCESSOR), tokenizer, image_seq_length=4)


def config_dict(tokenizer) -> dict:
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in TOKENS.items()}
    return {"vision_config": VISION, "mm_tokens_per_image": 4, "image_token_index": ids["image_token"],
            "boi_token_index": ids["boi_token"], "eoi_token_index": ids["eoi_token"],
            "text_config": dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                                max_position_embeddings=1024, query_pre_attn_scalar=16)}


def our_processor(tokenizer, pan_and_scan: bool = False) -> Gemma3Processor:
    pp = {**PREPROCESSOR, **(PAN_AND_SCAN if pan_and_scan else {})}
    files = ProcessorFiles(pp, {"image_seq_length": 4}, {"extra_special_tokens": TOKENS})
    return Gemma3Processor.from_checkpoint(files, config_dict(tokenizer), max_edge=None)


def hf_inputs_for(tokenizer, prompt: str, images, pan_and_scan: bool = False):
    kwargs = PAN_AND_SCAN if pan_and_scan else {}
    return hf_processor(tokenizer)(text=prompt, images=images, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_processor_matches_transformers(tokenizer, pan_and_scan):
    prompt = "<start_of_turn>user\n<start_of_image>Look.<start_of_image>x<end_of_turn>\n"
    images = [random_image(60, 20, seed=3), IMAGES[1]]  # the first is cropped by pan-and-scan
    expected = hf_inputs_for(tokenizer, prompt, images, pan_and_scan)
    ours = our_processor(tokenizer, pan_and_scan)
    inputs = ours.preprocess(images)
    assert inputs.tensors["num_crops"].tolist() == ([3, 2] if pan_and_scan else [0, 0])
    torch.testing.assert_close(inputs.tensors["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert tokenizer(ours.expand_prompt(prompt, inputs))["input_ids"] == expected["input_ids"][0].tolist()
    image_id = tokenizer.convert_tokens_to_ids(TOKENS["image_token"])
    assert inputs.total_image_tokens == int((expected["input_ids"][0] == image_id).sum())


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration as HFModel

    torch.manual_seed(0)
    hf = HFModel(Gemma3Config(**config_dict(tokenizer))).eval()
    sharpen(hf, seed=1, skip=("language_model.", "mm_soft_emb_norm"))  # Gemma's `1 + w` norms (and all text
    #                                                                  weights small: its embeddings are scaled)
    path = str(tmp_path_factory.mktemp("gemma3"))
    save_checkpoint(path, hf, hf_processor(tokenizer), CHAT_TEMPLATE)
    return hf, path


@pytest.fixture(scope="module")
def models(checkpoint):
    hf, path = checkpoint
    return hf, load_ours(Gemma3ForConditionalGeneration, path)


def _case(tokenizer, num_images: int):
    prompt = "<start_of_turn>user\n" + "<start_of_image>Say" * num_images + "<end_of_turn>\n<start_of_turn>model\n"
    hf_inputs = hf_inputs_for(tokenizer, prompt, IMAGES[:num_images])
    processor = our_processor(tokenizer)
    inputs = processor.preprocess(IMAGES[:num_images])
    ids = tokenizer(processor.expand_prompt(prompt, inputs))["input_ids"]
    assert ids == hf_inputs["input_ids"][0].tolist()
    return hf_inputs, inputs, ids


@pytest.mark.parametrize("num_images", [1, 2])
def test_prompt_logits_match_transformers(tokenizer, models, num_images):
    hf, ours = models
    hf_inputs, inputs, ids = _case(tokenizer, num_images)
    with torch.inference_mode():
        expected = hf(**hf_inputs).logits[0]
        causal = hf(**{k: v for k, v in hf_inputs.items() if k != "token_type_ids"}).logits[0]
    assert (expected - causal).abs().max() > 1e-2  # the bidirectional image attention matters here
    driver = VisionDriver(ours)
    driver.add(0, ids, inputs)
    (logits,) = driver.step([(0, len(ids))])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    # chunks that keep every image run whole give the same logits
    image_id = ours.image_token_id
    first_image = ids.index(image_id)
    chunked = VisionDriver(ours, seed=1)
    chunked.add(0, ids, inputs)
    bounds = [0, first_image, first_image + 4, len(ids)]
    parts = [chunked.step([(0, b - a)])[0] for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(parts), expected, atol=1e-4, rtol=0)


def test_bidirectional_blocks_in_packed_steps_agree_with_reference_twin(tokenizer, models):
    """Packed steps (a prompt with images next to a text-only prompt, then a decode) with a chunk that splits an
    image run: the SDPA path equals the reference twin; the text-only prompt equals transformers'."""
    hf, ours = models
    _, inputs, ids = _case(tokenizer, 2)
    text_ids = tokenizer("<start_of_turn>user\nhello there<end_of_turn>\n")["input_ids"]
    results = {}
    for name in ("sdpa", "reference"):
        driver = VisionDriver(ours, options=ExecutionOptions(attention_backend=name), seed=2)
        driver.add(0, ids, inputs)
        driver.add(1, text_ids, None)
        split = ids.index(ours.image_token_id) + 2  # splits the first image's run
        first = driver.step([(1, len(text_ids)), (0, split)])
        driver.extend(1, 5)
        second = driver.step([(0, len(ids) - split), (1, 1)])
        results[name] = torch.cat(first + second)
    torch.testing.assert_close(results["reference"], results["sdpa"], atol=1e-5, rtol=0)
    with torch.inference_mode():
        expected_text = hf(input_ids=torch.tensor([text_ids])).logits[0]
    torch.testing.assert_close(results["sdpa"][:len(text_ids)], expected_text, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(tokenizer, models):
    hf, ours = models
    hf_inputs, inputs, ids = _case(tokenizer, 2)
    expected, tokens, types = [], hf_inputs["input_ids"], hf_inputs["token_type_ids"]
    with torch.inference_mode():
        for _ in range(16):
            next_token = hf(input_ids=tokens, pixel_values=hf_inputs["pixel_values"],
                            token_type_ids=types).logits[0, -1].argmax()
            expected.append(int(next_token))
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
            types = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], dim=1)
    driver = VisionDriver(ours)
    driver.add(0, ids, inputs)
    assert driver.greedy(0, 16) == expected


def test_checkpoint_loads_text_only_with_plain(tokenizer, checkpoint):
    hf, path = checkpoint
    loaded = load_which(Which.Plain(model_id=path, dtype=ModelDType.F32), show_progress=False)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.max_model_len == 1024
    text_ids = tokenizer("<start_of_turn>user\nhello there<end_of_turn>\n")["input_ids"]
    (logits,) = TinyRunner(loaded.model).step([(0, text_ids)])
    with torch.inference_mode():
        expected = hf(input_ids=torch.tensor([text_ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_config_errors(tokenizer):
    config = config_dict(tokenizer)
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        Gemma3ForConditionalGeneration({**config, "mm_tokens_per_image": 5}, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="placeholder"):
        our_processor(tokenizer).expand_prompt("no image here", ImageInputs({"num_crops": torch.tensor([0])}, [4],
                                                                            "image:x"))


def test_greedy_tokens_through_a_runner(tokenizer, checkpoint):
    """Two images placed by the chat template, through `Runner(Which.VisionPlain)`: 16 greedy tokens equal
    transformers' (bidirectional image attention included); then a text-only request to the same model."""
    hf, path = checkpoint
    banned = banned_ids(tokenizer)
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.Gemma3, dtype=ModelDType.F32))
    content = [{"type": "text", "text": "Compare"}, data_url(IMAGES[0]), {"type": "text", "text": "with"},
               data_url(IMAGES[1])]
    prompt = "<start_of_turn>user\nCompare<start_of_image>with<start_of_image><end_of_turn>\n<start_of_turn>model\n"
    assert runner_greedy(runner, content, banned, 16) == hf_greedy(hf, hf_inputs_for(tokenizer, prompt, IMAGES),
                                                                  banned, 16)
    text_prompt = "<start_of_turn>user\nHello there.<end_of_turn>\n<start_of_turn>model\n"
    expected = hf_greedy(hf, tokenizer(text_prompt, return_tensors="pt"), banned, 16)
    assert runner_greedy(runner, [{"type": "text", "text": "Hello there."}], banned, 16) == expected


def test_attention_mask_with_bidirectional_blocks():
    """Two sequences (one padded): a block sees itself both ways, within its chunk only; the window still cuts."""
    from mistralrs.worker.forward_batch import ForwardBatch, KVCacheSpec, SeqChunk, allocate_kv_caches

    caches = allocate_kv_caches(KVCacheSpec(1, 1, 4), 8, 4, torch.float32, "cpu")
    fb = ForwardBatch.build([SeqChunk([1, 9, 9, 9, 2], 2, [0, 1]), SeqChunk([9, 9, 3], 0, [2])], 4, caches, "cpu")
    fb = fb.with_bidirectional_blocks(torch.tensor([-1, 0, 0, 0, -1, 1, 1, -1]))
    mask = fb.attention_mask(None)[:, 0]
    assert mask[0, 1, 3:6].tolist() == [True, True, True]  # position 3 sees 4 and 5 (its block)
    assert mask[0, 1, 6].item() is False  # but not 6 (not in the block)
    assert mask[0, 0, 3].item() is False  # position 2 (text) stays causal
    assert mask[1, 0, :2].tolist() == [True, True] and mask[1, 0, 2].item() is False
    windowed = fb.attention_mask(2)[:, 0]
    assert windowed[0, 1, 1:6].tolist() == [False, True, True, True, True]  # position 3, window 2: keys 2..5
    with pytest.raises(ValueError, match="bidirectional_blocks"):
        fb.with_bidirectional_blocks(torch.tensor([0]))


def test_in_situ_quant_and_uqff_round_trip(tokenizer, checkpoint, tmp_path):
    """ISQ applies to the text decoder only; a UQFF written from it loads back to the same logits."""
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod

    _, path = checkpoint
    kwargs = dict(arch=VisionArchitecture.Gemma3, dtype=ModelDType.F32)
    quantized = load_which(Which.VisionPlain(model_id=path, write_uqff=str(tmp_path / "m.uqff"), **kwargs),
                           in_situ_quant="Q8_0", show_progress=False)
    decoder_linears = [m for m in quantized.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder_linears and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder_linears)
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path), from_uqff="m.uqff", **kwargs),
                          show_progress=False)
    _, inputs, ids = _case(tokenizer, 1)
    logits = []
    for model in (quantized.model, reloaded.model):
        driver = VisionDriver(model)
        driver.add(0, ids, inputs)
        logits.append(driver.step([(0, len(ids))])[0])
    assert torch.isfinite(logits[0]).all() and torch.equal(logits[0], logits[1])
