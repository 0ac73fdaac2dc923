// Hand-written loops for the small ops of a decode step of the fused decoder layer (fused_decode.cpp
// `DecoderLayerPlan::native_forward`): RMSNorm rows, rotate-half RoPE, the paged KV write, decode attention over
// each sequence's cached keys and values (GQA, sliding window, Gemma 2's soft-cap), the gated activations.
//
// Activations live in float32 buffers; `Rounding` rounds a value to the model's dtype (bfloat16: round to nearest
// even, as a bfloat16 ATen op stores its result) at the points where the plain path stores an op's result, so a
// bfloat16 model sees the plain path's rounding steps, though not its accumulation order (sums are taken in
// float32 in another order, exp is a polynomial): results agree within a tolerance, not bit for bit.
// The attention dot products, the softmax's exp and the activations are vectorized with AVX2 + FMA where the CPU
// has it (qdot.h's target regions); the scalar loops beside them are the portable form. The elementwise loops
// (the bfloat16 rounding, widening and KV write, RMSNorm, RoPE, the residual adds, the gate product, the scaling
// of the attention accumulators) have AVX2 forms in `exact`, compiled without FMA and taking the scalar loops'
// products and sums in their order, so they are their portable twins bit for bit (tests/layers/
// test_native_loops.py; `portable_loops` sends every loop to its portable form). At 8 rows of a bfloat16 Gemma
// 3 layer these loops in scalar form had cost more than the attention (docs/benchmarks.md, issue 20).
#pragma once

#include "qdot/qdot.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace native_decode {

using c10::BFloat16;

// The model's dtype as stored results see it: float32 (unchanged) or bfloat16 (rounded).
struct Rounding {
  bool bf16 = false;
  float operator()(float x) const { return bf16 ? static_cast<float>(BFloat16(x)) : x; }
  void row(float* x, int64_t n) const;  // x[i] = (*this)(x[i]), below
};

// Reads a float32 or bfloat16 vector as floats.
struct Floats {
  const void* data = nullptr;
  bool bf16 = false;
  float operator[](int64_t i) const {
    return bf16 ? static_cast<float>(static_cast<const BFloat16*>(data)[i]) : static_cast<const float*>(data)[i];
  }
  Floats at(int64_t offset) const {
    return {bf16 ? static_cast<const void*>(static_cast<const BFloat16*>(data) + offset)
                 : static_cast<const void*>(static_cast<const float*>(data) + offset), bf16};
  }
};

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, rounded, for `rows` rows of `n` values `stride` apart (in
// place when y == x). The sum of squares is taken in 8 lanes (x[i] into lane i % 8), then the tail, then the lanes.
inline void rms_norm_scalar(const float* x, float* y, int64_t rows, int64_t n, int64_t stride, const float* weight,
                            float eps, Rounding round) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * stride;
    float* yr = y + r * stride;
    float partial[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int64_t l = 0; l < 8; ++l) partial[l] += xr[i + l] * xr[i + l];
    float sum = 0.f;
    for (; i < n; ++i) sum += xr[i] * xr[i];
    for (float p : partial) sum += p;
    const float inverse = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) yr[j] = round(xr[j] * inverse * weight[j]);
  }
}

// apply_rotary of mistralrs/layers/rotary.py in place on `heads` heads of `head_dim` at x (consecutive): the first
// `rotary_dim` features become x * cos + rotate_half(x) * sin (sin's sign folded), rounded after the product and
// after the sum as the plain path's `addcmul(x * cos, swapped, sin)`.
inline void rotate_half_scalar(float* x, int64_t heads, int64_t head_dim, Floats cos, Floats sin,
                               int64_t rotary_dim, Rounding round) {
  const int64_t half = rotary_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      xh[i] = round(round(a * cos[i]) + b * sin[i]);
      xh[i + half] = round(round(b * cos[i + half]) + a * sin[i + half]);
    }
  }
}

