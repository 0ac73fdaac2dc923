"""MiniCPM-o 2.6 (vision only; remote code, so no transformers oracle): each part against an independent
straightforward formulation (slice grids and sizes worked out by hand, the 2D sin-cos table from its formula, the
resampler as per-head attention in a loop), and the whole model on a tiny random checkpoint written in the
published weight layout (`llm.*`, `vpm.*`, `resampler.*`): prompt logits equal an explicit per-tile composition of
the parts, and 16 greedy tokens through `Runner(Which.VisionPlain)` equal the model run directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

from mistralrs import ModelDType, Runner, VisionArchitecture, Which
from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.minicpmo import (MiniCPMO, MiniCpmOProcessor, Resampler, find_best_resize, refine_size,
                                       sincos_2d, sliced_grid)
from tests.tiny_models import CHARACTERS, CHATML
from tests.vision.siglip_helpers import VisionDriver, data_url, load_ours, random_image, runner_greedy
from tests.vision.tiny_vision import (alone_and_together, char_tokenizer_with, vision_prompt_logits,
                                      write_tokenizer_files)

SPECIALS = ["<image>", "</image>", "<slice>", "</slice>", "<unk>"]
PREPROCESSOR = {"scale_resolution": 28, "patch_size": 7, "max_slice_nums": 9, "image_feature_size": 4}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)
IMAGES = [random_image(70, 45, seed=1), random_image(20, 30, seed=2)]


@pytest.mark.parametrize("size, scale, max_slices, grid", [
    ((300, 300), 448, 9, None),  # less than one tile: not sliced
    ((1000, 500), 448, 9, (2, 1)),  # 2.49 tiles -> 2, 3 or 4 slices; 2 columns match the 2:1 ratio exactly
    ((2000, 300), 448, 9, (4, 1)),  # 2.99 tiles; 4x1 is the widest candidate (log 4 closest to log 6.67)
    ((500, 1000), 448, 9, (1, 2)),
    ((3000, 3000), 448, 9, (3, 3)),  # 44.8 tiles, capped at 9 slices: 8 or 9; 3x3 is square
    ((3000, 3000), 448, 4, (2, 2)),  # capped at 4: 3 or 4 slices
    ((70, 45), 28, 9, (3, 2)),  # 4.02 tiles -> 4, 5 or 6 slices; 3:2 (log 0.405) is closest to log(70/45) 0.442
])
def test_sliced_grid_by_hand(size, scale, max_slices, grid):
    assert sliced_grid(*size, max_slices, scale) == grid


def test_resize_sizes_by_hand():
    # 1000x500 at 448: area > 448², r = 2, h = int(448 / sqrt 2) = 316, w = 632; rounded to 14: 630 x 322
    assert find_best_resize(1000, 500, 448, 14, allow_upscale=False) == (630, 322)
    # a 2x1 grid: each half 500x500, upscaled to one 448 tile -> 896 x 448
    assert refine_size(1000, 500, (2, 1), 448, 14) == (896, 448)
    # 20x30 at 28 (smaller than a tile, upscaled): h = int(28 / sqrt(2/3)) = 34, w = int(34 * 2/3) = 22 -> 21 x 35
    assert find_best_resize(20, 30, 28, 7, allow_upscale=True) == (21, 35)


def _processor() -> MiniCpmOProcessor:
    return MiniCpmOProcessor.from_checkpoint(ProcessorFiles(preprocessor_config=PREPROCESSOR), {}, None)


def test_processor_tiles_and_prompt():
    processor = _processor()
    inputs = processor.preprocess(IMAGES)
    # image 0: a 3x2 grid -> overview + 6 slices; image 1: one tile
    assert inputs.num_image_tokens == [4 * 7, 4]
    assert inputs.tensors["grids"].tolist() == [[3, 2], [0, 0]]
    # overview of 70x45: area > 28², r = 70/45, h = int(28 / sqrt r) = 22, w = int(22 r) = 34 -> 35 x 21
    # refined: the 3x2 cells (69/3 x 44/2 = 23 x 22 after ensure_divide) upscaled to one 28 tile -> 28 x 28 each
    sizes = inputs.tensors["tgt_sizes"].tolist()
    assert sizes == [[3, 5]] + [[4, 4]] * 6 + [[5, 3]]
    # pixels: bicubic resize, then (x / 255 - 0.5) / 0.5, zero padding below and right
    overview = np.asarray(IMAGES[0].resize((35, 21), Image.Resampling.BICUBIC), dtype=np.float64)
    expected = torch.tensor((overview / 255 - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1)
    torch.testing.assert_close(inputs.tensors["pixel_values"][0, :, :21, :35], expected, atol=1e-6, rtol=0)
    assert inputs.tensors["pixel_values"][0, :, 21:].abs().sum() == 0
    refined = IMAGES[0].resize((84, 56), Image.Resampling.BICUBIC)
    last = np.asarray(refined.crop((56, 28, 84, 56)), dtype=np.float64)
    torch.testing.assert_close(inputs.tensors["pixel_values"][6, :, :28, :28],
                               torch.tensor((last / 255 - 0.5) / 0.5, dtype=torch.float32).permute(2, 0, 1),
                               atol=1e-6, rtol=0)
    run = "<unk>" * 4
    tile = f"<slice>{run}</slice>"
    expanded = processor.expand_prompt("A(<image>./</image>)B(<image>./</image>)C", inputs)
    assert expanded == (f"A<image>{run}</image>{tile * 3}\n{tile * 3}B<image>{run}</image>C")
    with pytest.raises(ValueError, match="placeholder"):
        processor.expand_prompt("only (<image>./</image>)", inputs)


def test_sincos_table_against_formula():
    dim, height, width = 16, 3, 5
    table = sincos_2d(dim, height, width)
    quarter = dim // 4
    for r in range(height):
        for c in range(width):
            expected = []
            for pos in (c, r):  # the first half follows the column, the second the row
                freqs = [10000 ** (-k / quarter) for k in range(quarter)]
                expected += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
            torch.testing.assert_close(table[r, c], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights large enough that masking and ordering errors show; norm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = ("norm" in name or ".ln_" in name or name.startswith("ln_")) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm else (0.15 if param.dim() >= 2 else 0.1) * noise)


def test_resampler_against_per_head_loop():
    dim, heads, kv_dim, queries = 64, 4, 32, 5
    resampler = Resampler(queries, dim, heads, kv_dim, dtype=torch.float32, device="cpu")
    _randomize(resampler, seed=3)
    sizes = [(2, 3), (4, 2), (1, 1)]
    x = torch.randn(3, 8, kv_dim, generator=torch.Generator().manual_seed(4))
    out = resampler(x, sizes)
    head_dim = dim // heads
    w_q, w_k, w_v = resampler.attn.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = resampler.attn.in_proj_bias.detach().chunk(3)

    def ln(t, norm):
        return F.layer_norm(t, (dim,), norm.weight.detach(), norm.bias.detach(), 1e-6)

    for i, (h, w) in enumerate(sizes):
        kv = ln(x[i, :h * w] @ resampler.kv_proj.weight.detach().T, resampler.ln_kv)  # padding rows dropped
        pos = torch.tensor(np.array([[_pos_row(dim, r, c) for c in range(w)] for r in range(h)]),
                           dtype=torch.float32).reshape(h * w, dim)
        q = ln(resampler.query.detach(), resampler.ln_q) @ w_q.T + b_q
        k = (kv + pos) @ w_k.T + b_k
        v = kv @ w_v.T + b_v
        per_head = []
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
            per_head.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        attended = torch.cat(per_head, dim=-1) @ resampler.attn.out_proj.weight.detach().T
        attended = attended + resampler.attn.out_proj.bias.detach()
        expected = ln(attended, resampler.ln_post) @ resampler.proj.detach()
        torch.testing.assert_close(out[i].detach(), expected, atol=1e-5, rtol=0)


def _pos_row(dim: int, r: int, c: int) -> list[float]:
    quarter = dim // 4
    freqs = [10000 ** (-k / quarter) for k in range(quarter)]
    return ([math.sin(c * f) for f in freqs] + [math.cos(c * f) for f in freqs]
            + [math.sin(r * f) for f in freqs] + [math.cos(r * f) for f in freqs])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random MiniCPM-o checkpoint in the published layout, with its processor and tokenizer files."""
    tokenizer = char_tokenizer_with(SPECIALS)
    config = {"architectures": ["MiniCPMO"], "model_type": "minicpmo", "vocab_size": tokenizer.get_vocab_size(),
              "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024, "query_num": 4,
              "image_token_id": tokenizer.token_to_id("<unk>"), "vision_config": VISION}
    torch.manual_seed(0)
    model = MiniCPMO(config, dtype=torch.float32, device="cpu")
    _randomize(model, seed=1)
    # the published `llm` is transformers' Qwen2ForCausalLM (unfused projections); `vpm` and `resampler` as ours
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: config[k] for k in text_keys}))
    _randomize(llm, seed=2)
    published = {"llm." + n: p.detach() for n, p in llm.named_parameters()}
    published |= {n: p.detach() for n, p in model.named_parameters() if not n.startswith("language_model.")}
    published["apm.layers.0.weight"] = torch.zeros(2)  # an audio tensor: present in the file, unused
    path = tmp_path_factory.mktemp("minicpmo")
    save_file({n: t.contiguous() for n, t in published.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    write_tokenizer_files(path, tokenizer, CHATML)
    assert any(n.startswith("vpm.") for n in published) and any(n.startswith("resampler.") for n in published)
    return tokenizer, str(path)


def _explicit_logits(model: MiniCPMO, ids: list[int], inputs) -> torch.Tensor:
    """The parts composed by hand: every tile through the tower alone (unpadded, no mask), its patches through the
    resampler alone, the features written over the `<unk>` embeddings in order, then the decoder."""
    features = []
    for pixels, (h, w) in zip(inputs.tensors["pixel_values"], inputs.tensors["tgt_sizes"].tolist()):
        tile = pixels[:, :h * 7, :w * 7][None]
        features.append(model.resampler(model.vpm(tile), [(h, w)])[0])
    embeds = model.embed(torch.tensor(ids))
    embeds[torch.tensor(ids) == model.image_token_id] = torch.cat(features)
    return vision_prompt_logits(_DecoderOnly(model, embeds), ids, None)


class _DecoderOnly:
    """The model with `embed` returning fixed embeddings (to feed `vision_prompt_logits` the spliced ones)."""

    def __init__(self, model: MiniCPMO, embeds: torch.Tensor):
        self.model, self.embeds, self.image_token_id = model, embeds, model.image_token_id

    def embed(self, ids):
        return self.embeds

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _prompt(processor, tokenizer, inputs, text: str) -> list[int]:
    rendered = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(processor.expand_prompt(rendered, inputs), add_special_tokens=False).ids


def test_prompt_logits_equal_the_parts_composed(checkpoint):
    tokenizer, path = checkpoint
    model = load_ours(MiniCPMO, path)
    processor = _processor()
    inputs = processor.preprocess(IMAGES)
    ids = _prompt(processor, tokenizer, inputs, "(<image>./</image>)Look(<image>./</image>)now.")
    assert ids.count(model.image_token_id) == inputs.total_image_tokens == 32
    with torch.no_grad():
        expected = _explicit_logits(model, ids, inputs)
    torch.testing.assert_close(vision_prompt_logits(model, ids, inputs), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_through_a_runner(checkpoint):
    """One image with its placeholder typed, then a text-only request, through `Runner(Which.VisionPlain)`."""
    tokenizer, path = checkpoint
    banned = {i: -1e9 for i in range(len(CHARACTERS), tokenizer.get_vocab_size())}
    model = load_ours(MiniCPMO, path)
    processor = _processor()
    inputs = processor.preprocess(IMAGES[:1])
    driver = VisionDriver(model)
    driver.add(0, _prompt(processor, tokenizer, inputs, "(<image>./</image>)Describe."), inputs)
    logits_bias = torch.zeros(tokenizer.get_vocab_size())
    logits_bias[list(banned)] = float("-inf")
    expected = _greedy_banned(driver, logits_bias, 16)
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.MiniCpmO, dtype=ModelDType.F32))
    content = [data_url(IMAGES[0]), {"type": "text", "text": "(<image>./</image>)Describe."}]
    assert runner_greedy(runner, content, banned, 16) == expected
    # a text-only request to the same model
    text_driver = VisionDriver(model)
    text_driver.add(0, tokenizer.encode("<|im_start|>user\nHello.<|im_end|>\n<|im_start|>assistant\n",
                                        add_special_tokens=False).ids, None)
    expected_text = _greedy_banned(text_driver, logits_bias, 16)
    assert runner_greedy(runner, [{"type": "text", "text": "Hello."}], banned, 16) == expected_text



def test_batched_image_and_text_requests_give_their_lone_results(checkpoint):
    """Two image requests (a sliced and an unsliced image) and a text-only request, sent together from three
    threads, answer as each does alone."""
    tokenizer, path = checkpoint
    banned = {i: -1e9 for i in range(len(CHARACTERS), tokenizer.get_vocab_size())}
    contents = [[data_url(image), {"type": "text", "text": "(<image>./</image>)Describe."}] for image in IMAGES]
    contents.append([{"type": "text", "text": "Hello."}])
    runner = Runner(Which.VisionPlain(model_id=path, arch=VisionArchitecture.MiniCpmO, dtype=ModelDType.F32))
    try:
        alone, together = alone_and_together(lambda content: runner_greedy(runner, content, banned, 8), contents)
    finally:
        runner.close()
    assert alone[0] != alone[1]
    assert together == alone


def test_write_uqff_then_from_uqff_gives_the_same_model(checkpoint, tmp_path):
    """ISQ quantizes the text decoder only; the UQFF it writes loads back to identical logits."""
    import shutil

    from mistralrs.layers.linear import Linear
    from mistralrs.quant.isq import IsqLinearMethod
    from tests.loading import load_which

    tokenizer, path = checkpoint
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    quantized = load_which(Which.VisionPlain(model_id=str(model_dir), arch=VisionArchitecture.MiniCpmO,
                                             dtype=ModelDType.F32, write_uqff=str(tmp_path / "out" / "m-q8_0.uqff")),
                           in_situ_quant="Q8_0", show_progress=False)
    decoder = [m for m in quantized.model.language_model.modules() if isinstance(m, Linear)]
    assert decoder and all(isinstance(m.quant_method, IsqLinearMethod) for m in decoder)
    assert not any(isinstance(m, Linear) for m in quantized.model.vpm.modules())
    reloaded = load_which(Which.VisionPlain(model_id=str(tmp_path / "out"), arch=VisionArchitecture.MiniCpmO,
                                            dtype=ModelDType.F32, from_uqff="m-q8_0.uqff"), show_progress=False)
    inputs = quantized.vision_processor.preprocess(IMAGES[:1])
    ids = _prompt(quantized.vision_processor, tokenizer, inputs, "(<image>./</image>)Look.")
    expected = vision_prompt_logits(quantized.model, ids, inputs)
    assert torch.equal(vision_prompt_logits(reloaded.model, ids, inputs), expected)

def _greedy_banned(driver: VisionDriver, bias: torch.Tensor, num_tokens: int) -> list[int]:
    out = []
    logits = driver.step([(0, len(driver.prompts[0]))])[0]
    for _ in range(num_tokens):
        token = int((logits[-1] + bias).argmax())
        out.append(token)
        driver.extend(0, token)
        logits = driver.step([(0, 1)])[0]
    return out
