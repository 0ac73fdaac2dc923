// Quantized dot products for GGML blocks: the activation rows are quantized to int8 blocks and multiplied
// against the weight's own blocks with integer dot products (llama.cpp's vec_dot scheme), multithreaded over
// output rows with at::parallel_for (the caller's intra-op thread count applies). Included by fused_decode.cpp,
// which exposes `matmul` to Python (mistralrs/quant/qdot.py QdotWeight) and calls it for LinearKind kQdot.
//
// Layout of this folder (every file is part of the extension's cache key, mistralrs/layers/fused_decode.py):
// - qdot.h (this file): instruction sets, the int8 activation blocks, the row-parallel driver, dispatch by type;
// - legacy.h: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-weight blocks, Q8_0-style activations with their sums);
// - kquants.h: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks against Q8_K-style activations, and the
//   dequantized tiles of large batches).
//
// How a block type plugs in:
// 1. Legacy-style types (32 weights, weight = d * (u - offset) + m with unsigned codes u, or signed codes):
//    a struct in legacy.h with the layout constants and a scalar `code`, a `codes` overload in its AVX2 region,
//    and a `case` in `matmul` below calling `legacy_matmul<Type>`.
// 2. A family with its own activation format: its header defines the activation quantizer and a function
//    `Tensor family_matmul(const Tensor& x, const Tensor& w, int64_t type, int64_t out_features, Isa isa)`
//    built on `ActivationRows`, `run_rows` and `store_outputs` below, and `matmul` gets a `case` per type.
//    Every ISA path of a type gives the same integer sums; only the float accumulation order may differ.
// 3. The type's name and number in mistralrs/quant/qdot.py QDOT_TYPES, and the tests of tests/quant/test_qdot.py.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QDOT_X86 1
#else
#define QDOT_X86 0
#endif

namespace qdot {

using at::Tensor;

// The instruction sets a kernel is compiled for; the best one the CPU has is chosen at run time (`best_isa`).
enum Isa : int64_t {
  kScalar = 0,      // portable C++
  kAvx2 = 1,        // AVX2 + FMA + F16C: pmaddubsw / pmaddwd
  kAvx512Vnni = 2,  // AVX512-VNNI on 256-bit vectors (AVX512VL): vpdpbusd
};

// GGML type numbers (ggml.h `enum ggml_type`).
enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8 };

inline bool isa_supported(int64_t isa) {
  if (isa == kScalar) return true;
#if QDOT_X86 && (defined(__GNUC__) || defined(__clang__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512Vnni)
    return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
#endif
  return false;
}

inline Isa best_isa() {
  static const Isa best = isa_supported(kAvx512Vnni) ? kAvx512Vnni : isa_supported(kAvx2) ? kAvx2 : kScalar;
  return best;
}

inline Isa checked_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= kAvx512Vnni && isa_supported(isa), "isa ", isa, " is not supported on this CPU");
  return static_cast<Isa>(isa);
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Activation rows [M, K] quantized in blocks of `block` values: q = round_half_even(x / d) with d = max|x| / 127
// (q = 0 where the block is all zeros), and per block the float32 scale d and d * sum(q).
struct ActivationRows {
  Tensor q_storage, d_storage, s_storage;  // own the buffers
  const int8_t* q = nullptr;               // [M, K]
  const float* d = nullptr;                // [M, K / block]
  const float* s = nullptr;                // [M, K / block]: d * sum(q) of the block
  int64_t rows = 0, cols = 0, blocks = 0;  // M, K, K / block
};

