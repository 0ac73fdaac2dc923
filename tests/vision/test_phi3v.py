"""Phi3V (remote code, not in transformers): each part against a hand-written formulation, and the whole model on a
tiny checkpoint in the published layout against transformers' CLIP and Phi-3 composed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ImageInputs, ProcessorFiles
from mistralrs.vision.phi3v import (
    IMAGE_TOKEN, Phi3VForCausalLM, Phi3VProcessor, hd_sizes, hd_transform, merge_2x2, num_image_tokens,
)
from tests.loading import load_which
from tests.tiny_models import CHATML, EOS_TOKEN_ID
from tests.vision.tiny_vision import (
    LLAVA_BANNED, NUM_GREEDY_TOKENS, alone_and_together, chat_tokens, char_tokenizer_with, image_part,
    vision_prompt_logits, write_tokenizer_files,
)

CROP, PATCH, NUM_CROPS = 28, 7, 4  # the tiny tower: 4x4 patches per crop, 2x2 merged tokens per crop
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("size,num_crops,crop,resized,padded,before", [
    ((1000, 500), 16, 336, (1680, 840), (1680, 1008), 84),  # ratio 2: scale 5 (5*3=15 <= 16; 6*3=18 > 16)
    ((500, 1000), 16, 336, (840, 1680), (1008, 1680), 84),  # portrait: the same, transposed
    ((640, 480), 4, 336, (672, 504), (672, 672), 84),  # ratio 4/3: scale 2 (2*2=4), 504 -> 672
    ((300, 300), 4, 336, (672, 672), (672, 672), 0),  # square: 2x2
    ((40, 30), 4, 28, (56, 42), (56, 56), 7),
    ((9, 14), 4, 28, (36, 56), (56, 56), 10),  # portrait 14/9: scale 2 on the long side, 36 wide -> 56
])
def test_hd_sizes_by_hand(size, num_crops, crop, resized, padded, before):
    assert hd_sizes(*size, num_crops, crop) == (resized, padded, before)


def test_an_image_too_elongated_for_the_grid_is_a_value_error():
    with pytest.raises(ValueError, match="too elongated"):
        hd_sizes(2000, 1, 4, 336)
    assert hd_sizes(1344, 1, 4, 336)[0] == (1344, 1)


def test_hd_transform_pads_in_white_around_the_resized_image():
    image = Image.fromarray(np.full((30, 40, 3), 7, dtype=np.uint8), "RGB")
    out = np.asarray(hd_transform(image, 4, 28))
    assert out.shape == (56, 56, 3)
    assert (out[:7] == 255).all() and (out[49:] == 255).all() and (out[7:49] == 7).all()
    tall = np.asarray(hd_transform(Image.fromarray(np.zeros((14, 9, 3), dtype=np.uint8), "RGB"), 4, 28))
    assert (tall[:, :10] == 255).all() and (tall[:, 46:] == 255).all() and (tall[:, 10:46] == 0).all()


def test_token_count_formula():
    assert num_image_tokens(672, 672, 336, 12) == (2 * 2 + 1) * 144 + 1 + (2 + 1) * 12 == 757
    assert num_image_tokens(1008, 1680, 336, 12) == (3 * 5 + 1) * 144 + 1 + 4 * 12
    assert num_image_tokens(56, 28, 28, 2) == (2 * 1 + 1) * 4 + 1 + 3 * 2


def test_processor_crops_by_hand():
    processor = Phi3VProcessor(NUM_CROPS, CROP, 2, MEAN, STD)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    inputs = processor.preprocess([image])
    assert inputs.tensors["pixel_values"].shape == (1, NUM_CROPS + 1, 3, CROP, CROP)
    assert inputs.tensors["image_sizes"].tolist() == [[56, 56]]
    assert inputs.num_image_tokens == [num_image_tokens(56, 56, CROP, 2)]
    hd = np.asarray(hd_transform(image, NUM_CROPS, CROP), dtype=np.float32) / 255.0
    hd = (hd - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    pixels = inputs.tensors["pixel_values"][0]
    for row in range(2):
        for col in range(2):
            expected = hd[row * CROP:(row + 1) * CROP, col * CROP:(col + 1) * CROP].transpose(2, 0, 1)
            assert np.allclose(pixels[1 + row * 2 + col].numpy(), expected, atol=1e-6)
    glb = F.interpolate(torch.from_numpy(hd.transpose(2, 0, 1).copy())[None], size=(CROP, CROP), mode="bicubic")
    assert torch.allclose(pixels[0], glb[0], atol=1e-6)


def test_placeholders_expand_in_order():
    processor = Phi3VProcessor(NUM_CROPS, CROP, 2, MEAN, STD)
    inputs = ImageInputs({}, [3, 5], "d")
    assert processor.count_placeholders("a<|image_1|>b<|image_2|>") == 2
    assert processor.expand_prompt("a<|image_1|>b<|image_2|>c", inputs) == \
        "a" + IMAGE_TOKEN * 3 + "b" + IMAGE_TOKEN * 5 + "c"
    with pytest.raises(ValueError, match="in order, one per image"):
        processor.expand_prompt("a<|image_2|>b<|image_1|>", inputs)
    with pytest.raises(ValueError, match="in order, one per image"):
        processor.expand_prompt("a<|image_1|>", inputs)


def test_text_after_each_image_starts_with_bos_when_the_tokenizer_adds_one():
    """The published processor tokenizes the text after each image as a new sequence (BOS first)."""
    inputs = ImageInputs({}, [2, 1], "d")
    for tokenizer_config, after in [({"bos_token": "<s>", "add_bos_token": True}, "<s>"),
                                    ({"bos_token": {"content": "<s>"}}, "<s>"),
                                    ({"bos_token": "<s>", "add_bos_token": False}, ""), ({}, "")]:
        processor = Phi3VProcessor.from_checkpoint(ProcessorFiles(tokenizer_config=tokenizer_config),
                                                   tiny_config(100, 99), None)
        assert processor.expand_prompt("<|image_1|>a<|image_2|>", inputs) == \
            IMAGE_TOKEN * 2 + after + "a" + IMAGE_TOKEN + after


def test_merge_2x2_by_loop():
    x = torch.randn(2, 4, 4, 3)
    merged = merge_2x2(x)
    for b in range(2):
        for r in range(2):
            for c in range(2):
                expected = torch.cat([x[b, 2 * r, 2 * c], x[b, 2 * r, 2 * c + 1], x[b, 2 * r + 1, 2 * c],
                                      x[b, 2 * r + 1, 2 * c + 1]])
                assert torch.equal(merged[b, r, c], expected)


def explicit_layout(merged: torch.Tensor, rows: int, cols: int, sub_gn: torch.Tensor, glb_gn: torch.Tensor,
                    order: str) -> torch.Tensor:
    """The separator layout by loops: global rows each closed by sub_GN; sub-image rows over the whole grid each
    closed by sub_GN; glb_GN between the two halves."""
    m = merged.shape[1]
    glb = []
    for r in range(m):
        glb += [merged[0, r, c] for c in range(m)] + [sub_gn]
    sub = []
    for r in range(rows * m):
        for c in range(cols * m):
            crop = 1 + (r // m) * cols + c // m
            sub.append(merged[crop, r % m, c % m])
        sub.append(sub_gn)
    parts = sub + [glb_gn] + glb if order == "sub_glb" else glb + [glb_gn] + sub
    return torch.stack(parts)


def tiny_config(vocab_size: int, image_token_id: int, order: str = "sub_glb") -> dict:
    """A tiny Phi3V config.json: Phi-3 text fields at the top level, the tower in img_processor.vision_config."""
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  image_size=CROP, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return dict(architectures=["Phi3VForCausalLM"], model_type="phi3_v", vocab_size=vocab_size, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0, pad_token_id=0,
                eos_token_id=EOS_TOKEN_ID, tie_word_embeddings=False, image_token_id=image_token_id,
                img_processor=dict(name="clip_vision_model", image_dim_out=16, num_img_tokens=4, layer_idx=-2,
                                   type_feature="patch", vision_config=vision),
                embd_layer=dict(embedding_cls="image", hd_transform_order=order, projection_cls="mlp",
                                use_hd_transform=True, with_learnable_separator=True))


def write_tiny_phi3v(path, order: str = "sub_glb", seed: int = 0):
    """A random tiny Phi3V checkpoint in the published layout; returns (transformers Phi3, CLIP, vision tensors)."""
    import transformers

    tokenizer = char_tokenizer_with([IMAGE_TOKEN])
    config = tiny_config(tokenizer.get_vocab_size(), tokenizer.token_to_id(IMAGE_TOKEN), order)
    torch.manual_seed(seed)
    text_cfg = {k: v for k, v in config.items() if k not in ("img_processor", "embd_layer", "architectures",
                                                           "model_type", "image_token_id")}
    text = transformers.Phi3ForCausalLM(transformers.Phi3Config(**text_cfg, initializer_range=0.2)).eval()
    with torch.no_grad():
        text.lm_head.weight.mul_(8.0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **config["img_processor"]["vision_config"], projection_dim=16)).eval()
    width, hidden = 4 * 16, 32
    extra = {"img_projection.0.weight": torch.randn(hidden, width) * 0.2, "img_projection.0.bias": torch.randn(hidden),
             "img_projection.2.weight": torch.randn(hidden, hidden) * 0.2, "img_projection.2.bias": torch.randn(hidden),
             "glb_GN": torch.randn(1, 1, width), "sub_GN": torch.randn(1, 1, 1, width)}
    tensors = {k: v.contiguous() for k, v in text.state_dict().items()}
    # transformers 5 saves a CLIPVisionModel without its `vision_model.` level; the published checkpoint has it
    tower = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    tensors |= {f"model.vision_embed_tokens.img_processor.vision_model.{k}": v.contiguous() for k, v in tower.items()}
    tensors |= {f"model.vision_embed_tokens.{k}": v for k, v in extra.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="Phi3VImageProcessor", num_crops=NUM_CROPS, image_mean=MEAN, image_std=STD)))
    write_tokenizer_files(path, tokenizer, CHATML)
    return text, clip, extra, order


def oracle_image_rows(clip, extra, order, inputs: ImageInputs) -> torch.Tensor:
    """transformers' CLIP, the merge and layout by loops, the projection written out: `[tokens, hidden]`."""
    rows = []
    for pixels, (h, w) in zip(inputs.tensors["pixel_values"], inputs.tensors["image_sizes"].tolist()):
        used = pixels[:1 + (h // CROP) * (w // CROP)]
        with torch.no_grad():
            feats = clip(used, output_hidden_states=True).hidden_states[-2][:, 1:]
        grid = CROP // PATCH
        merged = merge_2x2(feats.reshape(used.shape[0], grid, grid, -1))
        layout = explicit_layout(merged, h // CROP, w // CROP, extra["sub_GN"].reshape(-1),
                                 extra["glb_GN"].reshape(-1), order)
        hidden = F.gelu(layout @ extra["img_projection.0.weight"].T + extra["img_projection.0.bias"])
        rows.append(hidden @ extra["img_projection.2.weight"].T + extra["img_projection.2.bias"])
    return torch.cat(rows)


def oracle_logits(text, image_rows: torch.Tensor, ids: list[int], image_token_id: int) -> torch.Tensor:
    """transformers' Phi-3 fed the spliced embeddings by hand."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        embeds = text.model.embed_tokens(ids_t)
        embeds[ids_t == image_token_id] = image_rows
        return text(inputs_embeds=embeds).logits[0]


@pytest.fixture(scope="module", params=["sub_glb", "glb_sub"])
def tiny_phi3v(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3v")
    return (path, *write_tiny_phi3v(path, request.param))


def test_prompt_logits_equal_the_explicit_composition(tiny_phi3v):
    path, text, clip, extra, order = tiny_phi3v
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Phi3V, dtype=ModelDType.F32))
    assert isinstance(loaded.model, Phi3VForCausalLM)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in [(40, 30), (9, 14)]]
    inputs = loaded.vision_processor.preprocess(images)
    assert [tuple(s) for s in inputs.tensors["image_sizes"].tolist()] == [(56, 56), (56, 56)]
    token = loaded.model.image_token_id
    ids = [5, 6] + [token] * inputs.num_image_tokens[0] + [7] + [token] * inputs.num_image_tokens[1] + [8, 9]
    ours = vision_prompt_logits(loaded.model, ids, inputs)
    expected = oracle_logits(text, oracle_image_rows(clip, extra, order, inputs), ids, token)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()


def oracle_greedy(checkpoint, images: list[Image.Image], prompt: str) -> list[int]:
    """The oracle's greedy continuation (full forwards) of `prompt` with `images`, banning `LLAVA_BANNED`."""
    path, text, clip, extra, order = checkpoint
    processor = Phi3VProcessor.from_checkpoint(
        ProcessorFiles(preprocessor_config=json.loads((path / "preprocessor_config.json").read_text())),
        json.loads((path / "config.json").read_text()), None)
    inputs = processor.preprocess(images)
    tokenizer = char_tokenizer_with([IMAGE_TOKEN])
    ids = tokenizer.encode(processor.expand_prompt(prompt, inputs), add_special_tokens=False).ids
    token = tokenizer.token_to_id(IMAGE_TOKEN)
    rows = oracle_image_rows(clip, extra, order, inputs)
    generated = []
    for _ in range(NUM_GREEDY_TOKENS):
        logits = oracle_logits(text, rows, ids, token)[-1]
        logits[list(LLAVA_BANNED)] = float("-inf")
        generated.append(int(logits.argmax()))
        ids.append(generated[-1])
    return generated


def test_sixteen_greedy_tokens_through_a_runner(tiny_phi3v, tmp_path):
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
              for seed in (2, 3)]
    images[0].save(tmp_path / "image.png")
    runner = Runner(Which.VisionPlain(model_id=str(tiny_phi3v[0]), arch=VisionArchitecture.Phi3V,
                                      dtype=ModelDType.F32))
    content = [{"type": "text", "text": "<|image_1|>\nWhat is this?"}, image_part(str(tmp_path / "image.png"))]
    prompt = "<|im_start|>user\n<|image_1|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    expected = oracle_greedy(tiny_phi3v, images[:1], prompt)
    assert chat_tokens(runner, content) == expected
    placed = [image_part(str(tmp_path / "image.png")), {"type": "text", "text": "What is this?"}]
    assert chat_tokens(runner, placed) == expected  # one image placed by the front door: "<|image_1|>\n" first
    assert oracle_greedy(tiny_phi3v, images[1:], prompt) != expected  # the image decides the answer
    # two images, each placeholder typed by the user (the reference's way); the front door counts <|image_N|>
    images[1].resize((20, 50)).save(tmp_path / "tall.png")
    tall = Image.open(tmp_path / "tall.png").convert("RGB")
    content = [{"type": "text", "text": "<|image_1|> and <|image_2|>: same?"}, image_part(str(tmp_path / "image.png")),
               image_part(str(tmp_path / "tall.png"))]
    prompt = "<|im_start|>user\n<|image_1|> and <|image_2|>: same?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_tokens(runner, content) == oracle_greedy(tiny_phi3v, [images[0], tall], prompt)


def test_an_embedding_stored_under_vision_embed_tokens_wte_loads(tiny_phi3v, tmp_path):
    import shutil

    from safetensors.torch import load_file

    path = tiny_phi3v[0]
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    tensors = load_file(str(moved / "model.safetensors"))
    tensors["model.vision_embed_tokens.wte.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(moved / "model.safetensors"))
    models = [load_which(Which.VisionPlain(model_id=str(p), arch=VisionArchitecture.Phi3V, dtype=ModelDType.F32)).model
              for p in (path, moved)]
    assert torch.equal(models[1].language_model.model.embed_tokens.weight,
                       models[0].language_model.model.embed_tokens.weight)


# Phi-3-vision-128k-instruct's config.json (its LongRoPE factors shortened to ones: their values do not change names
# or shapes)
PUBLISHED_CONFIG = {
    "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "bos_token_id": 1, "eos_token_id": 2,
    "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                   "use_hd_transform": True, "with_learnable_separator": True},
    "hidden_act": "silu", "hidden_size": 3072,
    "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                      "name": "clip_vision_model", "num_img_tokens": 144},
    "intermediate_size": 8192, "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "su"},
    "rope_theta": 10000.0, "sliding_window": 131072, "tie_word_embeddings": False, "vocab_size": 32064,
}


def test_published_sizes_build_with_the_published_names():
    """The published config on the meta device: our model needs exactly the published checkpoint's names (the
    Phi-3 decoder's as transformers writes them, CLIP-L/336's under `model.vision_embed_tokens.img_processor.
    vision_model.`, the projector and the two separators)."""
    import transformers

    from mistralrs.vision.phi3v import CLIP_L_336

    text_cfg = {k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("img_processor", "embd_layer", "model_type")}
    text_cfg["rope_scaling"] = None  # transformers 5 reads LongRoPE differently; names and shapes are the same
    with torch.device("meta"):
        text = transformers.Phi3ForCausalLM(transformers.Phi3Config(**text_cfg))
        tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_L_336))
    published = set(text.state_dict()) | {
        "model.vision_embed_tokens.img_processor.vision_model." + n.removeprefix("vision_model.")
        for n in tower.state_dict() if not n.endswith("position_ids")}
    published |= {f"model.vision_embed_tokens.{n}" for n in (
        "img_projection.0.weight", "img_projection.0.bias", "img_projection.2.weight", "img_projection.2.bias",
        "glb_GN", "sub_GN")}
    ours = Phi3VForCausalLM(PUBLISHED_CONFIG, dtype=torch.bfloat16, device="meta")
    assert ours.expected_weight_names() == {Phi3VForCausalLM.canonical_weight_name(n) for n in published}
    assert ours.vision_embed_tokens.img_projection[0].weight.shape == (3072, 4096)
    assert ours.vision_embed_tokens.sub_GN.shape == (1, 1, 1, 4096) and ours.image_token_id == 32044
    processor = Phi3VProcessor.from_checkpoint(ProcessorFiles(preprocessor_config={"num_crops": 4}),
                                               PUBLISHED_CONFIG, None)
    inputs = processor.preprocess([Image.new("RGB", (640, 480), (10, 20, 30))])
    assert inputs.tensors["pixel_values"].shape == (1, 5, 3, 336, 336) and inputs.num_image_tokens == [757]