// Stores n floats as the cache's element type.
inline void store_scalar(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
inline void store_scalar(BFloat16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = BFloat16(src[i]);
}

// x[i] *= a (scale_row), x[i] /= a (divide_row): the attention accumulators rescaled, then normalized.
inline void scale_row_scalar(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
inline void divide_row_scalar(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] /= a;
}

// Widens n bfloat16 values to floats.
inline void widen_scalar(float* dst, const BFloat16* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// y[i] = round(y[i] + x[i]): a residual add.
inline void add_rounded_scalar(float* y, const float* x, int64_t n, Rounding round) {
  for (int64_t i = 0; i < n; ++i) y[i] = round(y[i] + x[i]);
}

// o[i] = round(round(o[i]) * up[i]): the activated gate times up.
inline void gate_product_scalar(float* o, const float* up, int64_t n, Rounding round) {
  for (int64_t i = 0; i < n; ++i) o[i] = round(round(o[i]) * up[i]);
}

inline float dot_scalar(const float* q, const float* k, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += q[i] * k[i];
  return sum;
}
inline float dot_scalar(const float* q, const BFloat16* k, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}
template <class T>
inline void axpy_scalar(float* y, float a, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

// The gated MLP's activation (the kinds of mistralrs/layers/fused_decode.py Activation).
enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };

constexpr float kSqrt2OverPi = 0.7978845608028654f;

// x[i] = exp(x[i] - top); returns their sum.
inline float exp_shifted_scalar(float* x, int64_t n, float top) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += x[i] = std::exp(x[i] - top);
  return total;
}

// out[i] = act(x[i]): silu x / (1 + exp(-x)), or tanh-gelu 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
inline void activate_scalar(const float* x, float* out, int64_t n, int64_t activation) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = activation == kSilu ? v / (1.f + std::exp(-v))
                                 : 0.5f * v * (1.f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  }
}

// Decode attention takes keys 8 at a time (a key block): the scores of a query head against the block's keys, their
// exps, and the block's values weighted into the head's accumulator. `keys` and `values` hold 8 pointers (a short
// block repeats one: its extra lanes are computed and dropped).
constexpr int64_t kKeyBlock = 8;

template <class T>
inline void block_scores_scalar(const float* q, const T* const* keys, int64_t n, float* scores) {
  for (int64_t l = 0; l < kKeyBlock; ++l) scores[l] = dot_scalar(q, keys[l], n);
}
// x[l] = exp(x[l] - top) for the first `count` lanes, 0 after; returns their sum.
inline float block_exp_scalar(float* x, int64_t count, float top) {
  std::fill(x + count, x + kKeyBlock, 0.f);
  return exp_shifted_scalar(x, count, top);
}
template <class T>
inline void block_accumulate_scalar(float* acc, const float* weights, const T* const* values, int64_t count,
                                    int64_t n) {
  for (int64_t l = 0; l < count; ++l) axpy_scalar(acc, weights[l], values[l], n);
}

#if QDOT_X86
// The loops above on 8 floats a step. Compiled for AVX2 without FMA, so that no product and sum is fused into a
// multiply-add: every value is the scalar loop's, bit for bit.
QDOT_TARGET_BEGIN("avx2")
namespace exact {
// c10::BFloat16(x) as float for 8 floats: round to nearest even (bits + 0x7FFF + bit 16, low half cleared), NaN to
// 0x7FC0.
inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)),
                                           _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                          _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
inline __m256 round8(__m256 v, Rounding round) { return round.bf16 ? round_bf16(v) : v; }
inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load(Floats f, int64_t i) {
  return f.bf16 ? load(static_cast<const BFloat16*>(f.data) + i) : load(static_cast<const float*>(f.data) + i);
}