inline ActivationRows quantize_rows(const Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 2, "activations must be [rows, in_features]");
  TORCH_CHECK(x.size(1) % block == 0, "in_features ", x.size(1), " is not a multiple of ", block);
  Tensor xf = x.to(at::kFloat).contiguous();
  ActivationRows act;
  act.rows = x.size(0);
  act.cols = x.size(1);
  act.blocks = act.cols / block;
  act.q_storage = at::empty({act.rows, act.cols}, x.options().dtype(at::kChar));
  act.d_storage = at::empty({act.rows, act.blocks}, x.options().dtype(at::kFloat));
  act.s_storage = at::empty({act.rows, act.blocks}, x.options().dtype(at::kFloat));
  const float* src = xf.data_ptr<float>();
  int8_t* q = act.q_storage.data_ptr<int8_t>();
  float* d = act.d_storage.data_ptr<float>();
  float* s = act.s_storage.data_ptr<float>();
  const int64_t total = act.rows * act.blocks;
  at::parallel_for(0, total, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* v = src + b * block;
      float amax = 0.f;
      for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float scale = amax / 127.f;
      const float inverse = scale != 0.f ? 1.f / scale : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < block; ++i) {
        const int32_t code = static_cast<int32_t>(std::nearbyint(v[i] * inverse));
        q[b * block + i] = static_cast<int8_t>(code);
        sum += code;
      }
      d[b] = scale;
      s[b] = scale * static_cast<float>(sum);
    }
  });
  act.q = q;
  act.d = d;
  act.s = s;
  return act;
}

// Calls `rows(n0, n1, out)` over the output rows in parallel; `out` is float32 [M, N], row-major. Each output row
// is computed by one thread from start to end, so the result does not depend on the thread count.
template <class Rows>
Tensor run_rows(int64_t num_rows, int64_t in_features, int64_t m, const Tensor& like, Rows rows) {
  Tensor out = at::empty({m, num_rows}, like.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, in_features * m));
  at::parallel_for(0, num_rows, grain, [&](int64_t n0, int64_t n1) { rows(n0, n1, y); });
  return out;
}

// The float32 result in the activations' dtype.
inline Tensor store_outputs(const Tensor& out, const Tensor& x) {
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace qdot

#include "legacy.h"
#include "kquants.h"

namespace qdot {

// y [M, out_features] = x [M, K] @ W^T, W the GGML blocks [out_features, row bytes] (uint8, contiguous) of `type`.
inline Tensor matmul(const Tensor& x, const Tensor& w, int64_t type, int64_t out_features, int64_t isa_choice) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "weight blocks must be contiguous uint8 [out_features, row_bytes]");
  TORCH_CHECK(w.size(0) == out_features, "weight has ", w.size(0), " rows, expected ", out_features);
  TORCH_CHECK(x.dim() == 2, "activations must be [rows, in_features]");
  const Isa isa = checked_isa(isa_choice);
  switch (type) {
    case kQ4_0: return legacy_matmul<Q4_0>(x, w, isa);
    case kQ4_1: return legacy_matmul<Q4_1>(x, w, isa);
    case kQ5_0: return legacy_matmul<Q5_0>(x, w, isa);
    case kQ5_1: return legacy_matmul<Q5_1>(x, w, isa);
    case kQ8_0: return legacy_matmul<Q8_0>(x, w, isa);
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K: return kquant_matmul(x, w, type, isa);
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// The codes (offset removed: the GGML decoding's integers), scales and biases the `isa` path reads from blocks
// [n, type bytes] of `type`: (int16 [n, 32], float32 [n], float32 [n]). For the bit-level tests.
inline std::vector<Tensor> unpack(const Tensor& blocks, int64_t type, int64_t isa_choice) {
  const Isa isa = checked_isa(isa_choice);
  switch (type) {
    case kQ4_0: return legacy_unpack<Q4_0>(blocks, isa);
    case kQ4_1: return legacy_unpack<Q4_1>(blocks, isa);
    case kQ5_0: return legacy_unpack<Q5_0>(blocks, isa);
    case kQ5_1: return legacy_unpack<Q5_1>(blocks, isa);
    case kQ8_0: return legacy_unpack<Q8_0>(blocks, isa);
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// The activation quantization the legacy kernels use: (int8 q [M, K], float32 d [M, K/32], float32 d*sum [M, K/32]).
inline std::vector<Tensor> quantize_activations(const Tensor& x) {
  ActivationRows act = quantize_rows(x, 32);
  return {act.q_storage, act.d_storage, act.s_storage};
}

inline std::vector<int64_t> supported_isas() {
  std::vector<int64_t> isas;
  for (int64_t isa = kScalar; isa <= kAvx512Vnni; ++isa)
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

}  // namespace qdot
