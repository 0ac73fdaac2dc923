"""LlavaNextForConditionalGeneration against transformers on a tiny random checkpoint: processor (pixel values and
token expansion of `LlavaNextProcessor`), prompt logits with one and with two images (f32, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer

from mistralrs.loader.safetensors_loader import iter_safetensors
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.llava_next import DEFAULT_PINPOINTS, LlavaNextForConditionalGeneration, LlavaNextProcessor
from mistralrs.vision.registry import vision_family_for
from tests.models.family_harness import sharpen
from tests.tiny_models import CHARACTERS, CHATML, EOS_TOKEN_ID, char_tokenizer
from tests.vision.test_mistral3 import chat_visible, prompt_logits

transformers = pytest.importorskip("transformers")
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402

TILE, PATCH = 16, 4
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
PROCESSOR_CONFIG = {"image_token": "<image>", "patch_size": PATCH, "vision_feature_select_strategy": "default",
                    "num_additional_image_tokens": 1}


def make_tiny_llava_next_dir(path: Path, seed: int = 0, text_arch: str = "llama"):
    """A random tiny LLaVA-NeXT checkpoint with its processor files and tokenizer in `path`; returns (the model f32
    eval, transformers' processor)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens(["<image>"])
    common = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=EOS_TOKEN_ID, tie_word_embeddings=False)
    text = (transformers.LlamaConfig(**common) if text_arch == "llama"
            else transformers.MistralConfig(**common, sliding_window=None))
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=TILE, patch_size=PATCH,
                                           projection_dim=32, hidden_act="quick_gelu")
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                          image_token_index=tokenizer.token_to_id("<image>"), vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    sharpen(model, seed=seed + 1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE},
                                                 crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=PINPOINTS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=fast, **PROCESSOR_CONFIG)
    processor.save_pretrained(path)  # transformers 5's layout: the image processor inside processor_config.json
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "chat_template": CHATML}))
    return model, processor


def images(*sizes: tuple[int, int]) -> list[PIL.Image.Image]:
    """Random RGB images of (width, height) `sizes`."""
    rng = np.random.default_rng(len(sizes))
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def load_ours(path: Path) -> LlavaNextForConditionalGeneration:
    config = json.loads((path / "config.json").read_text())
    model = LlavaNextForConditionalGeneration(config, dtype=torch.float32, device="cpu")
    provided = dict(iter_safetensors(sorted(str(p) for p in path.glob("*.safetensors")), torch.float32))
    names = {model.canonical_weight_name(n) for n in provided}
    consumed = model.load_weights((model.canonical_weight_name(n), t) for n, t in provided.items())
    assert consumed == names and model.expected_weight_names() <= consumed
    return model.eval()


