"""Qwen2-VL and Qwen2.5-VL against transformers on tiny random checkpoints saved inside the test (f32):
processor outputs, prompt expansion, M-RoPE positions, prompt logits with one and two images, greedy decoding."""

from __future__ import annotations

import glob
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from mistralrs.loader.safetensors_loader import iter_safetensors
from mistralrs.vision.base import ImageInputs, ProcessorFiles
from mistralrs.vision.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from mistralrs.vision.qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, QwenImageParams
from mistralrs.vision.registry import vision_family_for
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.tiny_models import CHARACTERS, EOS_TOKEN_ID, char_tokenizer

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE = 4, 2  # tiny patches: an image of 40 x 32 pixels is a 10 x 8 patch grid, 20 prompt tokens
MIN_PIXELS, MAX_PIXELS = 8 * 8 * 2, 8 * 8 * 24
BLOCK_SIZE = 4
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def tiny_images() -> list[Image.Image]:
    """Deterministic RGB images (width, height): landscape, portrait, small (scaled up to min_pixels), large."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (24, 50), (9, 14), (90, 70)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def tokenizer_and_ids():
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens(QWEN_TOKENS)
    return tokenizer, {t: tokenizer.token_to_id(t) for t in QWEN_TOKENS}


def hf_config(family: str, vocab_size: int, ids: dict[str, int]):
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS_TOKEN_ID,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Larger weights than transformers' init (peaked attention, no greedy near-ties); norms around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_((0.15 if param.dim() > 1 else 0.1) * torch.randn(param.shape, generator=gen))


class ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
    """transformers' Qwen2-VL processor without its video processor (which needs torchvision, not installed)."""

    def __init__(self, image_processor, tokenizer):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, transformers model, transformers processor, checkpoint dir)."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    hf, processor = write_tiny_qwen(family, path)
    return family, hf, processor, path


def write_tiny_qwen(family: str, path: Path):
    """A random tiny Qwen2-VL or Qwen2.5-VL checkpoint with its processor in `path` (the tokenizer files are written
    by `write_tokenizer_files`); returns (transformers model, transformers processor)."""
    tokenizer, ids = tokenizer_and_ids()
    config = hf_config(family, tokenizer.get_vocab_size(), ids)
    model_cls = (transformers.Qwen2VLForConditionalGeneration if family == "qwen2_vl"
                 else transformers.Qwen2_5_VLForConditionalGeneration)
    torch.manual_seed(0)
    hf = model_cls(config).eval()
    randomize(hf, 1)
    hf.save_pretrained(path, safe_serialization=True)
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                                            patch_size=PATCH, merge_size=MERGE)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    processor = ImageOnlyQwen2VLProcessor(image_processor, hf_tokenizer)
    processor.save_pretrained(path)  # transformers 5: the image processor's parameters in processor_config.json
    return hf, processor


def our_processor(path: Path, max_edge: int | None = None) -> Qwen2VLImageProcessor:
    names = [n for n in ("preprocessor_config", "processor_config") if (path / f"{n}.json").exists()]
    files = ProcessorFiles(**{n: json.loads((path / f"{n}.json").read_text()) for n in names})
    config = json.loads((path / "config.json").read_text())
    return vision_family_for(config["architectures"], None).processor_cls.from_checkpoint(files, config, max_edge)


def our_model(path: Path, dtype: torch.dtype = torch.float32):
    config = json.loads((path / "config.json").read_text())
    model = vision_family_for(config["architectures"], None).model_cls(config, dtype=dtype, device="cpu")
    files = sorted(glob.glob(str(path / "*.safetensors")))
    weights = [(model.canonical_weight_name(n), t) for n, t in iter_safetensors(files, dtype)]
    consumed = model.load_weights(weights)
    assert consumed == {n for n, _ in weights} and model.expected_weight_names() <= consumed
    return model.eval()


def hf_inputs(processor, images: list[Image.Image], text: str):
    return processor(text=[text], images=images or None, return_tensors="pt")


def prompt_text(num_images: int) -> str:
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    return "<|im_start|>user\n" + "".join(f"look {i}: {image} " for i in range(num_images)) + \
        "what?<|im_end|>\n<|im_start|>assistant\n"


