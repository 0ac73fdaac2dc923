// Quantized dot products for GGML blocks: the activation rows are quantized to int8 blocks and multiplied
// against the weight's own blocks with integer dot products (llama.cpp's vec_dot scheme), multithreaded over
// output rows with at::parallel_for (the caller's intra-op thread count applies). Included by fused_decode.cpp,
// which exposes `matmul` to Python (mistralrs/quant/qdot.py QdotWeight) and calls it for LinearKind kQdot.
//
// Layout of this folder (every file is part of the extension's cache key, mistralrs/layers/fused_decode.py):
// - qdot.h (this file): instruction sets, the int8 activation blocks, the row-parallel driver, the large-M path,
//   dispatch by GGML type;
// - legacy.h (+ legacy_simd.inc, its vector kernel, compiled once per instruction set): Q4_0, Q4_1, Q5_0, Q5_1,
//   Q8_0 (32-weight blocks, repacked at load in groups of 8 rows, against Q8_0-style activations);
// - kquants.h (+ kquants_simd.inc): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks kept as in the file,
//   against Q8_K-style activations: 256 codes, a scale and 16 group sums a block);
// - legacy_amx.h: the Q8_0 kernel on AMX tiles (kAmx), included by legacy.h.
//
// Every type provides three operations, reached through the `switch`es of `pack`, `matmul` and `dequantize`
// below (and its name and number in mistralrs/quant/qdot.py QDOT_TYPES):
// - pack(GGUF blocks [N, row bytes]) -> uint8 tensor: the layout its kernel reads (or the blocks unchanged);
// - matmul over that layout for small M (decode): a row-range kernel driven by `run_rows`, per instruction set;
// - dequantize(packed, row ids) -> float32 rows, bit for bit gguf's dequantizer (the embedding lookup of a tied
//   table, and the large-M path: `dense_tiles` multiplies dequantized row tiles with at::linear).
// A family with its own activation format (K-quants: Q8_K, 256 values and 16 sums a block) writes its own
// quantizer beside `quantize_rows`. Every instruction-set path of a type must give the same integer sums; only
// the float accumulation order may differ between them (tests/quant/test_qdot.py holds each to the exact
// integer arithmetic of mistralrs/quant/qdot.py qdot_reference).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Code between QDOT_TARGET_BEGIN("avx2,...") and QDOT_TARGET_END is compiled for those instruction sets (the
// translation unit itself is not), and runs only where the CPU has them (chosen at run time).
#define QDOT_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define QDOT_TARGET_BEGIN(targets) \
  QDOT_PRAGMA(clang attribute push(__attribute__((target(targets))), apply_to = function))
#define QDOT_TARGET_END QDOT_PRAGMA(clang attribute pop)
#else
#define QDOT_TARGET_BEGIN(targets) QDOT_PRAGMA(GCC push_options) QDOT_PRAGMA(GCC target(targets))
#define QDOT_TARGET_END QDOT_PRAGMA(GCC pop_options)
#endif
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
  kAvx512 = 3,      // AVX512-VNNI on 512-bit vectors (the K-quants from 3 activation rows, kAvx512Vnni below)
  kAmx = 4,         // kAvx512, and AMX-INT8 tiles for large Q8_0 weights at 4..16 activation rows (legacy_amx.h)
};

// GGML type numbers (ggml.h `enum ggml_type`).
enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8 };

// From this many activation rows on, `matmul` dequantizes row tiles and multiplies them with at::linear: at 48
// rows the tiles are ahead of (or even with) the integer kernels on every SmolLM2 and Gemma 3 shape on the AMX
// Xeon, and behind on SmolLM2's gate_up at 32 (docs/benchmarks.md; on the AMD CPU before AMX the two crossed
// at about 64).
constexpr int64_t kDenseRows = 48;
// Bytes of dequantized weights per tile in the activations' dtype (2M bfloat16 weights: SmolLM2's gate_up
// projection in one tile, multiplied by one at::linear with no concatenation of the outputs after it).
constexpr int64_t kTileBytes = int64_t{4} << 20;
// Output rows interleaved in the legacy types' packed layout (legacy.h), and dequantized together into a bfloat16
// tile (`bfloat16_rows`).
constexpr int64_t kGroupRows = 8;

// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24 and 25) and Linux lets this process use
// the tile data (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, asked once; then granted to every thread).
inline bool amx_permitted() {
#if QDOT_X86 && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  static const bool permitted = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
#else
  return false;
#endif
}