inline void round_row(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, round_bf16(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = static_cast<float>(BFloat16(x[i]));
}

inline void rms_norm(const float* x, float* y, int64_t rows, int64_t n, int64_t stride, const float* weight,
                     float eps, Rounding round) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * stride;
    float* yr = y + r * stride;
    __m256 lanes = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      lanes = _mm256_add_ps(lanes, _mm256_mul_ps(v, v));
    }
    alignas(32) float partial[8];
    _mm256_store_ps(partial, lanes);
    float sum = 0.f;
    for (; i < n; ++i) sum += xr[i] * xr[i];
    for (float p : partial) sum += p;
    const float inverse = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
    const __m256 scale = _mm256_set1_ps(inverse);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(yr + j, round8(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), scale),
                                                    _mm256_loadu_ps(weight + j)), round));
    for (; j < n; ++j) yr[j] = round(xr[j] * inverse * weight[j]);
  }
}

inline void rotate_half(float* x, int64_t heads, int64_t head_dim, Floats cos, Floats sin, int64_t rotary_dim,
                        Rounding round) {
  const int64_t half = rotary_dim / 2;
  if (half % 8 != 0) return rotate_half_scalar(x, heads, head_dim, cos, sin, rotary_dim, round);
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < half; i += 8) {
      const __m256 a = _mm256_loadu_ps(xh + i), b = _mm256_loadu_ps(xh + i + half);
      const __m256 first = _mm256_add_ps(round8(_mm256_mul_ps(a, load(cos, i)), round), _mm256_mul_ps(b, load(sin, i)));
      const __m256 second = _mm256_add_ps(round8(_mm256_mul_ps(b, load(cos, i + half)), round),
                                          _mm256_mul_ps(a, load(sin, i + half)));
      _mm256_storeu_ps(xh + i, round8(first, round));
      _mm256_storeu_ps(xh + i + half, round8(second, round));
    }
  }
}

inline void store(BFloat16* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(round_bf16(_mm256_loadu_ps(src + i))), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  store_scalar(dst + i, src + i, n - i);
}

inline void scale_row(float* x, float a, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
  scale_row_scalar(x + i, a, n - i);
}
inline void divide_row(float* x, float a, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), va));
  divide_row_scalar(x + i, a, n - i);
}

inline void widen(float* dst, const BFloat16* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load(src + i));
  widen_scalar(dst + i, src + i, n - i);
}

inline void add_rounded(float* y, const float* x, int64_t n, Rounding round) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, round8(_mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)), round));
  add_rounded_scalar(y + i, x + i, n - i, round);
}

inline void gate_product(float* o, const float* up, int64_t n, Rounding round) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(o + i, round8(_mm256_mul_ps(round8(_mm256_loadu_ps(o + i), round), _mm256_loadu_ps(up + i)),
                                   round));
  gate_product_scalar(o + i, up + i, n - i, round);
}
}  // namespace exact
QDOT_TARGET_END
#endif

