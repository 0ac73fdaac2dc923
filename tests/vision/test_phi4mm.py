"""Phi4MM (vision): the dynamic-HD processor against hand-written formulations (transformers' processor needs
torchvision, which is not installed), and the whole model on a tiny checkpoint against transformers'
`Phi4MultimodalForCausalLM` fed our processor's tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ImageInputs
from mistralrs.vision.phi4mm import IMAGE_TOKEN, Phi4MMForCausalLM, Phi4MMProcessor, hd_geometry, hd_grid
from tests.loading import load_which
from tests.tiny_models import CHATML, EOS_TOKEN_ID
from tests.vision.tiny_vision import (
    LLAVA_BANNED, NUM_GREEDY_TOKENS, alone_and_together, chat_tokens, char_tokenizer_with, image_part,
    vision_prompt_logits, write_tokenizer_files,
)

CROP, PATCH, MAX_CROPS = 56, 14, 4  # the tiny tower: 4x4 patches per crop, 2x2 pooled tokens per crop
HALF = (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size,grid", [
    ((40, 30), (1, 1)), ((100, 30), (2, 1)), ((57, 112), (2, 2)),  # ceil(w / crop) x ceil(h / crop) when <= 4
    ((300, 100), (3, 1)),  # 6x2 > 4: the closest ratio among the grids of at most 4 crops is 3/1
    ((200, 200), (2, 2)),  # 4x4 > 4: ratio 1 ties (1,1) and (2,2); the area exceeds half of 2x2's, so (2,2)
    ((60, 60), (2, 2)),  # 2x2 = 4 crops fit
])
def test_hd_grid_by_hand(size, grid):
    assert hd_grid(*size, CROP, MAX_CROPS) == grid


def test_hd_geometry_by_hand():
    assert hd_geometry(40, 30, CROP, MAX_CROPS) == ((56, 42), (0, 14))  # 56/40 < 56/30: full width
    assert hd_geometry(120, 20, CROP, MAX_CROPS) == ((168, 28), (0, 28))
    assert hd_geometry(30, 100, CROP, MAX_CROPS) == ((33, 112), (23, 0))  # 112/100 < 56/30: full height
    with pytest.raises(ValueError, match="too elongated"):
        hd_geometry(1000, 5, CROP, MAX_CROPS)


def test_processor_crops_masks_and_token_counts_by_hand():
    processor = Phi4MMProcessor(CROP, PATCH, MAX_CROPS, HALF, HALF)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 120, 3), dtype=np.uint8), "RGB")  # grid 3x1, 168x28 + 28 pad
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")  # grid 1x1, 56x42 + 14 pad
    inputs = processor.preprocess([image, small])
    pixels, masks = inputs.tensors["image_pixel_values"], inputs.tensors["image_attention_mask"]
    assert pixels.shape == (2, 4, 3, CROP, CROP) and masks.shape == (2, 4, 4, 4)
    assert inputs.tensors["image_sizes"].tolist() == [[56, 168], [56, 56]]
    hd = np.full((56, 168, 3), 255, dtype=np.uint8)
    hd[:28] = np.asarray(image.resize((168, 28), Image.BILINEAR))
    hd = (hd.astype(np.float32) / 255.0 - 0.5) / 0.5
    for col in range(3):
        expected = hd[:, col * CROP:(col + 1) * CROP].transpose(2, 0, 1)
        assert np.allclose(pixels[0, 1 + col].numpy(), expected, atol=1e-6)
    glb = F.interpolate(torch.from_numpy(hd.transpose(2, 0, 1).copy())[None], size=(CROP, CROP), mode="bicubic")
    assert torch.allclose(pixels[0, 0], glb[0], atol=1e-6)
    # 28 padding rows = 2 patch rows masked in each sub-image; the global crop and the zero padding crop are ones
    expected_mask = torch.ones(4, 4)
    expected_mask[2:] = 0
    assert all(torch.equal(masks[0, 1 + c], expected_mask) for c in range(3)) and masks[0, 0].all()
    assert (pixels[1, 2:] == 0).all() and masks[1, 2:].all() and masks[1, 1, 3].sum() == 0  # 14 px: one patch row
    # tokens: global 2x2 + a sub_GN per row, glb_GN, useful pooled sub grid (rows 0 and 2 of the mask) + sub_GN/row
    assert inputs.num_image_tokens == [2 * 3 + 1 + 1 * (6 + 1), 2 * 3 + 1 + 2 * (2 + 1)]


def test_published_sizes_give_the_published_token_count():
    """transformers' formula for the published 448/14 tower: 256 + 1 + useful + rows + 16."""
    processor = Phi4MMProcessor(448, 14, 36, HALF, HALF)
    inputs = processor.preprocess([Image.new("RGB", (640, 480), (10, 20, 30))])
    # grid 2x2 (896x896), resized to 896x672: 224 padding rows = 16 patch rows; pooled 32x32 with 24 useful rows
    assert inputs.num_image_tokens == [256 + 1 + 24 * 32 + 24 + 16]