class Driver:
    """Runs our model one step at a time over a paged KV cache, as the engine will: image rows spliced into the
    embeddings, M-RoPE positions in `ForwardBatch.rope_positions` (decode: p + delta)."""

    def __init__(self, model):
        self.model = model
        self.kv = allocate_kv_caches(model.kv_cache_spec(), 64, BLOCK_SIZE, model.dtype, "cpu")
        self.blocks = list(range(63, -1, -1))
        self.table: list[int] = []
        self.done = 0
        self.rope: torch.Tensor | None = None
        self.delta = 0

    def step(self, token_ids: list[int], features: torch.Tensor | None = None) -> torch.Tensor:
        while len(self.table) * BLOCK_SIZE < self.done + len(token_ids):
            self.table.append(self.blocks.pop())
        chunk = SeqChunk(token_ids=token_ids, start_pos=self.done, block_ids=list(self.table))
        fb = ForwardBatch.build([chunk], BLOCK_SIZE, self.kv, "cpu")
        if self.rope is not None:
            start = self.done
            fb.rope_positions = (self.rope[:, start:start + len(token_ids)] if start < self.rope.shape[1]
                                 else (fb.positions + self.delta).expand(3, -1))
        with torch.inference_mode():
            embeds = self.model.embed(fb.input_ids)
            if features is not None:
                embeds[fb.input_ids == self.model.image_token_id] = features.to(embeds.dtype)
            logits = self.model.compute_logits(self.model(fb.input_ids, fb.positions, fb, inputs_embeds=embeds))
        self.done += len(token_ids)
        return logits


def our_prompt_logits(model, processor: Qwen2VLImageProcessor, images, text, tokenizer) -> tuple[torch.Tensor, Driver]:
    inputs = processor.preprocess(images) if images else None
    ids = tokenizer.encode(processor.expand_prompt(text, inputs) if inputs else text).ids
    driver = Driver(model)
    rope = model.rope_positions(ids, inputs)
    if rope is not None:
        driver.rope, driver.delta = rope
    with torch.inference_mode():
        features = model.encode_images(inputs) if inputs else None
    return driver.step(ids, features), driver


def test_processor_matches_transformers(checkpoint):
    _, _, processor, path = checkpoint
    ours = our_processor(path)
    assert (ours.params.min_pixels, ours.params.max_pixels, ours.params.patch_size) == (MIN_PIXELS, MAX_PIXELS, PATCH)
    images = tiny_images()
    expected = processor.image_processor(images=images, return_tensors="pt")
    got = ours.preprocess(images)
    assert torch.equal(got.tensors["image_grid_thw"], expected["image_grid_thw"])
    assert got.tensors["pixel_values"].shape == expected["pixel_values"].shape
    torch.testing.assert_close(got.tensors["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert got.num_image_tokens == (expected["image_grid_thw"].prod(-1) // MERGE**2).tolist()
    assert len(set(got.num_image_tokens)) > 1  # the sizes really differ
    assert got.digest != ours.preprocess(images[::-1]).digest


def test_max_edge_caps_the_resized_image(checkpoint):
    _, _, _, path = checkpoint
    processor = our_processor(path, max_edge=24)
    for image in tiny_images():
        height, width = processor.params.target_size(image.height, image.width)
        assert max(height, width) <= 24 and height % (PATCH * MERGE) == 0 and width % (PATCH * MERGE) == 0
    big = tiny_images()[3]
    assert processor.preprocess([big]).num_image_tokens[0] < our_processor(path).preprocess([big]).num_image_tokens[0]
    with pytest.raises(ValueError, match="max_edge"):
        QwenImageParams(max_edge=4)


def test_prompt_expansion_matches_transformers(checkpoint):
    _, _, processor, path = checkpoint
    tokenizer, _ = tokenizer_and_ids()
    ours = our_processor(path)
    images = tiny_images()[:2]
    text = prompt_text(2)
    inputs = ours.preprocess(images)
    expected = hf_inputs(processor, images, text)["input_ids"][0].tolist()
    assert tokenizer.encode(ours.expand_prompt(text, inputs)).ids == expected
    assert ours.count_placeholders(text) == 2
    with pytest.raises(ValueError, match="image placeholders"):
        ours.expand_prompt(prompt_text(1), inputs)


def test_rope_positions_match_transformers(checkpoint):
    _, hf, processor, path = checkpoint
    model = our_model(path)
    images = tiny_images()[:2]
    batch = hf_inputs(processor, images, prompt_text(2))
    positions, delta = hf.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                               image_grid_thw=batch["image_grid_thw"])
    got, got_delta = model.rope_positions(batch["input_ids"][0].tolist(), our_processor(path).preprocess(images))
    assert torch.equal(got, positions[:, 0]) and got_delta == int(delta)
    assert model.rope_positions(batch["input_ids"][0].tolist(), None) is None
    with pytest.raises(ValueError, match="image"):
        model.rope_positions(batch["input_ids"][0].tolist()[:20], our_processor(path).preprocess(images))


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_logits_match_transformers(checkpoint, num_images):
    _, hf, processor, path = checkpoint
    tokenizer, _ = tokenizer_and_ids()
    images = tiny_images()[:num_images]
    text = prompt_text(num_images)
    with torch.inference_mode():
        expected = hf(**hf_inputs(processor, images, text)).logits[0]
    got, _ = our_prompt_logits(our_model(path), our_processor(path), images, text, tokenizer)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bf16_prompt_logits_are_close_to_f32(checkpoint):
    _, _, _, path = checkpoint
    tokenizer, _ = tokenizer_and_ids()
    images, text = tiny_images()[:2], prompt_text(2)
    f32, _ = our_prompt_logits(our_model(path), our_processor(path), images, text, tokenizer)
    bf16, _ = our_prompt_logits(our_model(path, torch.bfloat16), our_processor(path), images, text, tokenizer)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, f32, atol=0.05 * f32.abs().max().item(), rtol=0)


