"""Shared pieces of the SigLIP-family vision tests (Idefics2, Idefics3, Gemma 3): a tiny tokenizer with the
family's image tokens, test images, and a driver that runs our model over packed chunks with spliced image
features (what the model runner does)."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import random

import numpy as np
import torch
from PIL import Image

from mistralrs.loader.safetensors_loader import iter_safetensors
from mistralrs.vision.base import ImageInputs, VisionCausalLM
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from mistralrs.worker.options import ExecutionOptions, apply_execution_options
from tests.tiny_models import CHARACTERS
from tests.vision.tiny_vision import char_tokenizer_with, hf_fast_tokenizer

BLOCK_SIZE = 4


def tiny_hf_tokenizer(extra_special: list[str], **kwargs):
    """A transformers fast tokenizer: one token per character, ChatML specials, and `extra_special` tokens."""
    return hf_fast_tokenizer(char_tokenizer_with(extra_special), {"pad_token": "<|endoftext|>", **kwargs})


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image (smooth enough that resampling matters)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(height // 4, 1), max(width // 4, 1), 3), dtype=np.uint8)
    return Image.fromarray(base, mode="RGB").resize((width, height), Image.BILINEAR)


def sharpen(model: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Larger random weights than transformers' init (so masking and splicing errors show): norm weights
    1 + noise, except the parameters named in `skip` (Gemma's `1 + w` norms), which get small noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if any(s in name for s in skip):
                param.copy_(0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() >= 2:
                param.copy_(0.15 * noise)
            else:
                param.copy_(0.1 * noise)


def load_ours(model_cls: type[VisionCausalLM], path: str) -> VisionCausalLM:
    """Our model from the checkpoint transformers saved under `path` (float32), names mapped as the loader does;
    every checkpoint tensor used and every parameter filled."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = model_cls(config, dtype=torch.float32, device="cpu")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    weights = [(model_cls.canonical_weight_name(n), t) for n, t in iter_safetensors(files, torch.float32)]
    consumed = model.load_weights(weights)
    assert {n for n, _ in weights} == consumed
    assert model.expected_weight_names() <= consumed
    return model.eval()


class VisionDriver:
    """Runs a vision model over packed chunks as the model runner does: shuffled blocks, the image features of
    each sequence computed once and spliced at its image-token rows of each chunk."""

    def __init__(self, model: VisionCausalLM, options: ExecutionOptions = ExecutionOptions(), seed: int = 0):
        self.model = model
        self.options = options
        apply_execution_options(model, options)
        self.kv_caches = allocate_kv_caches(model.kv_cache_spec(), 256, BLOCK_SIZE, torch.float32, "cpu")
        self.free = list(range(256))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.done: dict[int, int] = {}
        self.features: dict[int, torch.Tensor] = {}
        self.prompts: dict[int, list[int]] = {}

    def add(self, seq_id: int, prompt: list[int], inputs: ImageInputs | None) -> None:
        """Registers a sequence; its image features are computed here, once."""
        self.prompts[seq_id] = list(prompt)
        if inputs is not None:
            with torch.inference_mode():
                self.features[seq_id] = self.model.encode_images(inputs)
            assert self.features[seq_id].shape[0] == sum(t == self.model.image_token_id for t in prompt)

    def step(self, work: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One step over `(seq_id, num_new_tokens)` (new tokens taken from the prompt, then from `extend`);
        returns each chunk's logits."""
        chunks, rows = [], []
        for seq_id, count in work:
            start = self.done.get(seq_id, 0)
            tokens = self.prompts[seq_id][start:start + count]
            table = self.tables.setdefault(seq_id, [])
            while len(table) * BLOCK_SIZE < start + count:
                table.append(self.free.pop())
            chunks.append(SeqChunk(tokens, start, list(table)))
            self.done[seq_id] = start + count
            features = self.features.get(seq_id)
            before = sum(t == self.model.image_token_id for t in self.prompts[seq_id][:start])
            here = sum(t == self.model.image_token_id for t in tokens)
            rows.append(None if features is None or here == 0 else features[before:before + here])
        fb = ForwardBatch.build(chunks, BLOCK_SIZE, self.kv_caches, "cpu", self.options.attention_backend)
        with torch.inference_mode(), fb.active():
            embeds = self.model.embed(fb.input_ids)
            for s, spliced in enumerate(rows):
                if spliced is not None:
                    lo, hi = fb.query_start_locs[s], fb.query_start_locs[s + 1]
                    mask = torch.zeros(fb.num_tokens, dtype=torch.bool)
                    mask[lo:hi] = fb.input_ids[lo:hi] == self.model.image_token_id
                    embeds[mask] = spliced.to(embeds.dtype)
            logits = self.model.compute_logits(self.model(fb.input_ids, fb.positions, fb, inputs_embeds=embeds))
        return list(logits.split(fb.query_lens))

    def extend(self, seq_id: int, token: int) -> None:
        """Appends a generated token to a sequence (decoded by the next step)."""
        self.prompts[seq_id].append(token)

    def greedy(self, seq_id: int, num_tokens: int) -> list[int]:
        """Prefill the whole prompt in one step, then `num_tokens` greedy tokens."""
        out = []
        logits = self.step([(seq_id, len(self.prompts[seq_id]))])[0]
        for _ in range(num_tokens):
            token = int(logits[-1].argmax())
            out.append(token)
            self.extend(seq_id, token)
            logits = self.step([(seq_id, 1)])[0]
        return out


def save_checkpoint(path, hf_model, hf_processor, chat_template: str) -> None:
    """The model, its processor files and tokenizer as transformers saves them, plus a chat template (and no BOS)
    in tokenizer_config.json for our loader."""
    hf_model.save_pretrained(path)
    hf_processor.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config.update(chat_template=chat_template, bos_token=None)
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f)


