"""Llama 3.2 Vision (Mllama) against transformers on a tiny random checkpoint: prompt logits with one and two
images over packed chunks (the cross-attention keys/values computed once per request and kept, the mask rows of
each chunk), 16 greedy tokens, and a text-only prompt (cross-attention layers skipped)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.mllama import MllamaForConditionalGeneration, MllamaProcessor
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.vision.siglip_helpers import (banned_ids, data_url, load_ours, random_image, runner_greedy, sharpen,
                                         tiny_hf_tokenizer)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOKENIZER = tiny_hf_tokenizer(["<|image|>"])
VOCAB, IMAGE = len(TOKENIZER), TOKENIZER.convert_tokens_to_ids("<|image|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PREPROCESSOR = {"size": {"height": 14, "width": 14}, "max_image_tiles": 4, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3}
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
              image_size=14, patch_size=7, max_num_tiles=4, vision_output_dim=48, intermediate_layers_indices=[0, 2])
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMAGES = [random_image(45, 20, seed=1), random_image(11, 40, seed=2)]
BLOCK = 4


def write_tiny_mllama(path: str):
    """A random tiny Mllama checkpoint with its tokenizer (ChatML template) and processor config in `path`; returns
    the transformers model (fp32, eval)."""
    from transformers import MllamaConfig
    from transformers import MllamaForConditionalGeneration as HFModel

    torch.manual_seed(0)
    hf = HFModel(MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE)).eval()
    sharpen(hf, seed=11)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("gate") or "gate_" in name and param.numel() == 1:
                param.fill_(0.6)
    hf.save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**tokenizer_config, "chat_template": CHAT_TEMPLATE, "bos_token": None}, f)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({**PREPROCESSOR, "image_processor_type": "MllamaImageProcessor"}, f)
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mllama"))
    hf = write_tiny_mllama(path)
    return hf, load_ours(MllamaForConditionalGeneration, path), path


def processor() -> MllamaProcessor:
    return MllamaProcessor.from_checkpoint(ProcessorFiles(preprocessor_config=PREPROCESSOR), {}, None)


def hf_logits(hf, ids: list[int], images) -> torch.Tensor:
    """transformers' logits of `ids` (cross-attention mask from its processor's functions)."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    kwargs = {}
    if images:
        t = processor().preprocess(images).tensors
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, IMAGE)], [t["aspect_ratio_mask"].sum(1).tolist()], 4, len(ids))
        kwargs = dict(pixel_values=t["pixel_values"][None], aspect_ratio_ids=t["aspect_ratio_ids"][None],
                      aspect_ratio_mask=t["aspect_ratio_mask"][None], cross_attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), **kwargs).logits[0]