def test_greedy_tokens_match_generate(checkpoint):
    _, hf, processor, path = checkpoint
    tokenizer, _ = tokenizer_and_ids()
    images = tiny_images()[:2]
    text = prompt_text(2)
    batch = hf_inputs(processor, images, text)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        expected = hf.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=0)[0]
    expected = expected[batch["input_ids"].shape[1]:].tolist()
    logits, driver = our_prompt_logits(our_model(path), our_processor(path), images, text, tokenizer)
    assert driver.delta != 0  # decoding really uses the M-RoPE delta
    got = []
    for _ in range(16):
        got.append(int(logits[-1].argmax()))
        logits = driver.step(got[-1:])
    assert got == expected
    assert len(set(expected)) > 1


def test_registered_under_both_names():
    assert vision_family_for(None, "Qwen2VL").model_cls is Qwen2VLForConditionalGeneration
    assert vision_family_for(["Qwen2_5_VLForConditionalGeneration"], None).model_cls is \
        Qwen2_5_VLForConditionalGeneration
    assert vision_family_for(None, "qwen2_5vl").processor_cls is Qwen2VLImageProcessor


def test_image_inputs_named_as_transformers():
    processor = Qwen2VLImageProcessor(QwenImageParams(patch_size=PATCH, merge_size=MERGE))
    inputs = processor.preprocess(tiny_images()[:1])
    assert isinstance(inputs, ImageInputs) and set(inputs.tensors) == {"pixel_values", "image_grid_thw"}