inline bool isa_supported(int64_t isa) {
  if (isa == kScalar) return true;
#if QDOT_X86 && (defined(__GNUC__) || defined(__clang__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  if (isa == kAvx512Vnni || isa == kAvx512) return avx512;
  if (isa == kAmx) return avx512 && amx_permitted();
#endif
  return false;
}

inline Isa best_isa() {
  static const Isa best = isa_supported(kAmx)      ? kAmx
                          : isa_supported(kAvx512) ? kAvx512
                          : isa_supported(kAvx2)   ? kAvx2
                                                   : kScalar;
  return best;
}

inline Isa checked_isa(int64_t isa) {
  if (isa < 0) return best_isa();
  TORCH_CHECK(isa <= kAmx && isa_supported(isa), "isa ", isa, " is not supported on this CPU");
  return static_cast<Isa>(isa);
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Activation rows [M, K] quantized in blocks of `block` values: q = round_half_even(x / d) with d = max|x| / 127
// (q = 0 where the block is all zeros), and per block the float32 scale d, sum(q) and d * sum(q). Every path
// other than kScalar quantizes a block 8 values at a time (`avx2::quantize_block`), the same codes and sums as
// the scalar form (`quantize_block_scalar`).
struct ActivationRows {
  Tensor q_storage, d_storage, sums_storage, s_storage;  // own the buffers
  const int8_t* q = nullptr;                             // [M, K]
  const float* d = nullptr;                              // [M, K / block]
  const int32_t* sums = nullptr;                         // [M, K / block]: sum(q) of the block
  const float* s = nullptr;                              // [M, K / block]: d * sum(q)
  int64_t rows = 0, cols = 0, blocks = 0;  // M, K, K / block
};

// One block of `block` values of quantize_rows: its codes into q, its scale d and sum(q) returned through d, sum.
inline void quantize_block_scalar(const float* v, int64_t block, int8_t* q, float& d, int32_t& sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float scale = amax / 127.f;
  const float inverse = scale != 0.f ? 1.f / scale : 0.f;
  sum = 0;
  for (int64_t i = 0; i < block; ++i) {
    const int32_t code = static_cast<int32_t>(std::nearbyint(v[i] * inverse));
    q[i] = static_cast<int8_t>(code);
    sum += code;
  }
  d = scale;
}

}  // namespace qdot

#if QDOT_X86
QDOT_TARGET_BEGIN("avx2")
namespace qdot::avx2 {
// quantize_block_scalar for a block of a multiple of 8 values, 8 at a time: the same max, product and
// round-half-even (vroundps in the nearest mode, as nearbyint in the default one), so the same codes and sums.
inline void quantize_block(const float* v, int64_t block, int8_t* q, float& d, int32_t& sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i = 0; i < block; i += 8) amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)), amax);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  const float scale = _mm_cvtss_f32(m) / 127.f;
  const __m256 inverse = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
  __m256i sums = _mm256_setzero_si256();
  for (int64_t i = 0; i < block; i += 8) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(v + i), inverse);
    const __m256i codes = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sums = _mm256_add_epi32(sums, codes);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(words, words));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  sum = _mm_cvtsi128_si32(t);
  d = scale;
}
}  // namespace qdot::avx2
QDOT_TARGET_END
#endif

namespace qdot {

inline ActivationRows quantize_rows(const Tensor& x, int64_t block, Isa isa = best_isa()) {
  TORCH_CHECK(x.dim() == 2, "activations must be [rows, in_features]");
  TORCH_CHECK(x.size(1) % block == 0, "in_features ", x.size(1), " is not a multiple of ", block);
  Tensor xf = x.to(at::kFloat).contiguous();
  ActivationRows act;
  act.rows = x.size(0);
  act.cols = x.size(1);
  act.blocks = act.cols / block;
  act.q_storage = at::empty({act.rows, act.cols}, x.options().dtype(at::kChar));
  act.d_storage = at::empty({act.rows, act.blocks}, x.options().dtype(at::kFloat));
  act.sums_storage = at::empty({act.rows, act.blocks}, x.options().dtype(at::kInt));
  act.s_storage = at::empty({act.rows, act.blocks}, x.options().dtype(at::kFloat));
  const float* src = xf.data_ptr<float>();
  int8_t* q = act.q_storage.data_ptr<int8_t>();
  float* d = act.d_storage.data_ptr<float>();
  int32_t* sums = act.sums_storage.data_ptr<int32_t>();
  float* s = act.s_storage.data_ptr<float>();
  const int64_t total = act.rows * act.blocks;
  at::parallel_for(0, total, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
#if QDOT_X86
      if (isa != kScalar && block % 8 == 0)
        avx2::quantize_block(src + b * block, block, q + b * block, d[b], sums[b]);
      else
#endif
        quantize_block_scalar(src + b * block, block, q + b * block, d[b], sums[b]);
      s[b] = d[b] * static_cast<float>(sums[b]);
    }
  });
  act.q = q;
  act.d = d;
  act.sums = sums;
  act.s = s;
  return act;
}