def banned_ids(tokenizer) -> dict[int, float]:
    """Every non-character token (ChatML and image specials), as a logit bias: generated text then re-tokenizes
    to the same ids."""
    return {i: -1e9 for i in range(len(CHARACTERS), len(tokenizer))}


def hf_greedy(hf_model, hf_inputs, banned: dict[int, float], num_tokens: int) -> list[int]:
    """transformers' greedy tokens (full forward passes, `banned` ids excluded) for processor outputs."""
    inputs = {k: v for k, v in hf_inputs.items() if k != "attention_mask"}
    generated = []
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = hf_model(**inputs).logits[0, -1]
            logits[list(banned)] = float("-inf")
            token = int(logits.argmax())
            generated.append(token)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
            if "token_type_ids" in inputs:
                types = inputs["token_type_ids"]
                inputs["token_type_ids"] = torch.cat([types, torch.zeros(1, 1, dtype=types.dtype)], dim=1)
    return generated


def data_url(image: Image.Image) -> dict:
    """An OpenAI image part holding `image` as a PNG data URL."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def runner_greedy(runner, content: list[dict], banned: dict[int, float], num_tokens: int) -> list[int]:
    """The Runner's greedy tokens for one user message with `content` parts (`banned` ids excluded)."""
    from mistralrs import ChatCompletionRequest

    response = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": content}], model="m", max_tokens=num_tokens, temperature=0.0,
        logit_bias=banned))
    return runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)


def idefics_greedy_matches(hf, ours, hf_inputs, inputs: ImageInputs, ids: list[int], num_tokens: int = 16) -> None:
    """Idefics2/3: `num_tokens` greedy tokens of our model (driven over packed steps) equal transformers' `hf` on the
    same prompt and images."""
    expected, tokens = [], hf_inputs["input_ids"]
    with torch.inference_mode():
        for _ in range(num_tokens):
            next_token = hf(input_ids=tokens, pixel_values=hf_inputs["pixel_values"],
                            pixel_attention_mask=hf_inputs["pixel_attention_mask"]).logits[0, -1].argmax()
            expected.append(int(next_token))
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    driver = VisionDriver(ours)
    driver.add(0, ids, inputs)
    assert driver.greedy(0, num_tokens) == expected


def idefics_runner_matches(runner, hf, hf_processor, tokenizer, images: list[Image.Image]) -> None:
    """Idefics2/3 through a `Runner`: two images placed by the chat template where their parts are give
    transformers' 16 greedy tokens; then a text-only request to the same model."""
    banned = banned_ids(tokenizer)
    content = [data_url(images[0]), {"type": "text", "text": "Compare"}, data_url(images[1]),
               {"type": "text", "text": "please."}]
    prompt = "User:<image>Compare<image>please.<end_of_utterance>\nAssistant:"
    hf_inputs = hf_processor(text=prompt, images=images, return_tensors="pt")
    assert runner_greedy(runner, content, banned, 16) == hf_greedy(hf, hf_inputs, banned, 16)
    text_prompt = "User:Hello there.<end_of_utterance>\nAssistant:"
    expected = hf_greedy(hf, tokenizer(text_prompt, return_tensors="pt"), banned, 16)
    assert runner_greedy(runner, [{"type": "text", "text": "Hello there."}], banned, 16) == expected