#if QDOT_X86
QDOT_TARGET_BEGIN("avx2,fma")
// exp of 8 floats (Cephes' expf: 2^n times a degree-6 polynomial of the remainder; within ~2 ulp of std::exp),
// inputs clamped to +-88.38.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}
inline float exp_shifted_avx2(float* x, int64_t n, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift));
    _mm256_storeu_ps(x + i, e);
    sums = _mm256_add_ps(sums, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  float total = exp_shifted_scalar(x + i, n - i, top);
  for (float lane : lanes) total += lane;
  return total;
}
inline void activate_avx2(const float* x, float* out, int64_t n, int64_t activation) {
  const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 a;
    if (activation == kSilu) {
      a = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    } else {  // tanh(y) = 1 - 2 / (exp(2y) + 1)
      const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
      const __m256 y = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, v));
      const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, y)), one)));
      a = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, tanh));
    }
    _mm256_storeu_ps(out + i, a);
  }
  activate_scalar(x + i, out + i, n - i, activation);
}
// q . k for float32 or bfloat16 keys (`exact::load` widens them).
template <class K>
inline float dot_avx2(const float* q, const K* k, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), exact::load(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), exact::load(k + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), exact::load(k + i), a0);
  a0 = _mm256_add_ps(a0, a1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s) + dot_scalar(q + i, k + i, n - i);
}
template <class T>
inline void axpy_avx2(float* y, float a, const T* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, exact::load(x + i), _mm256_loadu_ps(y + i)));
  axpy_scalar(y + i, a, x + i, n - i);
}
// The 8 lane sums of 8 vectors: [sum(a[0]), ..., sum(a[7])].
inline __m256 sum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
template <class T>
inline void block_scores_avx2(const float* q, const T* const* keys, int64_t n, float* scores) {
  __m256 acc[kKeyBlock];
#pragma GCC unroll 8
  for (int64_t l = 0; l < kKeyBlock; ++l) acc[l] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
#pragma GCC unroll 8
    for (int64_t l = 0; l < kKeyBlock; ++l) acc[l] = _mm256_fmadd_ps(qv, exact::load(keys[l] + i), acc[l]);
  }
  _mm256_storeu_ps(scores, sum8x8(acc));
  if (i < n)
    for (int64_t l = 0; l < kKeyBlock; ++l) scores[l] += dot_scalar(q + i, keys[l] + i, n - i);
}
inline float block_exp_avx2(float* x, int64_t count, float top) {
  alignas(32) float lanes[kKeyBlock];
  _mm256_store_ps(lanes, exp8(_mm256_sub_ps(_mm256_loadu_ps(x), _mm256_set1_ps(top))));
  float total = 0.f;
  for (int64_t l = 0; l < kKeyBlock; ++l) total += x[l] = l < count ? lanes[l] : 0.f;
  return total;
}
template <class T>
inline void block_accumulate_avx2(float* acc, const float* weights, const T* const* values, int64_t count,
                                  int64_t n) {
  int64_t i = 0;
  if (count == kKeyBlock) {  // the weights held in registers, two chains of multiply-adds
    __m256 w[kKeyBlock];
#pragma GCC unroll 8
    for (int64_t l = 0; l < kKeyBlock; ++l) w[l] = _mm256_set1_ps(weights[l]);
    for (; i + 8 <= n; i += 8) {
      __m256 even = _mm256_loadu_ps(acc + i), odd = _mm256_mul_ps(w[1], exact::load(values[1] + i));
#pragma GCC unroll 4
      for (int64_t l = 0; l < kKeyBlock; l += 2) {
        even = _mm256_fmadd_ps(w[l], exact::load(values[l] + i), even);
        if (l > 0) odd = _mm256_fmadd_ps(w[l + 1], exact::load(values[l + 1] + i), odd);
      }
      _mm256_storeu_ps(acc + i, _mm256_add_ps(even, odd));
    }
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    for (int64_t l = 0; l < count; ++l) a = _mm256_fmadd_ps(_mm256_set1_ps(weights[l]), exact::load(values[l] + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
  for (int64_t l = 0; l < count; ++l) axpy_scalar(acc + i, weights[l], values[l] + i, n - i);
}
QDOT_TARGET_END
#endif

// Whether the tests asked for the portable loops alone (fused_decode.cpp `native_portable`); the AVX2 forms run
// otherwise, where the CPU has them.
inline bool& portable_loops() {
  static bool portable = false;
  return portable;
}

inline bool use_avx2() {
  static const bool avx2 = qdot::best_isa() >= qdot::kAvx2;
  return avx2 && !portable_loops();
}

inline void Rounding::row(float* x, int64_t n) const {
  if (!bf16) return;
#if QDOT_X86
  if (use_avx2()) return exact::round_row(x, n);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(BFloat16(x[i]));
}

inline void rms_norm(const float* x, float* y, int64_t rows, int64_t n, int64_t stride, const float* weight,
                     float eps, Rounding round) {
#if QDOT_X86
  if (use_avx2()) return exact::rms_norm(x, y, rows, n, stride, weight, eps, round);
#endif
  rms_norm_scalar(x, y, rows, n, stride, weight, eps, round);
}

inline void rotate_half(float* x, int64_t heads, int64_t head_dim, Floats cos, Floats sin, int64_t rotary_dim,
                        Rounding round) {
#if QDOT_X86
  if (use_avx2()) return exact::rotate_half(x, heads, head_dim, cos, sin, rotary_dim, round);
#endif
  rotate_half_scalar(x, heads, head_dim, cos, sin, rotary_dim, round);
}

inline void store(float* dst, const float* src, int64_t n) { store_scalar(dst, src, n); }
inline void store(BFloat16* dst, const float* src, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return exact::store(dst, src, n);
#endif
  store_scalar(dst, src, n);
}

inline void scale_row(float* x, float a, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return exact::scale_row(x, a, n);
#endif
  scale_row_scalar(x, a, n);
}
inline void divide_row(float* x, float a, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return exact::divide_row(x, a, n);
#endif
  divide_row_scalar(x, a, n);
}

inline void widen(float* dst, const BFloat16* src, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return exact::widen(dst, src, n);
#endif
  widen_scalar(dst, src, n);
}

inline void add_rounded(float* y, const float* x, int64_t n, Rounding round) {
#if QDOT_X86
  if (use_avx2()) return exact::add_rounded(y, x, n, round);
#endif
  add_rounded_scalar(y, x, n, round);
}

inline void gate_product(float* o, const float* up, int64_t n, Rounding round) {
#if QDOT_X86
  if (use_avx2()) return exact::gate_product(o, up, n, round);
#endif
  gate_product_scalar(o, up, n, round);
}

inline float exp_shifted(float* x, int64_t n, float top) {
#if QDOT_X86
  if (use_avx2()) return exp_shifted_avx2(x, n, top);
#endif
  return exp_shifted_scalar(x, n, top);
}

inline void activate(const float* x, float* out, int64_t n, int64_t activation) {
#if QDOT_X86
  if (use_avx2()) return activate_avx2(x, out, n, activation);
#endif
  activate_scalar(x, out, n, activation);
}

template <class T>
inline float dot(const float* q, const T* k, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return dot_avx2(q, k, n);
#endif
  return dot_scalar(q, k, n);
}

template <class T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return axpy_avx2(y, a, x, n);
#endif
  axpy_scalar(y, a, x, n);
}

template <class T>
inline void block_scores(const float* q, const T* const* keys, int64_t n, float* scores) {
#if QDOT_X86
  if (use_avx2()) return block_scores_avx2(q, keys, n, scores);
#endif
  block_scores_scalar(q, keys, n, scores);
}

inline float block_exp(float* x, int64_t count, float top) {
#if QDOT_X86
  if (use_avx2()) return block_exp_avx2(x, count, top);
#endif
  return block_exp_scalar(x, count, top);
}

template <class T>
inline void block_accumulate(float* acc, const float* weights, const T* const* values, int64_t count, int64_t n) {
#if QDOT_X86
  if (use_avx2()) return block_accumulate_avx2(acc, weights, values, count, n);
#endif
  block_accumulate_scalar(acc, weights, values, count, n);
}

// Where a decode step's sequences keep their keys and values: context position j of sequence s is flat cache slot
// `first_slot + j` (one sequence over consecutive blocks) or `gather[s * max_context_len + j]`.
struct ContextSlots {
  int64_t first_slot = -1;         // -1: read `gather`
  const int64_t* gather = nullptr;  // [num_seqs * max_context_len]
  int64_t max_context_len = 0;
  int64_t operator()(int64_t s, int64_t j) const {
    return first_slot >= 0 ? first_slot + j : gather[s * max_context_len + j];
  }
};

// The attention geometry of a layer.
struct AttentionShape {
  int64_t num_heads, num_kv_heads, head_dim;
  float scale;
  float softcap;           // 0: none
  int64_t sliding_window;  // 0: none; else keys older than this many positions are not attended
};

// The keys a query of sequence s sees: positions [first, context) of its context.
inline int64_t first_visible(int64_t context, const AttentionShape& shape) {
  return shape.sliding_window > 0 ? std::max<int64_t>(0, context - shape.sliding_window) : 0;
}

// Gemma 2's soft-capped attention, as _softcapped_attention computes it: the capped scores q . k rounded, the
// probabilities normalized and rounded before they weight the values, so the whole row of scores is taken before
// any value is read. Parallel over (sequence, head).
template <class T>
void softcapped_attention(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache, ContextSlots slots,
                          const std::vector<int64_t>& context_lens, const AttentionShape& shape, float* out,
                          Rounding round) {
  const int64_t num_seqs = static_cast<int64_t>(context_lens.size()), heads = shape.num_heads;
  const int64_t head_dim = shape.head_dim, group = heads / shape.num_kv_heads;
  const int64_t slot_stride = shape.num_kv_heads * head_dim;
  const int64_t work = std::max<int64_t>(1, slots.max_context_len * head_dim);  // multiply-adds of an item, at most
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / work);
  at::parallel_for(0, num_seqs * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(slots.max_context_len));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads, h = item % heads, kv = h / group;
      const int64_t context = context_lens[s], first = first_visible(context, shape);
      const float* qh = q + s * q_stride + h * head_dim;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = first; j < context; ++j) {
        const float score = dot(qh, k_cache + slots(s, j) * slot_stride + kv * head_dim, head_dim);
        scores[j - first] = std::tanh(round(score) * shape.scale / shape.softcap) * shape.softcap;
        top = std::max(top, scores[j - first]);
      }
      const float total = exp_shifted(scores.data(), context - first, top);
      float* oh = out + s * heads * head_dim + h * head_dim;
      std::fill(oh, oh + head_dim, 0.f);
      for (int64_t j = first; j < context; ++j)
        axpy(oh, round(scores[j - first] / total), v_cache + slots(s, j) * slot_stride + kv * head_dim, head_dim);
      round.row(oh, head_dim);
    }
  });
}