def test_placeholders_expand_in_order():
    processor = Phi4MMProcessor(CROP, PATCH, MAX_CROPS, HALF, HALF)
    inputs = ImageInputs({}, [3, 5], "d")
    assert processor.count_placeholders("a<|image_1|>b<|image_2|>") == 2
    assert processor.expand_prompt("a<|image_1|>b<|image_2|>c", inputs) == \
        "a" + IMAGE_TOKEN * 3 + "b" + IMAGE_TOKEN * 5 + "c"
    with pytest.raises(ValueError, match="in order, one per image"):
        processor.expand_prompt("a<|image_2|>b<|image_1|>", inputs)


def write_tiny_phi4mm(path, crop: int, seed: int = 0):
    """A random tiny transformers `Phi4MultimodalForCausalLM` with `crop`-pixel crops (an odd patch grid is
    reflection-padded before the pooling) saved in its own layout; returns the model."""
    from transformers.models.phi4_multimodal import configuration_phi4_multimodal as cfg
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as modeling

    tokenizer = char_tokenizer_with([IMAGE_TOKEN])
    vision = cfg.Phi4MultimodalVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=crop, patch_size=PATCH, crop_size=crop,
                                            image_token_id=tokenizer.token_to_id(IMAGE_TOKEN))
    audio = cfg.Phi4MultimodalAudioConfig(hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2)
    config = cfg.Phi4MultimodalConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        original_max_position_embeddings=512, pad_token_id=0, bos_token_id=0, eos_token_id=EOS_TOKEN_ID,
        vision_config=vision.to_dict(), audio_config=audio.to_dict(), initializer_range=0.2)
    torch.manual_seed(seed)
    model = modeling.Phi4MultimodalForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "image_embed" in name and ("extensor" in name or "projection" in name):
                param.copy_(torch.randn_like(param) * 0.3)
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["Phi4MultimodalForCausalLM"]}))
    (path / "preprocessor_config.json").write_text(json.dumps(dict(dynamic_hd=MAX_CROPS, image_mean=HALF,
                                                                   image_std=HALF)))
    write_tokenizer_files(path, tokenizer, CHATML)
    return model


@pytest.fixture(scope="module", params=[CROP, 42])
def tiny_phi4mm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("phi4mm")
    return path, write_tiny_phi4mm(path, request.param), request.param


def hf_logits(hf, ids: list[int], inputs: ImageInputs) -> torch.Tensor:
    """transformers' logits for `ids` with our processor's tensors."""
    t = inputs.tensors
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), image_pixel_values=t["image_pixel_values"],
                  image_sizes=t["image_sizes"], image_attention_mask=t["image_attention_mask"]).logits[0]


IMAGES = [((120, 20), 1), ((40, 30), 2), ((20, 120), 3)]  # padding rows cut, none, padding columns cut