// A float32 [m, n] output. From kReusedOutputBytes on (an LM head's logits, every step) the block of the thread's
// previous such output is handed out again once nothing else holds it: a fresh block of that size is a mapping of
// its own (mistralrs/worker/host_memory.py) whose pages would fault in again on every step (~1.8 ms of CPU for
// Gemma 3's 8 x 262,144 logits). The block is kept at the largest size asked.
constexpr int64_t kReusedOutputBytes = int64_t{1} << 20;

inline Tensor output_rows(int64_t m, int64_t n, const Tensor& like) {
  const auto options = like.options().dtype(at::kFloat);
  if (m * n * static_cast<int64_t>(sizeof(float)) < kReusedOutputBytes) return at::empty({m, n}, options);
  static thread_local Tensor block;
  if (!block.defined() || block.storage().use_count() > 1 || block.numel() < m * n) {
    block = Tensor();  // a block still held stays with its holder
    block = at::empty({m * n}, options);
  }
  return block.narrow(0, 0, m * n).view({m, n});
}

// Calls `items(i0, i1, out)` over [0, num_items) in parallel (an item: a group of output rows doing `item_work`
// multiply-adds per activation row); `out` is float32 [M, out_features], row-major. Each item is computed by one
// thread from start to end, so the result does not depend on the thread count.
template <class Items>
Tensor run_rows(int64_t num_items, int64_t item_work, int64_t out_features, int64_t m, const Tensor& like,
                Items items) {
  Tensor out = output_rows(m, out_features, like);
  float* y = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, item_work * m));
  at::parallel_for(0, num_items, grain, [&](int64_t i0, int64_t i1) { items(i0, i1, y); });
  return out;
}

// The float32 result in the activations' dtype.
inline Tensor store_outputs(const Tensor& out, const Tensor& x) {
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// x [M, K] @ W^T for large M: W's rows dequantized a tile at a time (`dequantize(start, stop)` -> x's dtype
// [stop - start, K], the plain path's dense weight rows) and multiplied with at::linear, as the plain path
// multiplies its dense weight.
template <class Dequantize>
Tensor dense_tiles(const Tensor& x, int64_t out_features, Dequantize dequantize) {
  const int64_t tile = std::max<int64_t>(8, kTileBytes / (x.size(1) * x.element_size()) / 8 * 8);
  if (tile >= out_features) return at::linear(x, dequantize(0, out_features));
  std::vector<Tensor> outputs;
  for (int64_t start = 0; start < out_features; start += tile)
    outputs.push_back(at::linear(x, dequantize(start, std::min(start + tile, out_features))));
  return at::cat(outputs, 1);
}

// bfloat16 bits of float32 values, rounded to nearest even as c10::BFloat16 and Tensor.to do (NaN: 0x7FC0).
inline void round_to_bfloat16_scalar(const float* src, int64_t count, uint16_t* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = c10::detail::round_to_nearest_even(src[i]);
}

}  // namespace qdot

#if QDOT_X86
QDOT_TARGET_BEGIN("avx2")
namespace qdot::avx2 {
// round_to_bfloat16_scalar, 16 values a step: bits + 0x7FFF + (bit 16), the top half kept.
inline void round_to_bfloat16(const float* src, int64_t count, uint16_t* dst) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m256i halves[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(src + i + 8 * h);
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), 16);
      halves[h] = _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    }
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves[0], halves[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  round_to_bfloat16_scalar(src + i, count - i, dst + i);
}
}  // namespace qdot::avx2
QDOT_TARGET_END
#endif

