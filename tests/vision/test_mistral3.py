"""Mistral3ForConditionalGeneration against transformers on a tiny random checkpoint: processor, prompt logits
with one and with two images (f32, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer

from mistralrs.loader.safetensors_loader import iter_safetensors
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.mistral3 import Mistral3ForConditionalGeneration, PixtralProcessor
from mistralrs.vision.registry import vision_family_for
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.models.family_harness import sharpen
from tests.tiny_models import CHARACTERS, CHATML, EOS_TOKEN_ID, char_tokenizer
from tests.vision.test_mistral3_parts import pixtral_replace_image_token
from tests.vision.tiny_vision import alone_and_together

transformers = pytest.importorskip("transformers")
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil  # noqa: E402

IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
PATCH, MERGE, LONGEST_EDGE = 4, 2, 40
BLOCK_SIZE = 4


def make_tiny_mistral3_dir(path: Path, seed: int = 0) -> transformers.Mistral3ForConditionalGeneration:
    """A random tiny Mistral 3 checkpoint with its processor files and tokenizer in `path` (the model, f32 eval)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens(IMAGE_TOKENS)
    text = transformers.MistralConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, bos_token_id=0, eos_token_id=EOS_TOKEN_ID,
                                      rms_norm_eps=1e-5, sliding_window=None)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, patch_size=PATCH, image_size=LONGEST_EDGE,
                                              hidden_act="silu")
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=MERGE,
                                         image_token_index=tokenizer.token_to_id("[IMG]"))
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    sharpen(model, seed=seed + 1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    image_processor = PixtralImageProcessorPil(patch_size={"height": PATCH, "width": PATCH},
                                               size={"longest_edge": LONGEST_EDGE})
    (path / "preprocessor_config.json").write_text(json.dumps(image_processor.to_dict()))
    (path / "processor_config.json").write_text(json.dumps({
        "patch_size": PATCH, "spatial_merge_size": MERGE, "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]", "processor_class": "PixtralProcessor"}))
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "chat_template": CHATML}))
    return model


def images(*sizes: tuple[int, int]) -> list[PIL.Image.Image]:
    """Random RGB images of (width, height) `sizes`."""
    rng = np.random.default_rng(len(sizes))
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def processor_files(path: Path) -> ProcessorFiles:
    return ProcessorFiles(json.loads((path / "preprocessor_config.json").read_text()),
                          json.loads((path / "processor_config.json").read_text()))


def load_ours(path: Path, dtype: torch.dtype = torch.float32) -> Mistral3ForConditionalGeneration:
    config = json.loads((path / "config.json").read_text())
    model = Mistral3ForConditionalGeneration(config, dtype=dtype, device="cpu")
    provided = dict(iter_safetensors(sorted(str(p) for p in path.glob("*.safetensors")), dtype))
    names = {model.canonical_weight_name(n) for n in provided}
    consumed = model.load_weights((model.canonical_weight_name(n), t) for n, t in provided.items())
    assert consumed == names and model.expected_weight_names() <= consumed
    return model.eval()


def prompt_logits(model, token_ids: list[int], inputs) -> torch.Tensor:
    """Our prompt logits `[len, vocab]`: text embeddings with the image rows spliced in, one prefill chunk."""
    num_blocks = len(token_ids) // BLOCK_SIZE + 1
    caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, BLOCK_SIZE, model.dtype, "cpu")
    fb = ForwardBatch.build([SeqChunk(token_ids, 0, list(range(num_blocks)))], BLOCK_SIZE, caches, "cpu")
    with torch.inference_mode():
        embeds = model.embed(fb.input_ids)
        embeds[fb.input_ids == model.image_token_id] = model.encode_images(inputs)
        return model.compute_logits(model(fb.input_ids, fb.positions, fb, inputs_embeds=embeds))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral3")
    return path, make_tiny_mistral3_dir(path)


def test_registered_under_its_names():
    assert vision_family_for(["Mistral3ForConditionalGeneration"], None).model_cls is Mistral3ForConditionalGeneration
    assert vision_family_for(None, "Mistral3").processor_cls is PixtralProcessor


