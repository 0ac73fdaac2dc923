"""Time to encode one 512x512 image with the Qwen2-VL-2B vision tower (random weights, published sizes), ours
against transformers in the same process, on the CPU, in bf16 and f32.

Both sides share the very same weight tensors (ours is loaded from transformers' state dict with `assign=True`),
and runs alternate between the two so that a busy machine slows both alike. Each configuration prints one JSON
line: the preprocessing time (Pillow resize, normalization, patchify) and the tower time (patch embedding, 32
blocks, patch merger), min and median over `--repeats`, the speedup of ours, and the largest difference between
the two sides' image features. `--family qwen2_5_vl` times the Qwen2.5-VL-3B tower (window attention) instead.
Example:
    python bench/bench_vision.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from mistralrs.vision.qwen2_5_vl import Qwen2_5VisionTransformer
from mistralrs.vision.qwen2_vl import Qwen2VLImageProcessor, QwenImageParams, QwenVisionConfig, \
    QwenVisionTransformer

# vision_config of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct
VISION_CONFIGS = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
                       hidden_act="silu", in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def build_pair(family: str, dtype: torch.dtype, depth: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers' tower, ours) with random weights shared between the two."""
    vision_config = dict(VISION_CONFIGS[family], depth=depth)
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(vision_config=vision_config).vision_config
        hf_cls, ours_cls = Qwen2VisionTransformerPretrainedModel, QwenVisionTransformer
    else:
        config = transformers.Qwen2_5_VLConfig(vision_config=vision_config).vision_config
        hf_cls, ours_cls = Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5VisionTransformer
    torch.manual_seed(0)
    hf = hf_cls._from_config(config, dtype=dtype).eval()
    ours = ours_cls(QwenVisionConfig.from_hf(config.to_dict(), family == "qwen2_5_vl"), dtype=dtype, device="cpu")
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)  # the same tensors: one copy of the weights
    return hf, ours.eval()


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(family: str, dtype_name: str, repeats: int, depth: int, image: Image.Image) -> dict:
    dtype = DTYPES[dtype_name]
    hf, ours = build_pair(family, dtype, depth)
    hf_processor = transformers.Qwen2VLImageProcessorPil()
    our_processor = Qwen2VLImageProcessor(QwenImageParams())
    times: dict[str, list[float]] = {k: [] for k in ("hf_pre", "hf_tower", "ours_pre", "ours_tower")}
    with torch.inference_mode():
        for _ in range(repeats):
            t, batch = timed(lambda: hf_processor(images=[image], return_tensors="pt"))
            times["hf_pre"].append(t)
            t, hf_out = timed(lambda: hf(batch["pixel_values"].to(dtype),
                                         grid_thw=batch["image_grid_thw"]).pooler_output)
            times["hf_tower"].append(t)
            t, inputs = timed(lambda: our_processor.preprocess([image]))
            times["ours_pre"].append(t)
            grid = inputs.tensors["image_grid_thw"].tolist()
            t, our_out = timed(lambda: ours(inputs.tensors["pixel_values"], grid))
            times["ours_tower"].append(t)
    result = {"family": family, "depth": depth, "dtype": dtype_name, "threads": torch.get_num_threads(),
              "repeats": repeats, "grid_thw": grid[0], "image_tokens": int(our_out.shape[0])}
    for key, values in times.items():
        result[f"{key}_min_s"] = round(min(values), 4)
        result[f"{key}_median_s"] = round(statistics.median(values), 4)
    total = {side: min(a + b for a, b in zip(times[f"{side}_pre"], times[f"{side}_tower"])) for side in ("hf", "ours")}
    result["speedup_total_min"] = round(total["hf"] / total["ours"], 3)
    result["max_abs_diff"] = float((our_out.float() - hf_out.float()).abs().max())
    result["max_abs_ref"] = float(hf_out.float().abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(VISION_CONFIGS), default="qwen2_vl")
    parser.add_argument("--dtypes", default="bf16,f32", help="comma-separated subset of bf16,f32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--depth", type=int, default=32, help="blocks (32 published; fewer for a quick look)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB")
    for dtype_name in args.dtypes.split(","):
        print(json.dumps(run(args.family, dtype_name, args.repeats, args.depth, image)), flush=True)


if __name__ == "__main__":
    main()