namespace qdot {

// Rows [start, stop) of a weight as bfloat16 [stop - start, K]: each group of 8 rows dequantized to float32
// (`group(g, out)`, rows [8 g, min(8 g + 8, stop)) into `out`) in a buffer of its thread's that stays in cache, then
// rounded to bfloat16 into the tile: the values of the float32 rows cast with Tensor.to, without the float32 tile's
// trip through memory and a second pass.
template <class Group>
Tensor bfloat16_rows(int64_t start, int64_t stop, int64_t in_features, const at::TensorOptions& options, Isa isa,
                     Group group) {
  Tensor out = at::empty({stop - start, in_features}, options.dtype(at::kBFloat16));
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t g0 = start / kGroupRows, g1 = (stop + kGroupRows - 1) / kGroupRows;
  at::parallel_for(g0, g1, std::max<int64_t>(1, 2048 / in_features), [&](int64_t a, int64_t z) {
    std::vector<float> buffer(kGroupRows * in_features);
    for (int64_t g = a; g < z; ++g) {
      group(g, buffer.data());
      const int64_t count = (std::min(stop, (g + 1) * kGroupRows) - g * kGroupRows) * in_features;
      uint16_t* rows = dst + (g * kGroupRows - start) * in_features;
#if QDOT_X86
      if (isa != kScalar) {
        avx2::round_to_bfloat16(buffer.data(), count, rows);
        continue;
      }
#endif
      round_to_bfloat16_scalar(buffer.data(), count, rows);
    }
  });
  return out;
}

}  // namespace qdot

#include "legacy.h"
#include "kquants.h"