def test_processor_matches_transformers(checkpoint):
    path, _ = checkpoint
    processor = PixtralProcessor.from_checkpoint(processor_files(path), {}, None)
    pictures = images((50, 30), (13, 70))
    inputs = processor.preprocess(pictures)
    expected = PixtralImageProcessorPil.from_pretrained(path)(pictures, patch_size=PATCH * MERGE,
                                                              return_tensors="pt")
    torch.testing.assert_close(inputs.tensors["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert inputs.tensors["image_sizes"].tolist() == expected["image_sizes"].tolist()
    fake = SimpleNamespace(patch_size=PATCH, spatial_merge_size=MERGE, image_token="[IMG]",
                           image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    grids = [pixtral_replace_image_token(fake, {"image_sizes": expected["image_sizes"]}, i) for i in range(2)]
    assert processor.expand_prompt("a[IMG]b[IMG]", inputs) == f"a{grids[0]}b{grids[1]}"
    assert inputs.num_image_tokens == [grid.count("[IMG]") for grid in grids]
    with pytest.raises(ValueError, match="1 image placeholders"):
        processor.expand_prompt("a[IMG]b", inputs)


@pytest.mark.parametrize("sizes", [[(50, 30)], [(50, 30), (20, 44)]])
def test_prompt_logits_match_transformers(checkpoint, sizes):
    path, hf = checkpoint
    ours = load_ours(path)
    processor = PixtralProcessor.from_checkpoint(processor_files(path), {}, None)
    inputs = processor.preprocess(images(*sizes))
    text = "<|im_start|>user\n" + "".join(f"look {i}:[IMG]\n" for i in range(len(sizes))) + "what?<|im_end|>\n"
    token_ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(processor.expand_prompt(text, inputs)).ids
    assert token_ids.count(ours.image_token_id) == sum(inputs.num_image_tokens)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([token_ids]), pixel_values=inputs.tensors["pixel_values"],
                      image_sizes=inputs.tensors["image_sizes"]).logits[0]
    torch.testing.assert_close(prompt_logits(ours, token_ids, inputs), expected, atol=1e-4, rtol=0)


def test_text_only_with_which_plain(checkpoint):
    """A Mistral 3 checkpoint loads text-only with `Which.Plain` (the decoder's weights alone) and greedy-decodes as
    transformers' full model does on a text prompt."""
    from mistralrs import CompletionRequest, ModelDType, Runner, Which

    path, hf = checkpoint
    runner = Runner(Which.Plain(model_id=str(path), dtype=ModelDType.F32))
    try:
        prompt = "Hello there, tiny model!"
        ids = runner.tokenize_text(prompt, add_special_tokens=False)
        special = list(range(len(CHARACTERS), hf.config.text_config.vocab_size))  # ChatML and image tokens
        expected = []
        with torch.no_grad():
            for _ in range(16):
                logits = hf(input_ids=torch.tensor([ids + expected])).logits[0, -1]
                logits[special] = float("-inf")
                expected.append(int(logits.argmax()))
        response = runner.send_completion_request(CompletionRequest(
            prompt=prompt, model="tiny", max_tokens=16, temperature=0.0, logit_bias={i: -1e9 for i in special}))
        assert runner.tokenize_text(response.choices[0].text, False) == expected
    finally:
        runner.close()


def test_text_only_weight_names_in_both_layouts():
    from mistralrs.loader.text_only import text_only_config, text_only_weights

    config = {"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"model_type": "mistral"}}
    names = ["language_model.model.norm.weight", "language_model.lm_head.weight", "vision_tower.ln_pre.weight",
             "model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight",
             "model.multi_modal_projector.norm.weight"]
    renamed = [n for n, _ in text_only_weights(config, ((n, None) for n in names))]
    assert renamed == ["model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert text_only_config(config)["architectures"] == ["MistralForCausalLM"]
    assert text_only_config({"architectures": ["MistralForCausalLM"]}) == {"architectures": ["MistralForCausalLM"]}


def test_bfloat16_follows_float32(checkpoint):
    """The tower, projector and decoder run in bfloat16 (conv, RMSNorms, RoPE tables, splice) close to float32."""
    path, _ = checkpoint
    processor = PixtralProcessor.from_checkpoint(processor_files(path), {}, None)
    inputs = processor.preprocess(images((50, 30), (20, 44)))
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(processor.expand_prompt("a[IMG]b[IMG]c", inputs)).ids
    full = prompt_logits(load_ours(path), ids, inputs)
    half = prompt_logits(load_ours(path, torch.bfloat16), ids, inputs)
    torch.testing.assert_close(half, full, atol=0.25, rtol=0)
    assert torch.equal(half[-1].argmax(), full[-1].argmax())


def test_decoder_config_from_text_config(checkpoint):
    """The decoder keeps text_config's null sliding window and the top-level LM-head tying (transformers 5's)."""
    path, hf = checkpoint
    ours = load_ours(path)
    assert [layer.self_attn.attn.sliding_window for layer in ours.language_model.model.layers] == [None, None]
    assert hf.config.tie_word_embeddings
    assert ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight


def chat_visible(token_ids: list[int]) -> list[int]:
    """`token_ids` (character tokens) as a chat answer shows them: from the first non-whitespace one on."""
    start = next((i for i, t in enumerate(token_ids) if not CHARACTERS[t].isspace()), len(token_ids))
    return token_ids[start:]


def hf_greedy(hf, path: Path, pictures: list[PIL.Image.Image], prompt: str, banned: list[int]) -> list[int]:
    """transformers' greedy continuation (full forward passes) of `prompt` with `pictures`, expanded and
    preprocessed as the checks above show transformers' processor does it, as a chat answer shows it."""
    processor = PixtralProcessor.from_checkpoint(processor_files(path), {}, None)
    inputs = processor.preprocess(pictures)
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(processor.expand_prompt(prompt, inputs)).ids
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(16):
            logits = hf(input_ids=torch.tensor([ids + generated]), pixel_values=inputs.tensors["pixel_values"],
                        image_sizes=inputs.tensors["image_sizes"]).logits[0, -1]
            logits[banned] = float("-inf")
            generated.append(int(logits.argmax()))
    return chat_visible(generated)


def test_greedy_tokens_match_transformers_through_a_runner(checkpoint, tmp_path):
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which

    path, hf = checkpoint
    pictures = images((50, 30), (20, 44))
    files = []
    for i, picture in enumerate(pictures):
        files.append(str(tmp_path / f"image{i}.png"))
        picture.save(files[-1])
    banned = list(range(len(CHARACTERS), hf.config.text_config.vocab_size))  # ChatML and image tokens

    def answer(content) -> list[int]:
        response = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="tiny", max_tokens=16, temperature=0.0,
            logit_bias={i: -1e9 for i in banned}))
        return runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)

    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32))
    try:
        one = [{"type": "image_url", "image_url": {"url": files[0]}}, {"type": "text", "text": "What is it?"}]
        prompt = "<|im_start|>user\n[IMG]\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
        assert answer(one) == hf_greedy(hf, path, pictures[:1], prompt, banned)
        two = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": files[0]}},
               {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": files[1]}}]
        prompt = "<|im_start|>user\nCompare\n[IMG]\nwith\n[IMG]<|im_end|>\n<|im_start|>assistant\n"
        assert answer(two) == hf_greedy(hf, path, pictures, prompt, banned)
    finally:
        runner.close()


def test_batched_image_and_text_requests_give_their_lone_results(checkpoint, tmp_path):
    """Two image requests whose images share a size (encoded in one tower call, attention kept per image) and a
    text-only request, sent together, answer as each does alone."""
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which

    path, hf = checkpoint
    files = []
    for i, picture in enumerate(images((50, 30), (50, 30))):
        files.append(str(tmp_path / f"image{i}.png"))
        picture.save(files[-1])
    bias = {i: -1e9 for i in range(len(CHARACTERS), hf.config.text_config.vocab_size)}
    contents = [[{"type": "image_url", "image_url": {"url": f}}, {"type": "text", "text": "What is it?"}]
                for f in files] + ["Just text, please."]
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32))

    def answer(content) -> str:
        return runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="tiny", max_tokens=16, temperature=0.0,
            logit_bias=bias)).choices[0].message.content

    try:
        alone, together = alone_and_together(answer, contents)
    finally:
        runner.close()
    assert alone[0] != alone[1]
    assert together == alone