// The online softmax of one kv head's query heads (`group` rows of `head_dim` at q) over the keys [begin, end) of
// sequence s, a key block at a time: per head the running maximum score `top`, the running sum of exp(score - top)
// `total` and the values weighted by those exps `acc` (rescaled when the maximum grows). In bfloat16 the weights
// are rounded before they weight the values, as the flash attention kernel rounds its probabilities.
template <class T>
void attend_keys(const float* q, int64_t group, const T* k_cache, const T* v_cache, ContextSlots slots, int64_t s,
                 int64_t kv, int64_t begin, int64_t end, const AttentionShape& shape, float* top, float* total,
                 float* acc, Rounding round) {
  const int64_t head_dim = shape.head_dim, slot_stride = shape.num_kv_heads * head_dim;
  std::fill(top, top + group, -std::numeric_limits<float>::infinity());
  std::fill(total, total + group, 0.f);
  std::fill(acc, acc + group * head_dim, 0.f);
  const T* keys[kKeyBlock];
  const T* values[kKeyBlock];
  float scores[kKeyBlock];
  for (int64_t j = begin; j < end; j += kKeyBlock) {
    const int64_t count = std::min(kKeyBlock, end - j);
    for (int64_t l = 0; l < kKeyBlock; ++l) {
      const int64_t offset = slots(s, j + std::min(l, count - 1)) * slot_stride + kv * head_dim;
      keys[l] = k_cache + offset;
      values[l] = v_cache + offset;
    }
    for (int64_t l = j + kKeyBlock; l < std::min(end, j + 2 * kKeyBlock); ++l) {  // the next block, from memory
      const int64_t offset = slots(s, l) * slot_stride + kv * head_dim;
      for (int64_t byte = 0; byte < head_dim * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(k_cache + offset) + byte);
        __builtin_prefetch(reinterpret_cast<const char*>(v_cache + offset) + byte);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      block_scores(q + g * head_dim, keys, head_dim, scores);
      float block_top = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < count; ++l) block_top = std::max(block_top, scores[l] *= shape.scale);
      float* ag = acc + g * head_dim;
      if (block_top > top[g]) {
        const float rescale = std::exp(top[g] - block_top);
        total[g] *= rescale;
        scale_row(ag, rescale, head_dim);
        top[g] = block_top;
      }
      total[g] += block_exp(scores, count, top[g]);
      if (round.bf16)
        for (int64_t l = 0; l < count; ++l) scores[l] = round(scores[l]);
      block_accumulate(ag, scores, values, count, head_dim);
    }
  }
}

