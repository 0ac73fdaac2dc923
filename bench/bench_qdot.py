"""Per-matmul times of the int8-activation dot-product kernels (mistralrs/quant/qdot.py) against torch's CPU int4
form (mistralrs/quant/cpu_int4.py) and a dense bfloat16 `F.linear`, on SmolLM2-135M's and Gemma 3 270M's shapes.
`QdotWeight` is timed both ways it can multiply: its integer kernels ("kernels") and its dequantized row tiles
times `F.linear` ("tiles"); it runs the kernels below `QDOT_DENSE_ROWS` (48) activation rows, the tiles from there
on.

    .venv/bin/python bench/bench_qdot.py [--threads 2] [--rows 1,8,512] [--repeats 30] [--fastest]
        [--baseline ~/.cache/mistralrs/extensions/mistralrs_fused_decode_<key>.so]

Weights are random, quantized with the `gguf` package (K-quants: mistralrs/quant/quantize.py) to the type the
real file uses for that matrix. For every
(shape, M) the three forms are timed in turn, round after round (so that the machine's load hits them alike), and
the median per call is printed in microseconds as a Markdown table (`--fastest`: the fastest call of all rounds,
the steadier figure on a machine that other jobs load). `--baseline` loads another build of the extension (an
earlier tree's, from the build cache) into the same process, packs the weight with it (its own layout) and times
its kernels and tiles too, in turn with the others: a before/after of both paths under the same load.

    .venv/bin/python bench/bench_qdot.py --isas 2,3 [--rows 1,2,4,8] [--fastest]

instead times the integer kernels (`dense=0`) on the listed instruction-set paths (`extension.qdot_isas()`: 2 is
AVX512-VNNI on 256-bit vectors, 3 on 512-bit vectors for the legacy types, 4 AMX-INT8 tiles for large Q8_0 weights
at 4-16 rows), in turn round after round as above, with each path's time over the first's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from mistralrs.layers.fused_decode import EXTENSION
from mistralrs.quant.cpu_int4 import int4_cpu_from_ggml
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.qdot import QdotWeight, qdot_available
from mistralrs.quant.quantize import quantize_ggml

# (model, matrix, GGML type, out_features, in_features)
SHAPES = [
    ("SmolLM2", "qkv", "Q4_1", 960, 576),
    ("SmolLM2", "o", "Q4_1", 576, 576),
    ("SmolLM2", "gate_up", "Q4_1", 3072, 576),
    ("SmolLM2", "down", "Q4_1", 576, 1536),
    ("SmolLM2", "head", "Q8_0", 49152, 576),
    ("Gemma 3", "q+k", "Q5_0", 1280, 640),
    ("Gemma 3", "gate_up", "Q5_0", 4096, 640),
    ("Gemma 3", "v", "Q8_0", 256, 640),
    ("Gemma 3", "o", "Q4_K", 640, 1024),
    ("Gemma 3", "down", "Q4_K", 640, 2048),
    ("Gemma 3", "down", "Q6_K", 640, 2048),
    ("Gemma 3", "head", "Q8_0", 262144, 640),
]


def ggml_tensor(ggml_type: str, rows: int, cols: int) -> GGMLTensor:
    weights = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 0.05
    if ggml_type.endswith("_K"):  # gguf has no K-quant quantizer; mistralrs's follows llama.cpp's
        return quantize_ggml(torch.from_numpy(weights), ggml_type)
    blocks = gguf.quantize(weights, getattr(gguf.GGMLQuantizationType, ggml_type))
    data = torch.from_numpy(np.ascontiguousarray(blocks)).view(torch.uint8).reshape(rows, -1)
    return GGMLTensor(data, ggml_type, (rows, cols))


def call_us(fn, x: torch.Tensor, repeats: int, fastest: bool) -> float:
    """The median (or the fastest) of `repeats` calls, in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return (min(times) if fastest else statistics.median(times)) * 1e6


