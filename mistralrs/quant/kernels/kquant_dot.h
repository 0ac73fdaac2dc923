// Int8 dot products of K-quant weight blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256 weights a super-block) with
// activation rows quantized to Q8_K-style blocks, on AVX512-VNNI, AVX2 or portable scalar code.
//
// Every K-quant super-block decodes to unsigned codes u (0..63) and, per group g of 16 weights, integer scales
// sc_g and mn_g with two float factors d and dmin such that each weight is d * sc_g * u - dmin * mn_g:
//   Q2_K  d * sc * q - dmin * m            (u = q in 0..3,  sc, m 4-bit; groups of 16)
//   Q3_K  d * (sc - 32) * (u - 4)          (u in 0..7, mn = 4 (sc - 32), dmin = d; groups of 16)
//   Q4_K  d * sc * q - dmin * m            (u = q in 0..15, sc, m 6-bit; groups of 32: two equal groups of 16)
//   Q5_K  d * sc * q - dmin * m            (u = q in 0..31, as Q4_K)
//   Q6_K  d * sc * (u - 32)                (u in 0..63, sc int8, mn = 32 sc, dmin = d; groups of 16)
// (the layouts are those of mistralrs/quant/kquant_types.py). An activation block holds 256 int8 codes a, a
// float scale da and the 16 group sums B_g = sum of a over group g. The dot product of a weight super-block with
// an activation block is then
//   da * (d * sum_g sc_g * sum_{i in g} u_i a_i  -  dmin * sum_g mn_g B_g),
// both sums exact in int32 (|u a| <= 63 * 127; the int16 pair sums of the SIMD paths stay below 2^15). Each
// path computes those two integers exactly and combines them with the same two fused multiply-adds per block,
// in block order, so the AVX512, AVX2 and scalar paths agree bit for bit.
//
// The activation codes are round-half-even(x * 127 / amax) of each 256 values (amax their largest magnitude,
// da = amax / 127), so each activation is off by at most da / 2: the bound the tests derive their tolerance from.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

namespace kquant {

constexpr int64_t QK = 256;  // weights per super-block and values per activation block

// One activation block (the layout of ggml's block_q8_K).
struct BlockQ8K {
  float d;              // da: the value of code 1
  int8_t qs[QK];        // codes, -127..127
  int16_t bsums[16];    // sum of the codes of each group of 16
};

enum KType : int64_t { kQ2K = 0, kQ3K = 1, kQ4K = 2, kQ5K = 3, kQ6K = 4 };

// Bytes of one super-block of `type`; 0 for an unknown type.
inline int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ2K: return 84;
    case kQ3K: return 110;
    case kQ4K: return 144;
    case kQ5K: return 176;
    case kQ6K: return 210;
    default: return 0;
  }
}

// Which instruction set computes the dot products.
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best path this CPU runs: AVX512 with VNNI (and BW), else AVX2 with FMA, else scalar.
inline int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kScalar;
}

// IEEE half bits -> float, exactly (portable; the block scales are f16).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline float half_at(const uint8_t* p) { return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// Quantizes `k` floats (k a multiple of 256) to k / 256 activation blocks.
inline void quantize_q8k(const float* x, int64_t k, BlockQ8K* out) {
  for (int64_t b = 0; b < k / QK; ++b, x += QK) {
    BlockQ8K& block = out[b];
    float amax = 0.0f;
    for (int64_t i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    if (amax == 0.0f) {
      std::memset(&block, 0, sizeof(block));
      continue;
    }
    const float scale = amax / 127.0f, inverse = 1.0f / scale;
    block.d = scale;
    for (int64_t g = 0; g < 16; ++g) {
      int sum = 0;
      for (int64_t i = 16 * g; i < 16 * g + 16; ++i) {
        const int code = static_cast<int>(std::nearbyint(x[i] * inverse));
        block.qs[i] = static_cast<int8_t>(code);
        sum += code;
      }
      block.bsums[g] = static_cast<int16_t>(sum);
    }
  }
}

// One weight super-block decoded (see the file comment).
struct Decoded {
  alignas(64) uint8_t u[QK];
  alignas(32) int16_t sc[16];
  alignas(32) int16_t mn[16];
  float d, dmin;
};

// ---- scales and factors (scalar, shared by every path) ----

inline void q4k_scales(const uint8_t* block, Decoded& out) {  // Q4_K and Q5_K: 6-bit (scale, min) per 32
  const uint8_t* s = block + 4;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    out.sc[2 * j] = out.sc[2 * j + 1] = static_cast<int16_t>(sc);
    out.mn[2 * j] = out.mn[2 * j + 1] = static_cast<int16_t>(m);
  }
  out.d = half_at(block);
  out.dmin = half_at(block + 2);
}