def our_logits(model, ids: list[int], images, chunk: int) -> torch.Tensor:
    """Our prompt logits over chunks of `chunk` tokens, the request's cross-attention state computed once."""
    caches = allocate_kv_caches(model.kv_cache_spec(), 64, BLOCK, torch.float32, "cpu")
    with torch.inference_mode():
        state = model.cross_attention_state(ids, processor().preprocess(images)) if images else None
        out, table = [], list(range(63, -1, -1))
        for start in range(0, len(ids), chunk):
            tokens = ids[start:start + chunk]
            blocks = table[:-(-(start + len(tokens)) // BLOCK)]
            fb = ForwardBatch.build([SeqChunk(tokens, start, blocks)], BLOCK, caches, "cpu", "sdpa")
            fb.cross_attention = [None if state is None else state.chunk(start, len(tokens))]
            with fb.active():
                out.append(model.compute_logits(model(fb.input_ids, fb.positions, fb)))
    return torch.cat(out)


PROMPT_ONE = [3, 4, 5, IMAGE, 7, 8, 9, 10, 11, 12]
PROMPT_TWO = [3, IMAGE, 7, 8, 9, IMAGE, IMAGE, 11, 12, 13, 14]  # consecutive image tokens share a range


@pytest.mark.parametrize("chunk", [3, 64])
def test_prompt_logits_one_image(models, chunk):
    hf, ours, _ = models
    torch.testing.assert_close(our_logits(ours, PROMPT_ONE, IMAGES[:1], chunk), hf_logits(hf, PROMPT_ONE, IMAGES[:1]),
                               rtol=1e-4, atol=1e-4)


def test_prompt_logits_two_images_and_text_only(models):
    hf, ours, _ = models
    images = IMAGES + [random_image(30, 30, seed=3)]
    torch.testing.assert_close(our_logits(ours, PROMPT_TWO, images, 4), hf_logits(hf, PROMPT_TWO, images),
                               rtol=1e-4, atol=1e-4)
    text = [3, 4, 5, 6, 7]
    torch.testing.assert_close(our_logits(ours, text, [], 64), hf_logits(hf, text, []), rtol=1e-4, atol=1e-4)


def test_mixed_batch_equals_lone_runs(models):
    """An image request and a text-only request packed in one step: each one's logits equal its lone run."""
    _, ours, _ = models
    text = [3, 4, 5, 6, 7]
    caches = allocate_kv_caches(ours.kv_cache_spec(), 64, BLOCK, torch.float32, "cpu")
    with torch.inference_mode():
        state = ours.cross_attention_state(PROMPT_ONE, processor().preprocess(IMAGES[:1]))
        fb = ForwardBatch.build([SeqChunk(text, 0, [9, 8]), SeqChunk(PROMPT_ONE, 0, [0, 1, 2])], BLOCK, caches,
                                "cpu", "sdpa")
        fb.cross_attention = [None, state.chunk(0, len(PROMPT_ONE))]
        with fb.active():
            text_logits, image_logits = ours.compute_logits(ours(fb.input_ids, fb.positions, fb)).split(fb.query_lens)
    torch.testing.assert_close(text_logits, our_logits(ours, text, [], 64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_logits, our_logits(ours, PROMPT_ONE, IMAGES[:1], 64), rtol=1e-5, atol=1e-5)


def hf_greedy(hf, ids: list[int], images, num_tokens: int, banned=()) -> list[int]:
    """transformers' greedy tokens by full forward passes (the mask's last row repeated for new tokens, as its
    `generate` does)."""
    ids, out = list(ids), []
    for _ in range(num_tokens):
        logits = hf_logits(hf, ids, images)[-1]
        logits[list(banned)] = float("-inf")
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_greedy_tokens_through_a_runner(models):
    """`Runner(Which.VisionPlain(arch=VLlama))` with `<|image|>` typed by the user: 16 greedy tokens equal
    transformers'; then a text-only request (cross-attention layers skipped) to the same model."""
    hf, _, path = models
    banned = banned_ids(TOKENIZER)
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.VLlama, dtype=ModelDType.F32))
    prompt = "<|im_start|>user\nSay<|image|>what<|im_end|>\n<|im_start|>assistant\n"
    ids = TOKENIZER(prompt)["input_ids"]
    assert ids.count(IMAGE) == 1
    content = [{"type": "text", "text": "Say<|image|>what"}, data_url(IMAGES[0])]
    assert runner_greedy(runner, content, banned, 16) == hf_greedy(hf, ids, IMAGES[:1], 16, banned)
    text = TOKENIZER("<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    expected = hf_greedy(hf, text, [], 16, banned)
    assert runner_greedy(runner, [{"type": "text", "text": "Hello there."}], banned, 16) == expected


def test_cross_attention_state_is_computed_once_and_freed_with_the_sequence(models):
    """The model runner's store: one `cross_attention_state` per request, kept through its decode steps, gone once
    the request is; a text-only sequence in the same step gets no context; nothing is spliced."""
    from types import SimpleNamespace

    from mistralrs.worker.image_features import ImageFeatureCache

    _, ours, _ = models
    calls = []

    class Counting:
        image_token_id = ours.image_token_id

        def cross_attention_state(self, prompt, inputs):
            calls.append(len(prompt))
            return ours.cross_attention_state(prompt, inputs)

    cache = ImageFeatureCache(Counting())
    inputs = processor().preprocess(IMAGES[:1])
    image_seq = SimpleNamespace(seq_id=1, prompt_token_ids=PROMPT_ONE, num_computed_tokens=0)
    text_seq = SimpleNamespace(seq_id=2, prompt_token_ids=[3, 4], num_computed_tokens=0)

    def step(done: int, count: int):
        image_seq.num_computed_tokens = done
        scheduled = [SimpleNamespace(seq=image_seq, num_new_tokens=count),
                     SimpleNamespace(seq=text_seq, num_new_tokens=1)]
        assert cache.embeddings(torch.tensor([0]), scheduled, {1: inputs}, [0, count, count + 1]) is None
        return cache.cross_attention_for(scheduled, {1: inputs})

    first = step(0, len(PROMPT_ONE))
    assert first[1] is None and first[0].mask.shape[0] == len(PROMPT_ONE)
    assert first[0].row[:3].eq(0).all() and first[0].row[3:].eq(1).all()  # text before the image sees nothing
    decode = step(len(PROMPT_ONE), 1)
    assert torch.equal(decode[0].mask, first[0].mask[-1:])  # decode tokens repeat the last prompt row
    assert calls == [len(PROMPT_ONE)] and cache.has_cross_attention(1)
    cache.forget([1])
    assert not cache.has_cross_attention(1)


def test_in_situ_quant_reaches_the_cross_attention_layers(models):
    """ISQ quantizes every Linear of the text decoder, the cross-attention layers' included, not the vision tower;
    the quantized model still follows the f32 logits closely."""
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod
    from tests.loading import load_which

    _, ours, path = models
    quantized = load_which(Which.VisionPlain(model_id=path, arch=VisionArchitecture.VLlama, dtype=ModelDType.F32),
                           in_situ_quant="Q8_0", show_progress=False).model
    cross = quantized.language_model.model.layers[1]
    assert isinstance(cross.cross_attn.q_proj, Linear) and isinstance(cross.mlp.down_proj, Linear)
    decoder = [m for m in quantized.language_model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder)
    assert not any(isinstance(m, Linear) for m in quantized.vision_model.modules())
    got = our_logits(quantized, PROMPT_ONE, IMAGES[:1], 64)
    torch.testing.assert_close(got, our_logits(ours, PROMPT_ONE, IMAGES[:1], 64), rtol=0, atol=0.1)



def test_write_uqff_then_from_uqff_gives_the_same_model(models, tmp_path):
    """A UQFF written with ISQ (the cross-attention layers' Linears included) loads back to identical logits."""
    import shutil

    from tests.loading import load_which

    _, _, path = models
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    quantized = load_which(Which.VisionPlain(model_id=str(model_dir), arch=VisionArchitecture.VLlama,
                                             dtype=ModelDType.F32, write_uqff=str(tmp_path / "out" / "m-q8_0.uqff")),
                           in_situ_quant="Q8_0", show_progress=False).model
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path / "out"), arch=VisionArchitecture.VLlama,
                                            dtype=ModelDType.F32, from_uqff="m-q8_0.uqff"), show_progress=False).model
    expected = our_logits(quantized, PROMPT_ONE, IMAGES[:1], 64)
    assert torch.equal(our_logits(reloaded, PROMPT_ONE, IMAGES[:1], 64), expected)

def test_config_errors():
    config = {"vision_config": VISION, "text_config": {**TEXT, "cross_attention_layers": [4]}}
    with pytest.raises(ValueError, match="cross_attention_layers"):
        MllamaForConditionalGeneration(config, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="vision_output_dim"):
        MllamaForConditionalGeneration({"vision_config": {**VISION, "vision_output_dim": 40}, "text_config": TEXT},
                                       dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="square"):
        MllamaProcessor.from_checkpoint(ProcessorFiles(preprocessor_config={"size": {"height": 14, "width": 28}}),
                                        {}, None)