def test_text_only_refuses_uqff(checkpoint, tmp_path):
    from mistralrs import ModelDType, Which
    from tests.loading import load_which

    path, _ = checkpoint
    with pytest.raises(ValueError, match="write_uqff are not supported for the text decoder"):
        load_which(Which.Plain(model_id=str(path), dtype=ModelDType.F32, write_uqff=str(tmp_path / "x.uqff")),
                   in_situ_quant="Q8_0")


def test_a_template_that_prints_image_parts_places_the_images(checkpoint, tmp_path):
    """Mistral-Small-3.1's template prints `[IMG]` for an image part; a template doing so places the images."""
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
    from tests.vision.tiny_vision import CHATML_WITH_IMAGES

    path, hf = checkpoint
    picture = images((20, 44))[0]
    picture.save(tmp_path / "image.png")
    banned = list(range(len(CHARACTERS), hf.config.text_config.vocab_size))
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32),
                    chat_template=CHATML_WITH_IMAGES.replace("<image>", "[IMG]"))
    try:
        content = [{"type": "text", "text": "Look: "},
                   {"type": "image_url", "image_url": {"url": str(tmp_path / "image.png")}}]
        response = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="tiny", max_tokens=16, temperature=0.0,
            logit_bias={i: -1e9 for i in banned}))
        tokens = runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)
    finally:
        runner.close()
    prompt = "<|im_start|>user\nLook: [IMG]<|im_end|>\n<|im_start|>assistant\n"
    assert tokens == hf_greedy(hf, path, [picture], prompt, banned)