inline void q6k_scales(const uint8_t* block, Decoded& out) {
  const int8_t* s = reinterpret_cast<const int8_t*>(block + 192);
  for (int g = 0; g < 16; ++g) {
    out.sc[g] = s[g];
    out.mn[g] = static_cast<int16_t>(32 * s[g]);
  }
  out.d = out.dmin = half_at(block + 208);
}

inline void q2k_scales(const uint8_t* block, Decoded& out) {
  for (int g = 0; g < 16; ++g) {
    out.sc[g] = block[g] & 0x0F;
    out.mn[g] = block[g] >> 4;
  }
  out.d = half_at(block + 80);
  out.dmin = half_at(block + 82);
}

inline void q3k_scales(const uint8_t* block, Decoded& out) {
  const uint8_t* s = block + 96;
  for (int g = 0; g < 16; ++g) {
    const int low = g < 8 ? (s[g] & 0x0F) : (s[g - 8] >> 4);
    const int high = (s[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
    const int sc = (low | (high << 4)) - 32;
    out.sc[g] = static_cast<int16_t>(sc);
    out.mn[g] = static_cast<int16_t>(4 * sc);
  }
  out.d = out.dmin = half_at(block + 108);
}

inline void decode_scales(int64_t type, const uint8_t* block, Decoded& out) {
  switch (type) {
    case kQ2K: q2k_scales(block, out); break;
    case kQ3K: q3k_scales(block, out); break;
    case kQ4K: case kQ5K: q4k_scales(block, out); break;
    default: q6k_scales(block, out); break;
  }
}

// ---- codes, scalar ----

inline void decode_codes_scalar(int64_t type, const uint8_t* block, Decoded& out) {
  uint8_t* u = out.u;
  switch (type) {
    case kQ2K:
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 32; ++l) u[128 * h + 32 * k + l] = (block[16 + 32 * h + l] >> (2 * k)) & 3;
      break;
    case kQ3K:
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 32; ++l) {
            const int low = (block[32 + 32 * h + l] >> (2 * k)) & 3;
            const int high = (block[l] >> (4 * h + k)) & 1;
            u[128 * h + 32 * k + l] = static_cast<uint8_t>(low | (high << 2));
          }
      break;
    case kQ4K:
    case kQ5K: {
      const uint8_t* qs = block + (type == kQ4K ? 16 : 48);
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
          u[64 * c + l] = qs[32 * c + l] & 0x0F;
          u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
      if (type == kQ5K)
        for (int i = 0; i < 8; ++i)
          for (int l = 0; l < 32; ++l) u[32 * i + l] |= ((block[16 + l] >> i) & 1) << 4;
      break;
    }
    default:  // Q6_K
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = block + 64 * h;
        const uint8_t* qh = block + 128 + 32 * h;
        for (int l = 0; l < 32; ++l) {
          u[128 * h + l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
          u[128 * h + 32 + l] = (ql[32 + l] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
          u[128 * h + 64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
          u[128 * h + 96 + l] = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
      }
      break;
  }
}

// The two exact integer sums of one decoded block against one activation block.
inline void block_sums_scalar(const Decoded& w, const BlockQ8K& a, int32_t& isum, int32_t& msum) {
  isum = msum = 0;
  for (int g = 0; g < 16; ++g) {
    int32_t s = 0;
    for (int i = 16 * g; i < 16 * g + 16; ++i) s += static_cast<int32_t>(w.u[i]) * a.qs[i];
    isum += w.sc[g] * s;
    msum += w.mn[g] * a.bsums[g];
  }
}

// acc += da * (d * isum - dmin * msum), the same two roundings on every path.
inline float accumulate(float acc, const Decoded& w, float da, int32_t isum, int32_t msum) {
  const float block = std::fma(w.d, static_cast<float>(isum), -(w.dmin * static_cast<float>(msum)));
  return std::fma(da, block, acc);
}

// Defines `NAME(w, row_bytes, type, a, num_m, blocks, n0, n1, y, ldy, acc)`, compiled for the instruction set
// ATTR with DECODE and SUMS inlined: y[m * ldy + n] = dot(weight row n, activation row m) for rows n in [n0, n1)
// and m in [0, num_m), where weight row n starts at w + n * row_bytes and activation row m at a + m * blocks
// (blocks = K / 256). `acc` is scratch of num_m * kTileRows floats. A tile of kTileRows weight rows is decoded one
// block at a time and stays in L1 while every activation row passes.
#define KQUANT_DEFINE_GEMM(NAME, ATTR, DECODE, SUMS)                                                              \
  ATTR inline void NAME(const uint8_t* w, int64_t row_bytes, int64_t type, const BlockQ8K* a, int64_t num_m,     \
                        int64_t blocks, int64_t n0, int64_t n1, float* y, int64_t ldy, float* acc) {             \
    const int64_t bytes = block_bytes(type);                                                                     \
    Decoded tile[kTileRows];                                                                                     \
    for (int64_t t0 = n0; t0 < n1; t0 += kTileRows) {                                                            \
      const int64_t rows = std::min(kTileRows, n1 - t0);                                                         \
      std::fill(acc, acc + num_m * rows, 0.0f);                                                                  \
      for (int64_t b = 0; b < blocks; ++b) {                                                                     \
        for (int64_t r = 0; r < rows; ++r) {                                                                     \
          const uint8_t* block = w + (t0 + r) * row_bytes + b * bytes;                                           \
          decode_scales(type, block, tile[r]);                                                                   \
          DECODE(type, block, tile[r]);                                                                          \
        }                                                                                                        \
        for (int64_t m = 0; m < num_m; ++m) {                                                                    \
          const BlockQ8K& act = a[m * blocks + b];                                                               \
          float* row_acc = acc + m * rows;                                                                       \
          for (int64_t r = 0; r < rows; ++r) {                                                                   \
            int32_t isum, msum;                                                                                  \
            SUMS(tile[r], act, isum, msum);                                                                      \
            row_acc[r] = accumulate(row_acc[r], tile[r], act.d, isum, msum);                                     \
          }                                                                                                      \
        }                                                                                                        \
      }                                                                                                          \
      for (int64_t m = 0; m < num_m; ++m)                                                                        \
        for (int64_t r = 0; r < rows; ++r) y[m * ldy + t0 + r] = acc[m * rows + r];                              \
    }                                                                                                            \
  }

// Weight rows multiplied per tile.
constexpr int64_t kTileRows = 16;

KQUANT_DEFINE_GEMM(gemm_scalar, , decode_codes_scalar, block_sums_scalar)

// ---- SIMD paths: the same kernels compiled twice, for AVX2 and for AVX512-VNNI (256-bit vectors) ----

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define KQUANT_VNNI 0
#include "kquant_simd.inc"
#undef KQUANT_VNNI
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace avx512 {
#define KQUANT_VNNI 1
#include "kquant_simd.inc"
#undef KQUANT_VNNI
}  // namespace avx512
#pragma GCC pop_options

// kquant::quantize_q8k on the path `isa` (the same codes and scales on every path).
inline void quantize(int64_t isa, const float* x, int64_t k, BlockQ8K* out) {
  if (isa == kAvx512) return avx512::quantize_q8k(x, k, out);
  if (isa == kAvx2) return avx2::quantize_q8k(x, k, out);
  quantize_q8k(x, k, out);
}

// Bytes of scratch `gemm` needs for `num_m` activation rows.
inline int64_t scratch_bytes(int64_t num_m) { return num_m * kTileRows * 32; }

// Rows [n0, n1) of y = a @ w^T on the path `isa`; `scratch` holds scratch_bytes(num_m) bytes, 32-byte aligned.
inline void gemm(int64_t isa, const uint8_t* w, int64_t row_bytes, int64_t type, const BlockQ8K* a, int64_t num_m,
                 int64_t blocks, int64_t n0, int64_t n1, float* y, int64_t ldy, void* scratch) {
  if (isa == kAvx512) return avx512::gemm(w, row_bytes, type, a, num_m, blocks, n0, n1, y, ldy, scratch);
  if (isa == kAvx2) return avx2::gemm(w, row_bytes, type, a, num_m, blocks, n0, n1, y, ldy, scratch);
  gemm_scalar(w, row_bytes, type, a, num_m, blocks, n0, n1, y, ldy, static_cast<float*>(scratch));
}

}  // namespace kquant
