"""Images through the engine on a tiny LLaVa: batching with text requests, chunked prefill across an image, the
prefix cache keyed by image content, features freed after the prefill, bad input, and images to a text model."""

from __future__ import annotations

import base64

import pytest
import torch

from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
from mistralrs.core import ScheduledSequence, SchedulerOutput, Sequence
from mistralrs.worker.image_features import ImageFeatureCache
from tests.loading import load_which
from tests.tiny_models import make_tiny_model_dir
from tests.vision.tiny_vision import (
    chat_request, chat_tokens, data_url, hf_llava_greedy, image_part, make_tiny_llava_dir, sample_images,
)

PROMPT = "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
TEXT_PROMPT = "<|im_start|>user\nDescribe nothing.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    hf_model, hf_processor = make_tiny_llava_dir(path)
    urls = [data_url(image) for image in sample_images()]
    expected = [hf_llava_greedy(hf_model, hf_processor, [image], PROMPT) for image in sample_images()[:3]]
    expected_text = hf_llava_greedy(hf_model, hf_processor, None, TEXT_PROMPT)
    return path, urls, expected, expected_text


def vision_runner(path, **kwargs) -> Runner:
    return Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32),
                  **kwargs)


def with_image(url: str) -> list[dict]:
    return [image_part(url), {"type": "text", "text": "Describe it."}]


def test_a_batch_of_image_and_text_requests_gives_each_its_lone_result(llava):
    path, urls, expected, expected_text = llava
    runner = vision_runner(path)
    engine = runner.llm_engine
    contents = [with_image(urls[0]), "Describe nothing.", with_image(urls[1]), with_image(urls[2]),
                "Describe nothing."]
    submissions = [engine.submit_chat_completion(chat_request(content)) for content in contents]
    answers = [runner.tokenize_text(engine.wait(s).choices[0].message.content, add_special_tokens=False)
               for s in submissions]
    assert answers == [expected[0], expected_text, expected[1], expected[2], expected_text]
    runner.close()


@pytest.mark.parametrize("chunk", [3, 7])
def test_a_chunked_prefill_that_splits_the_image_run(llava, chunk):
    path, urls, expected, _ = llava
    runner = vision_runner(path, prompt_chunksize=chunk)   # the 16 image tokens span several chunks
    assert chat_tokens(runner, with_image(urls[1])) == expected[1]
    runner.close()


def test_the_prefix_cache_hits_the_same_image_and_misses_another(llava):
    path, urls, expected, _ = llava
    runner = vision_runner(path, pa_blk_size=8)

    def ask(url):
        response = runner.send_chat_completion_request(chat_request(with_image(url)))
        tokens = runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)
        return tokens, response.usage.cached_prompt_tokens

    assert ask(urls[0]) == (expected[0], 0)
    tokens, cached = ask(urls[0])
    assert tokens == expected[0] and cached >= 32   # the same image and text: its full blocks are reused
    assert ask(urls[1]) == (expected[1], 0)          # the same text with another image: nothing reused
    runner.close()


def test_features_are_computed_once_spliced_per_chunk_and_freed_after_the_image(llava):
    path, urls, _, _ = llava
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    model = loaded.model
    inputs = loaded.vision_processor.preprocess(sample_images()[:2])
    image = model.image_token_id
    prompt = [5, 6] + [image] * 16 + [7, 8, 9] + [image] * 16 + [10]
    whole = model.embed(torch.tensor(prompt))
    with torch.no_grad():
        whole[torch.tensor(prompt) == image] = model.encode_images(inputs)
    calls = []
    encode = model.encode_images
    model.encode_images = lambda x: calls.append(x) or encode(x)
    cache = ImageFeatureCache(model)
    seq = Sequence(0, prompt)
    held = []
    with torch.no_grad():
        for start in range(0, len(prompt), 10):
            seq.num_computed_tokens = start
            n = min(10, len(prompt) - start)
            output = SchedulerOutput([ScheduledSequence(seq, n, start + n == len(prompt))])
            embeds = cache.embeddings(torch.tensor(prompt[start:start + n]), output.scheduled, {0: inputs},
                                      [0, n])
            assert torch.equal(embeds, whole[start:start + n])
            held.append(cache.has_features(0))
    assert len(calls) == 1 and held == [True, True, True, False]   # freed once the chunk passed the last image


