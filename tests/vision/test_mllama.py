"""Llama 3.2 Vision (Mllama) against transformers on a tiny random checkpoint: prompt logits with one and two
images over packed chunks (the cross-attention keys/values computed once per request and kept, the mask rows of
each chunk), 16 greedy tokens, and a text-only prompt (cross-attention layers skipped)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.vision.base import ProcessorFiles
from mistralrs.vision.mllama import MllamaForConditionalGeneration, MllamaProcessor
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.vision.siglip_helpers import load_ours, random_image, sharpen

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

VOCAB, IMAGE = 60, 60  # the image token is vocab_size (its embedding row is one of the 8 extra rows)
PREPROCESSOR = {"size": {"height": 14, "width": 14}, "max_image_tiles": 4, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3}
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
              image_size=14, patch_size=7, max_num_tiles=4, vision_output_dim=48, intermediate_layers_indices=[0, 2])
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
IMAGES = [random_image(45, 20, seed=1), random_image(11, 40, seed=2)]
BLOCK = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import MllamaConfig
    from transformers import MllamaForConditionalGeneration as HFModel

    torch.manual_seed(0)
    hf = HFModel(MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=IMAGE)).eval()
    sharpen(hf, seed=11)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("gate") or "gate_" in name and param.numel() == 1:
                param.fill_(0.6)
    path = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(path)
    return hf, load_ours(MllamaForConditionalGeneration, str(path))


def processor() -> MllamaProcessor:
    return MllamaProcessor.from_checkpoint(ProcessorFiles(preprocessor_config=PREPROCESSOR), {}, None)


def hf_logits(hf, ids: list[int], images) -> torch.Tensor:
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
    hf, ours = models
    torch.testing.assert_close(our_logits(ours, PROMPT_ONE, IMAGES[:1], chunk), hf_logits(hf, PROMPT_ONE, IMAGES[:1]),
                               rtol=1e-4, atol=1e-4)


def test_prompt_logits_two_images_and_text_only(models):
    hf, ours = models
    images = IMAGES + [random_image(30, 30, seed=3)]
    torch.testing.assert_close(our_logits(ours, PROMPT_TWO, images, 4), hf_logits(hf, PROMPT_TWO, images),
                               rtol=1e-4, atol=1e-4)
    text = [3, 4, 5, 6, 7]
    torch.testing.assert_close(our_logits(ours, text, [], 64), hf_logits(hf, text, []), rtol=1e-4, atol=1e-4)
