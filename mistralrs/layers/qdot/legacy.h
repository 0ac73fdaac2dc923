// The legacy GGML block types (32 weights a block) against Q8_0-style activation blocks (qdot.h ActivationRows).
//
// Each type decodes, per block, to weight_i = d * (u_i - offset) + m with small integer codes u_i (unsigned
// nibbles, with a fifth bit for Q5) or to weight_i = d * w_i with signed bytes (Q8_0); d and m are float16. With
// the activation block x_i ~ dx * q_i, a block's dot product is
//   d * dx * sum(u_i q_i) + (m - offset * d) * (dx * sum(q_i)),
// where sum(u_i q_i) is one pmaddubsw/pmaddwd pair or one vpdpbusd over the block's 32 bytes (signed weights: the
// sign moves to the activations, |w_i| * sign(q_i, w_i)) and dx * sum(q_i) is the activation block's `s`.
// A new type of this shape is one more struct below (its layout) and a case in qdot.h `matmul` / `unpack`.
#pragma once

namespace qdot {

// Byte offsets of a block's fields (-1: absent) and its code convention.
struct Q4_0 {
  static constexpr int64_t kBytes = 18, kCodes = 2, kHighBits = -1, kBias = -1, kOffset = 8;
  static constexpr bool kSigned = false;
};
struct Q4_1 {
  static constexpr int64_t kBytes = 20, kCodes = 4, kHighBits = -1, kBias = 2, kOffset = 0;
  static constexpr bool kSigned = false;
};
struct Q5_0 {
  static constexpr int64_t kBytes = 22, kCodes = 6, kHighBits = 2, kBias = -1, kOffset = 16;
  static constexpr bool kSigned = false;
};
struct Q5_1 {
  static constexpr int64_t kBytes = 24, kCodes = 8, kHighBits = 4, kBias = 2, kOffset = 0;
  static constexpr bool kSigned = false;
};
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kCodes = 2, kHighBits = -1, kBias = -1, kOffset = 0;
  static constexpr bool kSigned = true;
};

// The code of weight i of a block: u_i (byte j of the nibbles holds weight j low, weight j + 16 high; bit i of
// the 32-bit little-endian word at kHighBits is u_i's fifth bit), or the signed byte w_i.
template <class T>
inline int32_t legacy_code(const uint8_t* block, int64_t i) {
  if constexpr (T::kSigned) {
    return static_cast<int8_t>(block[T::kCodes + i]);
  } else {
    const uint8_t byte = block[T::kCodes + (i & 15)];
    int32_t code = i < 16 ? (byte & 15) : (byte >> 4);
    if constexpr (T::kHighBits >= 0) {
      uint32_t high;
      std::memcpy(&high, block + T::kHighBits, 4);
      code |= static_cast<int32_t>((high >> i) & 1) << 4;
    }
    return code;
  }
}

// (m - offset * d): the float term multiplied by the activation block's dx * sum(q).
template <class T>
inline float legacy_shift(const uint8_t* block, float scale) {
  float shift = T::kOffset ? -static_cast<float>(T::kOffset) * scale : 0.f;
  if constexpr (T::kBias >= 0) shift += half_to_float(block + T::kBias);
  return shift;
}

// Output rows [n0, n1) of the weight (blocks `w`, `row_bytes` a row) against every activation row: y [M, N].
template <class T>
void legacy_rows_scalar(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, const ActivationRows& x,
                        float* y, int64_t num_rows) {
  constexpr int64_t kChunk = 8;
  const int64_t blocks = x.blocks;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m0 = 0; m0 < x.rows; m0 += kChunk) {
      const int64_t count = std::min(kChunk, x.rows - m0);
      float acc[kChunk] = {}, offset[kChunk] = {};
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = row + b * T::kBytes;
        int32_t codes[32];
        for (int64_t i = 0; i < 32; ++i) codes[i] = legacy_code<T>(block, i);
        const float scale = half_to_float(block);
        const float shift = legacy_shift<T>(block, scale);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t a = (m0 + j) * blocks + b;
          const int8_t* q = x.q + a * 32;
          int32_t sum = 0;
          for (int64_t i = 0; i < 32; ++i) sum += codes[i] * q[i];
          acc[j] += static_cast<float>(sum) * (scale * x.d[a]);
          offset[j] += shift * x.s[a];
        }
      }
      for (int64_t j = 0; j < count; ++j) y[(m0 + j) * num_rows + n] = acc[j] + offset[j];
    }
  }
}

}  // namespace qdot