// One query token per sequence: out[s, h] = softmax(q[s, h] . K_s^T * scale) V_s over the sequence's visible
// keys (the last `sliding_window` of its `context_lens[s]`), with head h reading kv head h / (heads per kv head).
// q rows are `q_stride` floats apart; the caches are [slots, num_kv_heads, head_dim] of T. Rounded at the end
// (the plain path's attention output in the model's dtype). Each (sequence, kv head) reads its keys and values
// once for all its query heads (`attend_keys`); when those pairs are too few to keep every thread busy (one
// sequence), each pair's keys are split into parts taken in parallel, whose partial softmaxes are merged at the end
// (flash-decoding). With a soft-cap: `softcapped_attention`.
template <class T>
void decode_attention(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache, ContextSlots slots,
                      const std::vector<int64_t>& context_lens, const AttentionShape& shape, float* out,
                      Rounding round) {
  if (shape.softcap > 0.f)
    return softcapped_attention(q, q_stride, k_cache, v_cache, slots, context_lens, shape, out, round);
  constexpr int64_t kMinPartKeys = 64;  // keys of a part of a split sequence, at least
  const int64_t num_seqs = static_cast<int64_t>(context_lens.size()), kv_heads = shape.num_kv_heads;
  const int64_t head_dim = shape.head_dim, group = shape.num_heads / kv_heads, pairs = num_seqs * kv_heads;
  const int64_t most_keys = shape.sliding_window > 0 ? std::min(shape.sliding_window, slots.max_context_len)
                                                     : slots.max_context_len;
  const int64_t wanted = (4 * at::get_num_threads() + pairs - 1) / pairs;  // parts per pair for 4 items a thread
  const int64_t parts = std::max<int64_t>(1, std::min(wanted, most_keys / kMinPartKeys));
  const int64_t items = pairs * parts;
  std::vector<float> tops(items * group), totals(items * group), accs(items * group * head_dim);
  const int64_t work = std::max<int64_t>(1, (most_keys + parts - 1) / parts * head_dim * group);  // per item
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / work);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / parts, part = item % parts, s = pair / kv_heads, kv = pair % kv_heads;
      const int64_t context = context_lens[s], first = first_visible(context, shape);
      const int64_t length = (context - first + parts - 1) / parts;
      const int64_t from = std::min(context, first + part * length), to = std::min(context, from + length);
      attend_keys(q + s * q_stride + kv * group * head_dim, group, k_cache, v_cache, slots, s, kv, from, to, shape,
                  tops.data() + item * group, totals.data() + item * group,
                  accs.data() + item * group * head_dim, round);
    }
  });
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t s = pair / kv_heads, kv = pair % kv_heads;
    for (int64_t g = 0; g < group; ++g) {
      float* oh = out + (s * shape.num_heads + kv * group + g) * head_dim;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t part = 0; part < parts; ++part) top = std::max(top, tops[(pair * parts + part) * group + g]);
      std::fill(oh, oh + head_dim, 0.f);
      float total = 0.f;
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t at = (pair * parts + part) * group + g;
        if (totals[at] == 0.f) continue;  // an empty part (a short sequence beside long ones)
        const float rescale = std::exp(tops[at] - top);
        total += totals[at] * rescale;
        axpy(oh, rescale, accs.data() + at * head_dim, head_dim);
      }
      divide_row(oh, total, head_dim);
      round.row(oh, head_dim);
    }
  }
}

// The gated MLP on float32 rows: out = round(round(act(gate)) * up), gate and up the halves of each `2 * n` row
// of gate_up.
inline void gate(const float* gate_up, int64_t rows, int64_t n, int64_t activation, float* out, Rounding round) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* up = gate_up + r * 2 * n + n;
    float* o = out + r * n;
    activate(gate_up + r * 2 * n, o, n, activation);
    gate_product(o, up, n, round);
  }
}

}  // namespace native_decode