def make_image(size, seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("which", [[0], [1, 2]])
def test_prompt_logits_equal_transformers(tiny_phi4mm, which):
    path, hf, _ = tiny_phi4mm
    loaded = load_which(Which.VisionPlain(model_id=str(path), arch=VisionArchitecture.Phi4MM, dtype=ModelDType.F32))
    assert isinstance(loaded.model, Phi4MMForCausalLM)
    inputs = loaded.vision_processor.preprocess([make_image(*IMAGES[i]) for i in which])
    token = loaded.model.image_token_id
    ids = [5, 6]
    for n in inputs.num_image_tokens:
        ids += [token] * n + [7]
    ids += [8, 9]
    ours = vision_prompt_logits(loaded.model, ids, inputs)
    expected = hf_logits(hf, ids, inputs)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()


def hf_greedy(checkpoint, images: list[Image.Image], prompt: str) -> list[int]:
    """transformers' greedy continuation (full forwards), banning `LLAVA_BANNED`."""
    path, hf, crop = checkpoint
    processor = Phi4MMProcessor(crop, PATCH, MAX_CROPS, HALF, HALF)
    inputs = processor.preprocess(images)
    tokenizer = char_tokenizer_with([IMAGE_TOKEN])
    ids = tokenizer.encode(processor.expand_prompt(prompt, inputs), add_special_tokens=False).ids
    generated = []
    for _ in range(NUM_GREEDY_TOKENS):
        logits = hf_logits(hf, ids, inputs)[-1]
        logits[list(LLAVA_BANNED)] = float("-inf")
        generated.append(int(logits.argmax()))
        ids.append(generated[-1])
    return generated


def test_sixteen_greedy_tokens_through_a_runner(tiny_phi4mm, tmp_path):
    images = [make_image(*IMAGES[0]), make_image(*IMAGES[2])]
    for i, image in enumerate(images):
        image.save(tmp_path / f"image{i}.png")
    runner = Runner(Which.VisionPlain(model_id=str(tiny_phi4mm[0]), arch=VisionArchitecture.Phi4MM,
                                      dtype=ModelDType.F32))
    try:
        content = [{"type": "text", "text": "<|image_1|>\nWhat is this?"}, image_part(str(tmp_path / "image0.png"))]
        prompt = "<|im_start|>user\n<|image_1|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
        expected = hf_greedy(tiny_phi4mm, images[:1], prompt)
        assert chat_tokens(runner, content) == expected
        assert hf_greedy(tiny_phi4mm, images[1:], prompt) != expected  # the image decides the answer
        content = [{"type": "text", "text": "<|image_1|> and <|image_2|>: same?"},
                   image_part(str(tmp_path / "image0.png")), image_part(str(tmp_path / "image1.png"))]
        prompt = "<|im_start|>user\n<|image_1|> and <|image_2|>: same?<|im_end|>\n<|im_start|>assistant\n"
        assert chat_tokens(runner, content) == hf_greedy(tiny_phi4mm, images, prompt)
    finally:
        runner.close()


def test_published_layout_with_vision_lora_loads_merged(tiny_phi4mm, tmp_path):
    """The published names (`glb_GN`, `sub_GN`, `img_projection.0/.2`, LoRA `base_layer` + `lora_A/B.vision`
    adapters, speech adapters) load; the vision adapter is merged as W + B @ A * alpha / r."""
    import shutil

    from safetensors.torch import load_file

    path = tiny_phi4mm[0]
    published = tmp_path / "published"
    shutil.copytree(path, published)
    tensors = load_file(str(published / "model.safetensors"))
    image = "model.embed_tokens_extend.image_embed."
    for old, new in [("global_img_feature_extensor", "glb_GN"), ("sub_img_feature_extensor", "sub_GN"),
                     ("img_projection_up.weight", "img_projection.0.weight"),
                     ("img_projection_up.bias", "img_projection.0.bias"),
                     ("img_projection_down.weight", "img_projection.2.weight"),
                     ("img_projection_down.bias", "img_projection.2.bias")]:
        tensors[image + new] = tensors.pop(image + old)
    base = "model.layers.0.self_attn.qkv_proj"
    weight = tensors.pop(base + ".weight")
    lora_a, lora_b = torch.randn(4, weight.shape[1]), torch.randn(weight.shape[0], 4)
    tensors |= {base + ".base_layer.weight": weight, base + ".lora_A.vision.weight": lora_a,
                base + ".lora_B.vision.weight": lora_b, base + ".lora_A.speech.weight": torch.randn(4, weight.shape[1]),
                base + ".lora_B.speech.weight": torch.randn(weight.shape[0], 4)}
    save_file(tensors, str(published / "model.safetensors"))
    config = json.loads((published / "config.json").read_text())
    (published / "config.json").write_text(json.dumps({**config, "vision_lora": {"lora_alpha": 8, "r": 4}}))
    models = [load_which(Which.VisionPlain(model_id=str(p), arch=VisionArchitecture.Phi4MM,
                                           dtype=ModelDType.F32)).model for p in (path, published)]
    qkv = [m.language_model.model.layers[0].self_attn.qkv_proj.weight for m in models]
    assert torch.allclose(qkv[1], qkv[0] + 2.0 * lora_b @ lora_a, atol=1e-5)
    assert torch.equal(models[1].image_embed.glb_GN, models[0].image_embed.glb_GN)
    assert torch.equal(models[1].image_embed.img_projection[2].weight, models[0].image_embed.img_projection[2].weight)


# Phi-4-multimodal-instruct's config.json, its vision-relevant part (LongRoPE factors shortened to ones: their values
# change no name or shape)
PUBLISHED_CONFIG = {
    "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm", "bos_token_id": 199999,
    "eos_token_id": 199999, "pad_token_id": 199999, "hidden_act": "silu", "hidden_size": 3072,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "num_attention_heads": 24, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
    "vocab_size": 200064, "img_processor": None,
    "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "longrope"},
    "embd_layer": {"embedding_cls": "image_audio", "image_embd_layer": {
        "crop_size": 448, "embedding_cls": "tune_image", "hd_transform_order": "sub_glb",
        "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp", "use_hd_transform": True,
        "with_learnable_separator": True}},
    "vision_lora": {"dp": 0.0, "lora_alpha": 512, "r": 256},
}


def test_published_config_builds_the_published_sizes():
    from mistralrs.vision.base import ProcessorFiles

    model = Phi4MMForCausalLM(PUBLISHED_CONFIG, dtype=torch.bfloat16, device="meta")
    assert model.image_embed.img_projection[0].weight.shape == (3072, 1152) and model.image_token_id == 200010
    assert model.image_embed.sub_GN.shape == (1, 1, 1, 1152) and model.image_embed.layers_used == 26
    assert model.lora_scale == 2.0
    assert "image_embed.img_processor.encoder.layers.26.mlp.fc2.weight" in model.expected_weight_names()
    processor = Phi4MMProcessor.from_checkpoint(ProcessorFiles(preprocessor_config={"dynamic_hd": 36}),
                                                PUBLISHED_CONFIG, None)
    tokens = processor.preprocess([Image.new("RGB", (448, 448))]).num_image_tokens
    assert processor.crop == 448 and tokens == [256 + 16 + 1 + 256 + 16]  # global + rows, glb_GN, one crop + rows
    bad = {**PUBLISHED_CONFIG, "embd_layer": {"image_embd_layer": {"hd_transform_order": "glb_sub"}}}
    with pytest.raises(ValueError, match="hd_transform_order='glb_sub'"):
        Phi4MMForCausalLM(bad, dtype=torch.bfloat16, device="meta")


def test_batched_image_and_text_requests_give_their_lone_results(tiny_phi4mm, tmp_path):
    """Image requests (two with the same crop count, whose tensors stack, and one with more crops) and a text-only
    request, sent together, answer as each does alone."""
    files = []
    for i, (size, seed) in enumerate([((40, 30), 10), ((30, 40), 11), ((120, 20), 12)]):
        files.append(str(tmp_path / f"image{i}.png"))
        make_image(size, seed).save(files[-1])
    contents = [[image_part(f), {"type": "text", "text": "What is it?"}] for f in files] + ["Just text, please."]
    runner = Runner(Which.VisionPlain(model_id=str(tiny_phi4mm[0]), arch=VisionArchitecture.Phi4MM,
                                      dtype=ModelDType.F32))
    try:
        alone, together = alone_and_together(lambda content: chat_tokens(runner, content), contents)
    finally:
        runner.close()
    assert len(set(map(tuple, alone))) == len(alone)
    assert together == alone


def test_in_situ_quant_applies_to_the_text_decoder_only(tiny_phi4mm):
    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod

    which = Which.VisionPlain(model_id=str(tiny_phi4mm[0]), arch=VisionArchitecture.Phi4MM, dtype=ModelDType.F32)
    loaded = load_which(which, in_situ_quant="Q8_0")
    decoder_linears = [m for m in loaded.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder_linears and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder_linears)
    assert not any(isinstance(m, Linear) for m in loaded.model.image_embed.modules())
    inputs = loaded.vision_processor.preprocess([make_image((40, 30), 5)])
    prompt = [5] + [loaded.model.image_token_id] * inputs.total_image_tokens + [6, 7]
    assert torch.isfinite(vision_prompt_logits(loaded.model, prompt, inputs)).all()