#if QDOT_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace qdot::avx2 {
// sum over each 4 bytes of u (unsigned, < 128 with q, or |w| <= 128 with q in -127..127: no saturation)
struct Dot {
  static inline __m256i dot(__m256i u, __m256i q) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1));
  }
};
#include "legacy_simd.inc"
}  // namespace qdot::avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#endif
namespace qdot::vnni {
struct Dot {
  static inline __m256i dot(__m256i u, __m256i q) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q); }
};
#include "legacy_simd.inc"
}  // namespace qdot::vnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // QDOT_X86

namespace qdot {

template <class T>
Tensor legacy_matmul(const Tensor& x, const Tensor& w, Isa isa) {
  const int64_t in_features = x.size(1), num_rows = w.size(0);
  TORCH_CHECK(in_features % 32 == 0 && w.size(1) == in_features / 32 * T::kBytes, "weight rows of ", w.size(1),
              " bytes do not hold in_features=", in_features, " weights of ", T::kBytes, "-byte blocks");
  const ActivationRows act = quantize_rows(x, 32);
  const uint8_t* blocks = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  Tensor out = run_rows(num_rows, in_features, act.rows, x, [&](int64_t n0, int64_t n1, float* y) {
#if QDOT_X86
    if (isa == kAvx512Vnni) return vnni::legacy_rows<T>(blocks, row_bytes, n0, n1, act, y, num_rows);
    if (isa == kAvx2) return avx2::legacy_rows<T>(blocks, row_bytes, n0, n1, act, y, num_rows);
#endif
    legacy_rows_scalar<T>(blocks, row_bytes, n0, n1, act, y, num_rows);
  });
  return store_outputs(out, x);
}

template <class T>
std::vector<Tensor> legacy_unpack(const Tensor& blocks, Isa isa) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) == T::kBytes,
              "blocks must be uint8 [n, ", T::kBytes, "]");
  Tensor data = blocks.contiguous();
  const int64_t n = data.size(0);
  Tensor codes = at::empty({n, 32}, data.options().dtype(at::kShort));
  Tensor scale = at::empty({n}, data.options().dtype(at::kFloat));
  Tensor bias = at::zeros({n}, data.options().dtype(at::kFloat));
  const uint8_t* src = data.data_ptr<uint8_t>();
  int16_t* c = codes.data_ptr<int16_t>();
  for (int64_t b = 0; b < n; ++b) {
    const uint8_t* block = src + b * T::kBytes;
    int32_t unpacked[32];
#if QDOT_X86
    if (isa == kAvx512Vnni) vnni::legacy_store_codes<T>(block, unpacked);
    else if (isa == kAvx2) avx2::legacy_store_codes<T>(block, unpacked);
    else
#endif
      for (int64_t i = 0; i < 32; ++i) unpacked[i] = legacy_code<T>(block, i);
    for (int64_t i = 0; i < 32; ++i) c[b * 32 + i] = static_cast<int16_t>(unpacked[i] - T::kOffset);
    scale.data_ptr<float>()[b] = half_to_float(block);
    if constexpr (T::kBias >= 0) bias.data_ptr<float>()[b] = half_to_float(block + T::kBias);
  }
  return {codes, scale, bias};
}

}  // namespace qdot
