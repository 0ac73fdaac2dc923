"""Quantized weights: GGML block formats, their kernels, and the linear methods that use them.

One module per concern (import them directly; this package imports nothing, so that mistralrs.layers can
use `ggml_tensor` without a cycle):

- `ggml_types` (+ `block_types`, `kquant_types`, `iquant_types`): GGML block formats and torch dequantizers
  (bit-exact with `gguf.quants.dequantize`).
- `ggml_tensor`: `GGMLTensor`, a weight kept as raw blocks (what the GGUF loader hands to the layers).
- `packed`: `PackedWeight`, the form a weight takes for one matmul kernel, the plain `DenseWeight`, and
  `BlockTiledWeight` (blocks kept, dequantized tile by tile inside the product).
- `cpu_int4`: GGML block types repacked for torch's CPU int4 kernel, in one or two 4-bit planes (bfloat16
  activations).
- `config`: `QuantConfig`, which gives every `Linear` of a model its quant method before loading.
- `packed_linear`: `PackedLinearMethod`, the linear method of every quant method whose weights are
  `PackedWeight`s (bias, shard checks, the product); its subclasses say only how their shards arrive.
  `packed_moe`: `PackedMoEMethod`, the same for `FusedMoE` experts (per-expert packing, grouped or per-token
  products, expert adapters).
- `gguf_linear`: `GGUFLinearMethod` and `GGUFQuantConfig` (the fast/plain switch), kernel chosen per layer;
  `gguf_moe`: the same for `FusedMoE` experts.
- `quantize`, `kquants`, `hqq`, `fp8`: the quantizers ISQ uses; `isq`, `isq_moe`, `isq_types`, `isq_state`,
  `topology`, `imatrix`: in-situ quantization; `uqff`: the UQFF reader and writer.
"""
