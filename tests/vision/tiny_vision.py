"""Tiny random vision checkpoints written to disk by the tests (transformers models and processors, no network).

Shared by the vision tests of every family: `char_tokenizer_with(tokens)` (the character tokenizer of
tests/tiny_models.py plus the family's special tokens), `save_processor_and_tokenizer`, `make_tiny_llava_dir`,
and `sample_images()` (deterministic RGB images of several sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.tiny_models import CHATML, EOS_TOKEN_ID, char_tokenizer

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