def test_in_situ_quant_applies_to_the_text_decoder_only(tiny_phi3v):
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod

    path = tiny_phi3v[0]
    which = Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Phi3V, dtype=ModelDType.F32)
    loaded = load_which(which, in_situ_quant="Q8_0")
    decoder_linears = [m for m in loaded.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder_linears and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder_linears)
    assert not any(isinstance(m, Linear) for m in loaded.model.vision_embed_tokens.modules())
    inputs = loaded.vision_processor.preprocess([Image.new("RGB", (40, 30), (200, 10, 10))])
    prompt = [5] + [loaded.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    assert torch.isfinite(vision_prompt_logits(loaded.model, prompt, inputs)).all()


def test_batched_image_and_text_requests_give_their_lone_results(tiny_phi3v, tmp_path):
    """Two image requests (different HD grids) and a text-only request, sent together, answer as each does alone."""
    files = []
    for i, (w, h) in enumerate([(40, 30), (20, 50)]):
        files.append(str(tmp_path / f"image{i}.png"))
        pixels = np.random.default_rng(10 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(files[-1])
    contents = [[image_part(f), {"type": "text", "text": "What is it?"}] for f in files] + ["Just text, please."]
    runner = Runner(Which.VisionPlain(model_id=str(tiny_phi3v[0]), arch=VisionArchitecture.Phi3V,
                                      dtype=ModelDType.F32))
    try:
        alone, together = alone_and_together(lambda content: chat_tokens(runner, content), contents)
    finally:
        runner.close()
    assert alone[0] != alone[1]
    assert together == alone


def test_write_uqff_then_from_uqff_gives_the_same_model(tiny_phi3v, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_phi3v[0], model_dir)
    quantized = load_which(Which.VisionPlain(model_id=str(model_dir), arch=VisionArchitecture.Phi3V,
                                             dtype=ModelDType.F32, write_uqff=str(tmp_path / "out" / "p-q8_0.uqff")),
                           in_situ_quant="Q8_0")
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path / "out"), arch=VisionArchitecture.Phi3V,
                                            dtype=ModelDType.F32, from_uqff="p-q8_0.uqff"))
    inputs = quantized.vision_processor.preprocess([Image.new("RGB", (20, 50), (0, 90, 200))])
    prompt = [5] + [quantized.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    expected = vision_prompt_logits(quantized.model, prompt, inputs)
    assert torch.equal(vision_prompt_logits(reloaded.model, prompt, inputs), expected)


def test_bfloat16_follows_float32(tiny_phi3v):
    """The tower, separators, projector and decoder run in bfloat16 close to float32."""
    from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches

    def logits(dtype: ModelDType) -> torch.Tensor:
        loaded = load_which(Which.VisionPlain(model_id=str(tiny_phi3v[0]), arch=VisionArchitecture.Phi3V, dtype=dtype))
        model = loaded.model
        inputs = loaded.vision_processor.preprocess([Image.new("RGB", (40, 30), (0, 90, 200))])
        ids = [5] + [model.image_token_id] * inputs.total_image_tokens + [6, 7]
        blocks = len(ids) // 16 + 1
        caches = allocate_kv_caches(model.kv_cache_spec(), blocks, 16, model.dtype, "cpu")
        fb = ForwardBatch.build([SeqChunk(ids, 0, list(range(blocks)))], 16, caches, "cpu")
        with torch.inference_mode(), fb.active():
            embeds = model.embed(fb.input_ids)
            embeds[fb.input_ids == model.image_token_id] = model.encode_images(inputs)
            return model.compute_logits(model(fb.input_ids, fb.positions, fb, inputs_embeds=embeds)).float()

    full, half = logits(ModelDType.F32), logits(ModelDType.BF16)
    torch.testing.assert_close(half, full, atol=0.5, rtol=0)  # logits reach about 30
    assert torch.equal(half[-1].argmax(), full[-1].argmax())
