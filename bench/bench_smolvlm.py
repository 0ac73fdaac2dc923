"""Time to first token of SmolVLM-256M (Idefics3) with one 512x512 image: ours against transformers, bf16, CPU.

Random weights with the published sizes of HuggingFaceTB/SmolVLM-256M-Instruct (SigLIP 768 wide, 12 layers,
patch 16, 512 px tiles; pixel shuffle by 4 to 64 tokens per tile; a SmolLM2-135M-sized Llama decoder) are written
to a work directory with a transformers processor (no download). Each round times, in this one process with the
same thread count, a chat request with the image through `Runner(Which.VisionPlain)` with `max_tokens=1` (image
decoding, preprocessing, vision tower, connector, prefill, one token) against transformers' processor call plus one
forward pass. `--max-edge` caps the image's longest edge (`Which.VisionPlain(max_edge=...)`, transformers'
`size.longest_edge`); the checkpoint's own 2048 cuts a 512 px image into 16 tiles plus the global image.
Prints one JSON line with the medians. Example:
    python bench/bench_smolvlm.py --threads 2 --rounds 3 --max-edge 512
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512,
              patch_size=16)
TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True)
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def write_checkpoint(path: str, max_edge: int | None):
    """A random SmolVLM-256M-sized checkpoint and processor in `path`; returns (model bf16, processor)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from tests.vision.siglip_helpers import save_checkpoint, tiny_hf_tokenizer

    tokenizer = tiny_hf_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                                  + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    config = Idefics3Config(vision_config=VISION, text_config=TEXT, scale_factor=4,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": max_edge or 2048},
                                                max_image_size={"longest_edge": 512}, resample=1)
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=64)
    save_checkpoint(path, model, processor, TEMPLATE)
    return model.to(torch.bfloat16), processor


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-edge", type=int, default=512)
    parser.add_argument("--work-dir", default="/tmp/smolvlm_bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which

    hf_model, processor = write_checkpoint(args.work_dir, args.max_edge)
    runner = Runner(Which.VisionPlain(model_id=args.work_dir, arch=VisionArchitecture.Idefics3,
                                      dtype=ModelDType.BF16, max_edge=args.max_edge))
    prompt = "User:<image>Describe.<end_of_utterance>\nAssistant:"

    def data_url(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def ours(url: str) -> None:
        runner.send_chat_completion_request(ChatCompletionRequest(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe."}]}],
            model="smolvlm", max_tokens=1, temperature=0.0))

    def transformers_ttft(image: Image.Image) -> None:
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        with torch.inference_mode():
            hf_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].to(torch.bfloat16),
                     pixel_attention_mask=inputs["pixel_attention_mask"]).logits[0, -1].argmax()

    def image_of(seed: int) -> Image.Image:  # a new image each round: our prefix cache never hits
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB")

    ours(data_url(image_of(1000)))  # warm-up
    transformers_ttft(image_of(1001))
    times = {"ours": [], "transformers": []}
    for i in range(args.rounds):
        image, url = image_of(i), data_url(image_of(i))  # our request carries the PNG (decoded in the timing)
        times["transformers"].append(timed(lambda: transformers_ttft(image)))
        times["ours"].append(timed(lambda: ours(url)))
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print(json.dumps({"threads": args.threads, "max_edge": args.max_edge, "rounds": args.rounds,
                      "ttft_s": medians, "ratio_ours_over_transformers":
                          round(medians["ours"] / medians["transformers"], 3)}))


if __name__ == "__main__":
    main()