def test_chunked_prefill_across_the_image_grid(checkpoint, tmp_path):
    """Prefill chunks of 5 tokens cut the `[IMG]` rows and their `[IMG_BREAK]`s anywhere: same tokens."""
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which

    path, hf = checkpoint
    picture = images((50, 30))[0]
    picture.save(tmp_path / "image.png")
    banned = list(range(len(CHARACTERS), hf.config.text_config.vocab_size))
    runner = Runner(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32),
                    prompt_chunksize=5)
    try:
        content = [{"type": "image_url", "image_url": {"url": str(tmp_path / "image.png")}},
                   {"type": "text", "text": "What is it?"}]
        response = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": content}], model="tiny", max_tokens=16, temperature=0.0,
            logit_bias={i: -1e9 for i in banned}))
        tokens = runner.tokenize_text(response.choices[0].message.content, add_special_tokens=False)
    finally:
        runner.close()
    prompt = "<|im_start|>user\n[IMG]\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    assert tokens == hf_greedy(hf, path, [picture], prompt, banned)


@pytest.mark.parametrize("given", ["full", "bare"])
def test_published_sizes_build_with_transformers_names(given):
    """transformers' default Mistral3Config (Mistral-Small-3.1's sizes), built on the meta device: our model needs
    exactly the checkpoint names (published layout) transformers' model has, with the same shapes; a config.json
    without sub-configs means the same sizes as transformers' defaults. The LM head: transformers 5 writes the
    top-level `tie_word_embeddings` (true by default: tied); without the key (the published Mistral-Small-3.1
    config.json) the head is text_config's own weight, which those checkpoints carry."""
    config = transformers.Mistral3Config()
    with torch.device("meta"):
        hf = transformers.Mistral3ForConditionalGeneration(config)
    shapes = {Mistral3ForConditionalGeneration.canonical_weight_name(n): t.shape for n, t in hf.state_dict().items()}
    names = set(shapes) - {"language_model.lm_head.weight"}
    if given == "bare":
        names.add("language_model.lm_head.weight")
    config_dict = config.to_dict() if given == "full" else {"architectures": ["Mistral3ForConditionalGeneration"]}
    ours = Mistral3ForConditionalGeneration(config_dict, dtype=torch.bfloat16, device="meta")
    assert ours.expected_weight_names() == names
    vision = {n: p.shape for n, p in ours.named_parameters() if not n.startswith("language_model.")}
    assert vision == {n: shapes[n] for n in vision}
    assert ours.language_model.model.layers[0].self_attn.qkv_proj.weight.shape == ((32 + 2 * 8) * 128, 5120)


def test_max_edge_reaches_the_processor(checkpoint):
    from mistralrs import ModelDType, VisionArchitecture, Which
    from tests.loading import load_which

    path, _ = checkpoint
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32,
                                          max_edge=16))
    assert loaded.vision_processor.options.longest_edge == 16
    inputs = loaded.vision_processor.preprocess(images((50, 30)))
    assert inputs.tensors["image_sizes"].tolist() == [[16, 16]]  # 30x50 -> 9x16 -> up to multiples of 8


def test_in_situ_quant_applies_to_the_text_decoder_only(checkpoint):
    from mistralrs import ModelDType, VisionArchitecture, Which
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod
    from tests.loading import load_which

    path, hf = checkpoint
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32),
                        in_situ_quant="Q8_0")
    decoder = [m for m in loaded.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder)
    for part in (loaded.model.vision_tower, loaded.model.multi_modal_projector):
        assert not any(isinstance(m, Linear) for m in part.modules())
    tower = loaded.model.vision_tower.transformer.layers[0].attention.q_proj.weight
    assert torch.equal(tower, hf.model.vision_tower.transformer.layers[0].attention.q_proj.weight)
    inputs = loaded.vision_processor.preprocess(images((50, 30)))
    prompt = [5] + [loaded.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    assert torch.isfinite(prompt_logits(loaded.model, prompt, inputs)).all()


def test_write_uqff_then_from_uqff_gives_the_same_model(checkpoint, tmp_path):
    import shutil

    from mistralrs import ModelDType, VisionArchitecture, Which
    from tests.loading import load_which

    path, _ = checkpoint
    shutil.copytree(path, tmp_path / "model")
    arch = dict(arch=VisionArchitecture.Mistral3, dtype=ModelDType.F32)
    quantized = load_which(Which.VisionPlain(model_id=str(tmp_path / "model"), **arch,
                                             write_uqff=str(tmp_path / "out" / "m3-q8_0.uqff")), in_situ_quant="Q8_0")
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path / "out"), **arch, from_uqff="m3-q8_0.uqff"))
    inputs = quantized.vision_processor.preprocess(images((50, 30), (20, 44)))
    assert reloaded.vision_processor.options == quantized.vision_processor.options  # the processor files copied
    prompt = [5] + [quantized.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    assert torch.equal(prompt_logits(reloaded.model, prompt, inputs), prompt_logits(quantized.model, prompt, inputs))