def published_layout(path: Path, out: Path) -> None:
    """The checkpoint in `path` rewritten as the Qwen repos publish it: a flat config.json (text fields at the top,
    `rope_scaling` type "mrope", the tower's `in_chans`), weights `model.*` / `visual.*` / `lm_head.*`,
    min/max_pixels keys."""
    from safetensors.torch import save_file

    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    vision = config["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    del vision["rope_parameters"], vision["model_type"]
    flat = {**config, **{k: v for k, v in text.items() if k != "model_type"}, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(flat))
    renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
    weights = {}
    for name, tensor in iter_safetensors(sorted(glob.glob(str(path / "*.safetensors"))), None):
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
        weights[name] = tensor.contiguous()
    save_file(weights, str(out / "model.safetensors"))
    pre = json.loads((path / "processor_config.json").read_text())["image_processor"]
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (out / "preprocessor_config.json").write_text(json.dumps(pre))


def test_published_layout_loads_the_same_model(checkpoint, tmp_path):
    _, _, _, path = checkpoint
    published_layout(path, tmp_path / "published")
    tokenizer, _ = tokenizer_and_ids()
    images = tiny_images()[:1]
    processor = our_processor(tmp_path / "published")
    assert (processor.params.min_pixels, processor.params.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    got, _ = our_prompt_logits(our_model(tmp_path / "published"), processor, images, prompt_text(1), tokenizer)
    expected, _ = our_prompt_logits(our_model(path), our_processor(path), images, prompt_text(1), tokenizer)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ChatML whose image parts print as Qwen2-VL's template prints them
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_greedy_banned(hf, processor, images, text: str, banned: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy tokens (whole-sequence forward calls: its M-RoPE index recomputed each step), the
    `banned` ids never chosen."""
    batch = dict(hf_inputs(processor, images, text))
    generated = []
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = hf(**batch).logits[0, -1]
            logits[banned] = float("-inf")
            generated.append(int(logits.argmax()))
            for key, value in (("input_ids", generated[-1]), ("mm_token_type_ids", 0), ("attention_mask", 1)):
                batch[key] = torch.cat([batch[key], torch.tensor([[value]])], dim=1)
    return generated


def test_greedy_tokens_through_a_runner(checkpoint, tmp_path, request):
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
    from tests.vision.tiny_vision import write_tokenizer_files

    family, hf, processor, path = checkpoint
    tokenizer, _ = tokenizer_and_ids()
    write_tokenizer_files(path, tokenizer, QWEN_CHAT_TEMPLATE)
    banned = list(range(len(CHARACTERS), tokenizer.get_vocab_size()))  # special tokens (no text round trip)
    files = []
    for i, image in enumerate(tiny_images()[:2]):
        files.append(str(tmp_path / f"image{i}.png"))
        image.save(files[-1])
    arch = VisionArchitecture.Qwen2VL if family == "qwen2_vl" else VisionArchitecture.Qwen2_5VL
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=arch, dtype=ModelDType.F32))
    request.addfinalizer(runner.close)

    def chat(content, on: Runner = runner) -> list[int]:
        response = on.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="qwen", max_tokens=16, temperature=0.0,
            logit_bias={i: -1e9 for i in banned}))
        usage.append(response.usage)
        return on.tokenize_text(response.choices[0].message.content, add_special_tokens=False)

    usage = []

    image = "<|vision_start|><|image_pad|><|vision_end|>"
    expected = hf_greedy_banned(hf, processor, tiny_images()[:2],
                                f"<|im_start|>user\nCompare{image} with {image} please.<|im_end|>\n"
                                "<|im_start|>assistant\n", banned, 16)
    assert len(set(expected)) > 1
    # the images placed by the chat template where their parts are
    placed = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": files[0]}},
              {"type": "text", "text": " with "}, {"type": "image_url", "image_url": {"url": files[1]}},
              {"type": "text", "text": " please."}]
    assert chat(placed) == expected
    # the reference's way: the placeholders typed in the text, the image parts after it
    typed = [{"type": "text", "text": f"Compare{image} with {image} please."},
             {"type": "image_url", "image_url": {"url": files[0]}},
             {"type": "image_url", "image_url": {"url": files[1]}}]
    assert chat(typed) == expected
    assert usage[-1].cached_prompt_tokens > 0  # the same images and text: a prefix-cache hit, same tokens
    # another first image of the same size (the same prompt tokens): a prefix-cache miss, and that image's tokens
    other = Image.fromarray(255 - np.asarray(tiny_images()[0]))
    other.save(str(tmp_path / "other.png"))
    swapped = [dict(part, image_url={"url": str(tmp_path / "other.png")}) if i == 1 else part
               for i, part in enumerate(placed)]
    other_text = f"<|im_start|>user\nCompare{image} with {image} please.<|im_end|>\n<|im_start|>assistant\n"
    assert chat(swapped) == hf_greedy_banned(hf, processor, [other, tiny_images()[1]], other_text, banned, 16)
    assert usage[-1].cached_prompt_tokens == 0
    # 7-token prefill chunks split the images' runs: M-RoPE positions and features sliced per chunk
    chunked = Runner(Which.VisionPlain(model_id=str(path), arch=arch, dtype=ModelDType.F32), prompt_chunksize=7)
    request.addfinalizer(chunked.close)
    assert chat(placed, chunked) == expected
    # concurrent requests (two images, one image, text only) share steps; each gets its lone result
    contents = [placed, [{"type": "image_url", "image_url": {"url": files[1]}}, {"type": "text", "text": "and?"}],
                "Just text."]
    alone = [chat(content) for content in contents]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(contents))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = chat(contents[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(contents))] == alone