def our_processor(path: Path) -> LlavaNextProcessor:
    assert not (path / "preprocessor_config.json").exists()
    files = ProcessorFiles(processor_config=json.loads((path / "processor_config.json").read_text()))
    return LlavaNextProcessor.from_checkpoint(files, json.loads((path / "config.json").read_text()), None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next")
    return (path, *make_tiny_llava_next_dir(path))


def test_registered_under_its_names():
    family = vision_family_for(["LlavaNextForConditionalGeneration"], None)
    assert family.model_cls is LlavaNextForConditionalGeneration
    assert vision_family_for(None, "LLaVANext").processor_cls is LlavaNextProcessor


@pytest.mark.parametrize("sizes", [[(40, 30)], [(24, 50), (9, 14), (100, 20)]])
def test_processor_matches_transformers(checkpoint, sizes):
    path, _, hf_processor = checkpoint
    pictures = images(*sizes)
    text = "<|im_start|>user\n" + "".join(f"look {i}:<image>\n" for i in range(len(sizes))) + "what?"
    expected = hf_processor(text=[text], images=pictures, return_tensors="pt")
    processor = our_processor(path)
    inputs = processor.preprocess(pictures)
    torch.testing.assert_close(inputs.tensors["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert inputs.tensors["image_sizes"].tolist() == expected["image_sizes"].tolist()
    token_ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(processor.expand_prompt(text, inputs)).ids
    assert token_ids == expected["input_ids"][0].tolist()
    with pytest.raises(ValueError, match="placeholders"):
        processor.expand_prompt(text + "<image>", inputs)


@pytest.mark.parametrize("sizes", [[(40, 30)], [(24, 50), (100, 20)]])
def test_prompt_logits_match_transformers(checkpoint, sizes):
    path, hf, hf_processor = checkpoint
    ours = load_ours(path)
    text = "<|im_start|>user\n" + "".join(f"look {i}:<image>\n" for i in range(len(sizes))) + "what?<|im_end|>\n"
    expected_inputs = hf_processor(text=[text], images=images(*sizes), return_tensors="pt")
    inputs = our_processor(path).preprocess(images(*sizes))
    token_ids = expected_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = hf(**expected_inputs).logits[0]
    torch.testing.assert_close(prompt_logits(ours, token_ids, inputs), expected, atol=1e-4, rtol=0)


def test_full_strategy_is_refused(checkpoint):
    path, _, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LlavaNextForConditionalGeneration({**config, "vision_feature_select_strategy": "full"}, dtype=torch.float32,
                                          device="cpu")


def test_mistral_decoder_keeps_a_null_sliding_window(tmp_path):
    """`"sliding_window": null` in text_config means full attention (as transformers reads it), not the
    MistralConfig default window of 4096."""
    make_tiny_llava_next_dir(tmp_path, text_arch="mistral")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["sliding_window"] is None
    model = LlavaNextForConditionalGeneration(config, dtype=torch.float32, device="cpu")
    assert [layer.self_attn.attn.sliding_window for layer in model.language_model.model.layers] == [None, None]


def test_greedy_tokens_match_transformers_through_a_runner(checkpoint, tmp_path):
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which

    path, hf, hf_processor = checkpoint
    pictures = images((40, 30), (100, 20))
    files = []
    for i, picture in enumerate(pictures):
        files.append(str(tmp_path / f"image{i}.png"))
        picture.save(files[-1])
    banned = list(range(len(CHARACTERS), hf.config.text_config.vocab_size))  # ChatML and <image>

    def expected(prompt: str, count: int) -> list[int]:
        inputs = hf_processor(text=[prompt], images=pictures[:count], return_tensors="pt")
        ids = inputs.pop("input_ids")
        with torch.no_grad():
            for _ in range(16):
                logits = hf(input_ids=ids, **inputs).logits[0, -1]
                logits[banned] = float("-inf")
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        return chat_visible(ids[0, -16:].tolist())

    def answer(content) -> list[int]:
        response = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="tiny", max_tokens=16, temperature=0.0,
            logit_bias={i: -1e9 for i in banned}))
        return runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)

    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.LLaVANext, dtype=ModelDType.F32))
    try:
        one = [{"type": "image_url", "image_url": {"url": files[0]}}, {"type": "text", "text": "What is it?"}]
        assert answer(one) == expected("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n", 1)
        typed = [{"type": "text", "text": "Compare <image> with <image>"},
                 {"type": "image_url", "image_url": {"url": files[0]}},
                 {"type": "image_url", "image_url": {"url": files[1]}}]
        prompt = "<|im_start|>user\nCompare <image> with <image><|im_end|>\n<|im_start|>assistant\n"
        assert answer(typed) == expected(prompt, 2)
    finally:
        runner.close()


def test_published_sizes_build_with_transformers_names():
    """transformers' default LlavaNextConfig (LLaVA 1.6's sizes) on the meta device: our model needs exactly the
    checkpoint names (published layout) transformers' model has, `image_newline` included."""
    config = transformers.LlavaNextConfig()
    with torch.device("meta"):
        hf = transformers.LlavaNextForConditionalGeneration(config)
    names = {LlavaNextForConditionalGeneration.canonical_weight_name(n) for n in hf.state_dict()}
    ours = LlavaNextForConditionalGeneration(config.to_dict(), dtype=torch.bfloat16, device="meta")
    assert "image_newline" in names
    assert ours.expected_weight_names() == names
    assert ours.image_newline.shape == (4096,) and ours.pinpoints == DEFAULT_PINPOINTS


def test_which_plain_names_which_visionplain(checkpoint):
    """A vision family without a text-only load answers `Which.Plain` with an error naming `Which.VisionPlain`."""
    from mistralrs import ModelDType, Which
    from tests.loading import load_which

    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration checkpoints load with Which.VisionPlain"):
        load_which(Which.Plain(model_id=str(path), dtype=ModelDType.F32))


def test_tiles_must_be_the_tower_size(checkpoint):
    path, _, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    params = json.loads((path / "processor_config.json").read_text())
    params["image_processor"]["crop_size"] = {"height": 8, "width": 8}
    with pytest.raises(ValueError, match="crop_size"):
        LlavaNextProcessor.from_checkpoint(ProcessorFiles(processor_config=params), config, None)
    params["image_processor"]["crop_size"] = {"height": TILE, "width": TILE}
    params["image_processor"]["image_grid_pinpoints"] = [[16, 16]]
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaNextProcessor.from_checkpoint(ProcessorFiles(processor_config=params), config, None)