def test_bad_images_name_the_part_and_leave_the_engine_unharmed(llava, tmp_path):
    path, urls, expected, _ = llava
    runner = vision_runner(path)
    not_image = base64.b64encode(b"plain text, no image").decode()
    cases = [
        ([{"type": "text", "text": "x"}, image_part(not_image)], r"messages\[0\]\.content\[1\]: .*not a readable"),
        ([image_part("data:image/png;base64")], r"messages\[0\]\.content\[0\]: malformed data URL"),
        ([image_part("http://127.0.0.1:1/x.png")], r"messages\[0\]\.content\[0\]: cannot fetch"),
        ([image_part(urls[0])] * 17, r"messages\[0\]\.content\[16\]: 17 images in one request; at most 16"),
        ([{"type": "text", "text": "<image> and <image>"}, image_part(urls[0])], "2 image placeholders"),
    ]
    for content, message in cases:
        with pytest.raises(ValueError, match=message):
            runner.send_chat_completion_request(chat_request(content))
    assert chat_tokens(runner, with_image(urls[0])) == expected[0]
    runner.close()


def test_an_image_to_a_text_model_is_refused_naming_the_part(tmp_path):
    make_tiny_model_dir(tmp_path, "llama")
    runner = Runner(Which.Plain(model_id=str(tmp_path), dtype=ModelDType.F32))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, image_part("data:image/png;base64,AA")]}]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]: image input is not supported"):
        runner.send_chat_completion_request(ChatCompletionRequest(messages=messages, model="m", max_tokens=2))
    runner.close()


def test_the_images_of_a_step_are_encoded_in_one_call(llava):
    path, _, _, _ = llava
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVA, dtype=ModelDType.F32))
    model = loaded.model
    images = sample_images()
    first, second = loaded.vision_processor.preprocess(images[:1]), loaded.vision_processor.preprocess(images[1:3])
    image = model.image_token_id
    prompts = [[1] + [image] * 16 + [2], [3] * 4 + [image] * 16 + [image] * 16]
    calls = []
    encode = model.encode_images
    model.encode_images = lambda x: calls.append(x.num_images) or encode(x)
    seqs = [Sequence(0, prompts[0]), Sequence(1, prompts[1])]
    output = SchedulerOutput([ScheduledSequence(seq, len(seq.prompt_token_ids), True) for seq in seqs])
    with torch.no_grad():
        embeds = ImageFeatureCache(model).embeddings(torch.tensor(prompts[0] + prompts[1]), output.scheduled,
                                                     {0: first, 1: second}, [0, 18, 54])
        expected = []
        for prompt, inputs in zip(prompts, (first, second)):
            alone = model.embed(torch.tensor(prompt))
            alone[torch.tensor(prompt) == image] = encode(inputs)
            expected.append(alone)
    assert calls == [3] and torch.allclose(embeds, torch.cat(expected), atol=1e-6, rtol=0)


def test_m_rope_positions_follow_the_models_table_then_its_delta():
    class MRopeModel(torch.nn.Module):
        def rope_positions(self, prompt, inputs):
            if inputs is None:
                return None
            table = torch.stack([torch.zeros(len(prompt)), torch.arange(len(prompt)) // 2,
                                 torch.arange(len(prompt)) % 2]).long()
            return table, -3

    cache = ImageFeatureCache(MRopeModel())
    with_table, without = Sequence(0, list(range(6))), Sequence(1, list(range(4)))
    with_table.num_computed_tokens = 4            # the last two prompt tokens
    without.num_computed_tokens = 2
    output = SchedulerOutput([ScheduledSequence(with_table, 2, True), ScheduledSequence(without, 2, True)])
    positions = cache.rope_positions_for(output.scheduled, {0: object()}, torch.zeros(4))
    assert positions.tolist() == [[0, 0, 2, 3], [2, 2, 2, 3], [0, 1, 2, 3]]
    with_table.output_token_ids = [9, 9]          # decode: index 7 has position 7 - 3 on every axis
    with_table.num_computed_tokens = 7
    decode = cache.rope_positions_for([ScheduledSequence(with_table, 1, True)], {}, torch.zeros(1))
    assert decode.tolist() == [[4], [4], [4]]
    assert ImageFeatureCache(MRopeModel()).rope_positions_for(output.scheduled, {}, torch.zeros(4)) is None