def load_build(path: str):
    """A build of the extension (a .so of the build cache) as a module of its own."""
    name = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,512", help="activation rows M, comma-separated")
    parser.add_argument("--repeats", type=int, default=30, help="calls per form and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="a substring of 'model matrix' to select shapes")
    parser.add_argument("--fastest", action="store_true", help="the fastest call instead of the median")
    parser.add_argument("--baseline", default="", help="another build of the extension (.so) to time as well")
    parser.add_argument("--isas", default="", help="instruction-set paths whose kernels to time, comma-separated")
    args = parser.parse_args()
    if args.isas:
        return compare_isas(args, [int(isa) for isa in args.isas.split(",")])
    baseline = load_build(os.path.expanduser(args.baseline)) if args.baseline else None
    torch.set_num_threads(args.threads)
    if not qdot_available():
        EXTENSION.get(wait=True)
    statistic = "fastest" if args.fastest else "median"
    print(f"threads={args.threads}; {statistic} us per call over {args.rounds} rounds x {args.repeats} calls\n")
    extra = " baseline kernels | kernels / baseline | baseline tiles | tiles / baseline |" if baseline else ""
    print(f"| model | matrix | type | N x K | M | kernels | tiles | int4 | dense bf16 | int4 / best qdot |{extra}")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|---|" * bool(baseline))
    for model, matrix, ggml_type, rows, cols in SHAPES:
        if args.only and args.only not in f"{model} {matrix}":
            continue
        tensor = ggml_tensor(ggml_type, rows, cols)
        qdot = QdotWeight(tensor)
        extension = EXTENSION.get()
        forms = {name: (lambda x, dense=dense: extension.qdot_matmul(x, qdot.packed, qdot.type_number, rows,
                                                                      dense=dense))
                 for name, dense in (("kernels", 0), ("tiles", 1))}
        forms["int4"] = int4_cpu_from_ggml(tensor, torch.bfloat16).matmul
        dense = tensor.dequantize(torch.bfloat16)
        forms["dense"] = lambda x, dense=dense: F.linear(x, dense)
        if baseline:
            base_packed = baseline.qdot_pack(tensor.data, qdot.type_number)
            for name, dense in (("base kernels", 0), ("base tiles", 1)):
                forms[name] = (lambda x, dense=dense, base_packed=base_packed:
                               baseline.qdot_matmul(x, base_packed, qdot.type_number, rows, dense=dense))
        for m in map(int, args.rows.split(",")):
            if m > 64 and rows > 100_000:
                continue  # the LM head runs on the last token of each sequence only
            x = torch.randn(m, cols).to(torch.bfloat16)
            times: dict[str, list[float]] = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, fn in forms.items():
                    fn(x)
                    times[name].append(call_us(fn, x, args.repeats, args.fastest))
            pick = min if args.fastest else statistics.median
            med = {name: pick(values) for name, values in times.items()}
            best = min(med["kernels"], med["tiles"])
            extra = (f" {med['base kernels']:.0f} | {med['kernels'] / med['base kernels']:.2f} |"
                     f" {med['base tiles']:.0f} | {med['tiles'] / med['base tiles']:.2f} |") if baseline else ""
            print(f"| {model} | {matrix} | {ggml_type} | {rows}x{cols} | {m} | {med['kernels']:.0f} | "
                  f"{med['tiles']:.0f} | {med['int4']:.0f} | {med['dense']:.0f} | {med['int4'] / best:.2f} |{extra}",
                  flush=True)



def compare_isas(args: argparse.Namespace, isas: list[int]) -> None:
    """The kernels of each path in `isas` on every shape, timed in turn round after round."""
    torch.set_num_threads(args.threads)
    extension = EXTENSION.get(wait=True)
    statistic = "fastest" if args.fastest else "median"
    print(f"threads={args.threads}; {statistic} us per call over {args.rounds} rounds x {args.repeats} calls\n")
    names = " | ".join(f"isa {isa}" for isa in isas)
    ratios = " | ".join(f"{isa} / {isas[0]}" for isa in isas[1:])
    print(f"| model | matrix | type | N x K | M | {names} | {ratios} |")
    print("|---|---|---|---|---|" + "---|" * (2 * len(isas) - 1))
    for model, matrix, ggml_type, rows, cols in SHAPES:
        if args.only and args.only not in f"{model} {matrix}":
            continue
        qdot = QdotWeight(ggml_tensor(ggml_type, rows, cols))
        forms = {isa: (lambda x, isa=isa: extension.qdot_matmul(x, qdot.packed, qdot.type_number, rows, isa=isa,
                                                                 dense=0))
                 for isa in isas}
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, cols).to(torch.bfloat16)
            times: dict[int, list[float]] = {isa: [] for isa in isas}
            for _ in range(args.rounds):
                for isa, fn in forms.items():
                    fn(x)
                    times[isa].append(call_us(fn, x, args.repeats, args.fastest))
            pick = min if args.fastest else statistics.median
            med = {isa: pick(values) for isa, values in times.items()}
            cells = " | ".join(f"{med[isa]:.1f}" for isa in isas)
            shares = " | ".join(f"{med[isa] / med[isas[0]]:.2f}" for isa in isas[1:])
            print(f"| {model} | {matrix} | {ggml_type} | {rows}x{cols} | {m} | {cells} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