namespace qdot {

// GGUF blocks [out_features, row bytes] (uint8) of `type` -> the layout `matmul` and `dequantize` read.
inline Tensor pack(const Tensor& blocks, int64_t type) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2, "blocks must be uint8 [rows, row_bytes]");
  switch (type) {
    case kQ4_0: return legacy_pack<Q4_0>(blocks);
    case kQ4_1: return legacy_pack<Q4_1>(blocks);
    case kQ5_0: return legacy_pack<Q5_0>(blocks);
    case kQ5_1: return legacy_pack<Q5_1>(blocks);
    case kQ8_0: return legacy_pack<Q8_0>(blocks);
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K: return blocks.contiguous();  // read as they are
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// The shape of `pack`'s result for a weight of `rows` x `in_features` of `type`.
inline std::vector<int64_t> packed_shape(int64_t type, int64_t rows, int64_t in_features) {
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows, blocks = in_features / 32;
  switch (type) {
    case kQ4_0: return {groups, blocks * Packed<Q4_0>::kBytes};
    case kQ4_1: return {groups, blocks * Packed<Q4_1>::kBytes};
    case kQ5_0: return {groups, blocks * Packed<Q5_0>::kBytes};
    case kQ5_1: return {groups, blocks * Packed<Q5_1>::kBytes};
    case kQ8_0: return {groups, blocks * Packed<Q8_0>::kBytes};
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K:  // the blocks as they are
      return {rows, in_features / kSuperBlock * kquant_bytes(type)};
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// float32 [len(rows), in_features]: the rows `rows` (int64 ids) of a packed weight, dequantized as gguf does.
inline Tensor dequantize(const Tensor& packed, int64_t type, const Tensor& rows, int64_t in_features) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed weight must be contiguous uint8 [groups, bytes]");
  switch (type) {
    case kQ4_0: return legacy_dequantize<Q4_0>(packed, rows, in_features);
    case kQ4_1: return legacy_dequantize<Q4_1>(packed, rows, in_features);
    case kQ5_0: return legacy_dequantize<Q5_0>(packed, rows, in_features);
    case kQ5_1: return legacy_dequantize<Q5_1>(packed, rows, in_features);
    case kQ8_0: return legacy_dequantize<Q8_0>(packed, rows, in_features);
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K:
      return kquant_dequantize_ids(packed, type, rows, in_features);
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// Rows [8 g, min(8 g + 8, stop)) of a packed weight as float32 into `out` (row-major), the values `dequantize`
// gives.
inline void dequantize_group(const Tensor& packed, int64_t type, int64_t g, int64_t stop, int64_t in_features, Isa isa,
                             float* out) {
  const uint8_t* data = packed.data_ptr<uint8_t>();
  const int64_t num_blocks = in_features / 32;
  switch (type) {
    case kQ4_0: return legacy_dequantize_groups<Q4_0>(data, num_blocks, g, g + 1, stop, isa, out);
    case kQ4_1: return legacy_dequantize_groups<Q4_1>(data, num_blocks, g, g + 1, stop, isa, out);
    case kQ5_0: return legacy_dequantize_groups<Q5_0>(data, num_blocks, g, g + 1, stop, isa, out);
    case kQ5_1: return legacy_dequantize_groups<Q5_1>(data, num_blocks, g, g + 1, stop, isa, out);
    case kQ8_0: return legacy_dequantize_groups<Q8_0>(data, num_blocks, g, g + 1, stop, isa, out);
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K: {  // rows are whole blocks, back to back
      const int64_t n0 = g * kGroupRows, n1 = std::min(stop, n0 + kGroupRows);
      return kquant_dequantize_blocks(type, data + n0 * packed.size(1), (n1 - n0) * (in_features / kSuperBlock), out,
                                      isa);
    }
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// Rows [start, stop) of a packed weight (`start` a multiple of 8) in `dtype`, the values `dequantize` gives cast
// to it: bfloat16 rounded group by group (`bfloat16_rows`), other types from the float32 rows.
inline Tensor dequantize_range(const Tensor& packed, int64_t type, int64_t start, int64_t stop, int64_t in_features,
                               Isa isa, at::ScalarType dtype) {
  TORCH_CHECK(start % kGroupRows == 0 && start <= stop, "row range must start at a group of 8");
  if (dtype == at::kBFloat16) {
    return bfloat16_rows(start, stop, in_features, packed.options(), isa, [&](int64_t g, float* out) {
      dequantize_group(packed, type, g, stop, in_features, isa, out);
    });
  }
  Tensor rows;
  switch (type) {
    case kQ4_0: rows = legacy_dequantize_range<Q4_0>(packed, start, stop, in_features, isa); break;
    case kQ4_1: rows = legacy_dequantize_range<Q4_1>(packed, start, stop, in_features, isa); break;
    case kQ5_0: rows = legacy_dequantize_range<Q5_0>(packed, start, stop, in_features, isa); break;
    case kQ5_1: rows = legacy_dequantize_range<Q5_1>(packed, start, stop, in_features, isa); break;
    case kQ8_0: rows = legacy_dequantize_range<Q8_0>(packed, start, stop, in_features, isa); break;
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K:
      rows = kquant_dequantize_rows(packed, type, start, stop, in_features, isa);
      break;
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
  return rows.to(dtype);
}

// y [M, out_features] = x [M, K] @ W^T, W packed by `pack`: the integer kernels of the best (or the given)
// instruction set below kDenseRows activation rows, dequantized tiles and at::linear from there on (`dense` -1),
// or as `dense` forces (0: kernels, 1: tiles).
inline Tensor matmul(const Tensor& x, const Tensor& packed, int64_t type, int64_t out_features, int64_t isa_choice,
                     int64_t dense) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed weight must be contiguous uint8 [groups, bytes]");
  TORCH_CHECK(x.dim() == 2, "activations must be [rows, in_features]");
  const Isa isa = checked_isa(isa_choice);
  if (dense == 1 || (dense < 0 && x.size(0) >= kDenseRows)) {
    const int64_t in_features = x.size(1), block = is_kquant(type) ? kSuperBlock : 32;
    TORCH_CHECK(in_features % block == 0, "in_features=", in_features, " is not a multiple of ", block,
                " (GGML type ", type, ")");
    const std::vector<int64_t> shape = packed_shape(type, out_features, in_features);
    TORCH_CHECK(packed.sizes() == at::IntArrayRef(shape), "packed weight ", packed.sizes(),
                " does not hold out_features=", out_features, " rows of in_features=", in_features, " (GGML type ",
                type, ")");
    return dense_tiles(x, out_features, [&](int64_t start, int64_t stop) {
      return dequantize_range(packed, type, start, stop, x.size(1), isa, x.scalar_type());
    });
  }
  switch (type) {
    case kQ4_0: return legacy_matmul<Q4_0>(x, packed, out_features, isa);
    case kQ4_1: return legacy_matmul<Q4_1>(x, packed, out_features, isa);
    case kQ5_0: return legacy_matmul<Q5_0>(x, packed, out_features, isa);
    case kQ5_1: return legacy_matmul<Q5_1>(x, packed, out_features, isa);
    case kQ8_0: return legacy_matmul<Q8_0>(x, packed, out_features, isa);
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K: return kquant_matmul(x, packed, type, isa);
    default: TORCH_CHECK(false, "no quantized dot product for GGML type ", type);
  }
}

// The activation quantization the legacy kernels use: (int8 q [M, K], float32 d [M, K/32], int32 sum(q)
// [M, K/32], float32 d*sum [M, K/32]), on the path `isa` (-1: the best).
inline std::vector<Tensor> quantize_activations(const Tensor& x, int64_t isa) {
  ActivationRows act = quantize_rows(x, 32, checked_isa(isa));
  return {act.q_storage, act.d_storage, act.sums_storage, act.s_storage};
}

inline std::vector<int64_t> supported_isas() {
  std::vector<int64_t> isas;
  for (int64_t isa = kScalar; isa <= kAmx; ++isa)
    if (isa_supported(isa)) isas.push_back(isa);
  return isas;
}

}  // namespace qdot
