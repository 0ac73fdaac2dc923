"""FLUX transformer: seconds per denoising step, ours against diffusers, and the weight memory of FluxOffloaded
against Flux.

A random-weight FLUX transformer of the real block sizes (inner width 3072 = 24 heads x 128, T5 width 4096, CLIP
width 768, guidance embedding as in dev) with only a few blocks is built with diffusers; ours takes diffusers'
weights by their checkpoint names. One denoising step is one transformer call on `--height` x `--width` pixels
(packed latent tokens) plus `--text-len` T5 tokens; each implementation runs `--repeats` timed steps after one
warm-up, alternating, and the median is printed.

Memory: on CUDA, the peak allocated memory of one step with the whole transformer on the GPU (Flux) and with the
blocks kept in CPU memory and moved per block (FluxOffloaded). On the CPU both modes compute in the same memory,
so the figure printed is the weight bytes each mode keeps on the compute device (computed from the modules:
everything for Flux; the resident layers plus the largest block for FluxOffloaded), labelled as such, plus what
Flux would keep for the full 19 + 38 blocks.
Example:
    python bench/bench_flux.py --double 1 --single 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mistralrs.diffusion.flux_transformer import FluxConfig, FluxTransformer
from mistralrs.diffusion.offload import OffloadPolicy
from mistralrs.diffusion.pipeline import image_ids
from mistralrs.layers.linear import load_checkpoint_weights

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
FULL_DOUBLE, FULL_SINGLE = 19, 38  # blocks of the real FLUX.1 transformer (for the full-size weight figure)


def build(args: argparse.Namespace, dtype: torch.dtype):
    """(diffusers model, ours with the same weights) on the CPU."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    theirs = (theirs if dtype == torch.float32 else theirs.to(dtype)).eval()
    config = FluxConfig.from_dict(dict(theirs.config))
    ours = FluxTransformer(config, dtype=dtype, device="cpu")
    consumed = load_checkpoint_weights(ours, theirs.state_dict().items(), (), lambda name: False)
    assert len(consumed) == len(theirs.state_dict()), "weights did not all load"
    return theirs, ours.eval()


def step_inputs(args: argparse.Namespace, config: FluxConfig, dtype: torch.dtype, device: torch.device) -> dict:
    h, w = args.height // 16, args.width // 16
    generator = torch.Generator().manual_seed(1)
    return dict(latents=torch.randn(1, h * w, config.in_channels, generator=generator, dtype=dtype).to(device),
                text=torch.randn(1, args.text_len, config.joint_attention_dim, generator=generator,
                                 dtype=dtype).to(device),
                pooled=torch.randn(1, config.pooled_projection_dim, generator=generator, dtype=dtype).to(device),
                timestep=torch.tensor([0.5], device=device), img_ids=image_ids(h, w, device, dtype),
                txt_ids=torch.zeros(args.text_len, 3, device=device, dtype=dtype),
                guidance=torch.tensor([4.0], device=device))


def run_ours(model: FluxTransformer, x: dict) -> torch.Tensor:
    return model(x["latents"], x["text"], x["pooled"], x["timestep"], x["img_ids"], x["txt_ids"], x["guidance"])


def run_theirs(model, x: dict) -> torch.Tensor:
    return model(hidden_states=x["latents"], encoder_hidden_states=x["text"], pooled_projections=x["pooled"],
                 timestep=x["timestep"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                 return_dict=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args: argparse.Namespace, ours, theirs, x: dict, device: torch.device) -> dict:
    """Median seconds per step of each, alternating ours / diffusers; and their largest output difference."""
    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        outputs = {"ours": run_ours(ours, x), "diffusers": run_theirs(theirs, x)}   # warm-up
        for _ in range(args.repeats):
            for name, fn, model in (("ours", run_ours, ours), ("diffusers", run_theirs, theirs)):
                _sync(device)
                start = time.perf_counter()
                fn(model, x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    diff = (outputs["ours"].float() - outputs["diffusers"].float()).abs().max().item()
    return {f"{name}_s_per_step": round(statistics.median(values), 3) for name, values in times.items()} | {
        "max_abs_diff": diff}


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def device_weight_bytes(model: FluxTransformer) -> dict:
    """Weight bytes on the compute device: all of them (Flux); resident layers + the largest block (Offloaded)."""
    blocks = [block for name in BLOCK_LISTS for block in getattr(model, name)]
    resident = _bytes(model) - sum(_bytes(block) for block in blocks)
    full = resident + FULL_DOUBLE * _bytes(model.transformer_blocks[0]) + FULL_SINGLE * _bytes(
        model.single_transformer_blocks[0])
    return {"flux_device_weight_mib": round(_bytes(model) / 2**20, 1),
            "offloaded_device_weight_mib": round((resident + max(map(_bytes, blocks))) / 2**20, 1),
            "full_19_38_flux_device_weight_mib": round(full / 2**20, 1)}


def cuda_peaks(ours: FluxTransformer, x_cpu: dict, device: torch.device) -> dict:
    """Peak allocated MiB of one step on `device`: Offloaded first (blocks stay in CPU memory), then Flux."""
    x = {k: v.to(device) for k, v in x_cpu.items()}
    peaks = {}
    for name in ("offloaded", "flux"):
        if name == "offloaded":
            for child_name, child in ours.named_children():
                if child_name not in BLOCK_LISTS:
                    child.to(device)
            ours.offload = OffloadPolicy(device)
        else:
            ours.offload = None
            ours.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            run_ours(ours, x)
        torch.cuda.synchronize(device)
        peaks[f"{name}_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=128, help="T5 tokens (the pipeline uses 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("f32", "bf16"), default=None, help="default: bf16 on CUDA, f32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "f32")]
    theirs, ours = build(args, dtype)
    x = step_inputs(args, ours.config, dtype, torch.device("cpu"))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
              "blocks": f"{args.double} double + {args.single} single",
              "tokens": f"{(args.height // 16) * (args.width // 16)} image + {args.text_len} text"}
    if device.type == "cuda":
        result |= cuda_peaks(ours, x, device)
        theirs.to(device)
        x = {k: v.to(device) for k, v in x.items()}
    else:
        result |= device_weight_bytes(ours)
    result |= time_steps(args, ours, theirs, x, device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
