"""Tiny random vision checkpoints written to disk by the tests (transformers models and processors, no network).

Shared by the vision tests of every family: `char_tokenizer_with(tokens)` (the character tokenizer of
tests/tiny_models.py plus the family's special tokens), `hf_fast_tokenizer`, `write_tokenizer_files`,
`sample_images()` (deterministic RGB images of several sizes), `vision_prompt_logits` (our model's prompt logits
with images), and LLaVa's checkpoint and greedy helpers.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.tiny_models import CHARACTERS, CHATML, EOS_TOKEN_ID, SPECIAL_TOKENS, char_tokenizer

# ChatML whose user turns may be part lists: image parts print as <image> (a template that emits the placeholder)
CHATML_WITH_IMAGES = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer_with(tokens: list[str]):
    """The character tokenizer with `tokens` added as special tokens (ids after the three ChatML ones)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens(tokens)
    return tokenizer


def hf_fast_tokenizer(tokenizer, extra: dict | None = None):
    """A transformers tokenizer around `tokenizer` (for transformers' processors)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", **(extra or {}))


def sample_images() -> list[Image.Image]:
    """Deterministic RGB images: landscape, portrait, square and tiny."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (24, 50), (33, 33), (9, 14)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def write_tokenizer_files(path: Path, tokenizer, chat_template: str) -> None:
    """tokenizer.json and a tokenizer_config.json with the chat template (our loader's inputs)."""
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "chat_template": chat_template}))


def llava_config(vocab_size: int, image_token_id: int, *, text_arch: str = "llama", feature_layer=-2,
                 strategy: str = "default", image_size: int = 28, patch_size: int = 7):
    """A tiny LlavaConfig: CLIP ViT (2 layers, 32 wide) and a Llama/Mistral decoder (2 layers, 64 wide)."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                                           projection_dim=32, hidden_act="quick_gelu")
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=EOS_TOKEN_ID, tie_word_embeddings=False)
    text = (transformers.LlamaConfig(**common) if text_arch == "llama"
            else transformers.MistralConfig(**common, sliding_window=None))
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                    vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                    projector_hidden_act="gelu")


def make_tiny_llava_dir(path: Path, *, seed: int = 0, chat_template: str = CHATML, **config_kwargs):
    """A random tiny LLaVa checkpoint with its processor and tokenizer in `path`; returns (model fp32 eval,
    transformers processor)."""
    import transformers

    tokenizer = char_tokenizer_with(["<image>"])
    image_token_id = tokenizer.token_to_id("<image>")
    config = llava_config(tokenizer.get_vocab_size(), image_token_id, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger logits than the default init, so that greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    image_size = config.vision_config.image_size
    image_processor = transformers.LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=hf_fast_tokenizer(tokenizer),
                                            patch_size=config.vision_config.patch_size,
                                            vision_feature_select_strategy=config.vision_feature_select_strategy,
                                            num_additional_image_tokens=1)
    processor.save_pretrained(path)
    write_tokenizer_files(path, tokenizer, chat_template)
    return model, processor


def vision_prompt_logits(model, prompt_ids: list[int], inputs) -> torch.Tensor:
    """Our vision model's float32 logits `[len(prompt_ids), vocab]` for a prompt with `inputs` (ImageInputs or
    None), in one chunk: image features spliced at the image tokens, M-RoPE positions when the model has them."""
    from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches

    block_size = 16
    num_blocks = -(-len(prompt_ids) // block_size)
    caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, block_size, torch.float32, "cpu")
    batch = ForwardBatch.build([SeqChunk(list(prompt_ids), 0, list(range(num_blocks)), len(prompt_ids))],
                               block_size, caches, "cpu")
    ids = batch.input_ids
    with torch.no_grad(), batch.active():
        embeds = model.embed(ids)
        if inputs is not None:
            mask = ids == model.image_token_id
            embeds[mask] = model.encode_images(inputs).to(embeds.dtype)
        rope = model.rope_positions(list(prompt_ids), inputs)
        if rope is not None:
            batch.rope_positions = rope[0]
        return model.compute_logits(model(ids, batch.positions, batch, inputs_embeds=embeds))


NUM_GREEDY_TOKENS = 16
# logit bias banning the special tokens (EOS included) and <image>, so that greedy runs make exactly N visible tokens
LLAVA_BANNED = {i: -1e9 for i in range(len(CHARACTERS), len(CHARACTERS) + len(SPECIAL_TOKENS) + 1)}


def hf_llava_greedy(hf_model, hf_processor, images, prompt: str, num_tokens: int = NUM_GREEDY_TOKENS) -> list[int]:
    """transformers' greedy continuation of `prompt` with `images` (None: text only), full forward passes,
    `LLAVA_BANNED` tokens excluded."""
    inputs = hf_processor(images=images, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    pixels = inputs.get("pixel_values")
    generated = []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = hf_model(input_ids=ids, pixel_values=pixels).logits[0, -1]
            logits[list(LLAVA_BANNED)] = float("-inf")
            generated.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[generated[-1]]])], dim=1)
    return generated


def chat_request(content, num_tokens: int = NUM_GREEDY_TOKENS):
    """A greedy one-message chat request banning `LLAVA_BANNED`."""
    from mistralrs import ChatCompletionRequest

    return ChatCompletionRequest(messages=[{"role": "user", "content": content}], model="tiny",
                                 max_tokens=num_tokens, temperature=0.0, logit_bias=LLAVA_BANNED)


def chat_tokens(runner, content, num_tokens: int = NUM_GREEDY_TOKENS) -> list[int]:
    """The token ids of a Runner's greedy answer to one user message with `content`."""
    response = runner.send_chat_completion_request(chat_request(content, num_tokens))
    return runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)


def data_url(image: Image.Image) -> str:
    """`image` as a PNG data: URL."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    """An OpenAI image content part."""
    return {"type": "image_url", "image_url": {"url": url}}


def alone_and_together(answer: Callable[[object], object], contents: list) -> tuple[list, list]:
    """`answer` of each of `contents` one after another, then of all of them at once (one thread each, so the engine
    batches them): the two lists of answers, in the order of `contents`."""
    alone = [answer(content) for content in contents]
    together: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, answer(contents[i])))
               for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return alone, [together[i] for i in range(len(contents))]
