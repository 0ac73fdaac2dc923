"""Quantized weights: GGML block formats, their kernels, and the linear methods that use them.

One module per concern (import them directly; this package imports nothing, so that mistralrs.layers can
use `ggml_tensor` without a cycle):

- `ggml_types`: GGML block formats and torch dequantizers (bit-exact with `gguf.quants.dequantize`).
- `ggml_tensor`: `GGMLTensor`, a weight kept as raw blocks (what the GGUF loader hands to the layers).
- `packed`: `PackedWeight`, the form a weight takes for one matmul kernel, and the plain `DenseWeight`.
- `cpu_int4`: Q4_0 / Q4_1 / Q8_0 repacked for torch's CPU int4 kernel (bfloat16 activations).
- `config`: `QuantConfig`, which gives every `Linear` of a model its quant method before loading.
- `gguf_linear`: `GGUFLinearMethod` and `GGUFQuantConfig` (the fast/plain switch), kernel chosen per layer.
"""
