// The legacy GGML block types (32 weights a block) against Q8_0-style activation blocks (qdot.h ActivationRows).
//
// Each type decodes, per block, to weight_i = d * (u_i - offset) + m with unsigned integer codes u_i and float16
// d and m (m = 0 for Q4_0, Q5_0, Q8_0): u = the nibble (Q4, offset 8 or 0), the nibble plus a fifth bit (Q5,
// offset 16 or 0), or the signed byte + 128 (Q8_0, offset 128). With the activation block x_i ~ dx * q_i,
//   sum_i weight_i x_i ~ d * dx * (sum_i u_i q_i - offset * sum_i q_i) + m * (dx * sum_i q_i),
// where the integer sums are exact and dx * sum(q_i) is the activation block's `s`.
//
// Packed layout (`legacy_pack`, once at load): output rows in groups of 8, each group's blocks back to back; a
// group's block holds the 8 rows' d (float16 x 8), their m (float16 x 8, types with m), then their codes so that
// 32-bit lane r of the k-th 32-byte vector holds codes 4k..4k+3 of row r: one vpdpbusd (or pmaddubsw + pmaddwd)
// against the activation's bytes 4k..4k+3 broadcast adds 4 products to each of the 8 rows' sums, and the 8
// rows' results stay in the 8 lanes (no horizontal sums). 4- and 5-bit codes store their low 4 bits two steps a
// byte (step k in the low nibbles, step k + 4 in the high ones: 128 bytes); 8-bit codes a byte each (256
// bytes). Q5_0 and Q5_1 then hold the fifth bits in 8 32-bit little-endian words (32 bytes), one a step: bit p
// of word k is the fifth bit of byte p of step k's vector (code 4k + p % 4 of row p / 4), so that the word is a
// byte mask of that vector (AVX512BW: one masked vpaddb of 16; AVX2: the bits spread to bytes and compared).
// Every type takes exactly the bytes of its blocks. Rows past the last group are zero (and their outputs
// dropped).
//
// A new type of this shape is one more struct below and a case in qdot.h `pack` / `matmul` / `dequantize`.
#pragma once

namespace qdot {

// Byte offsets of a GGUF block's fields (-1: absent), and the code convention (kNibbles: the packed layout stores
// the codes' low 4 bits two steps a byte; kHighBits >= 0: and their fifth bits in a plane of 8 words).
struct Q4_0 {
  static constexpr int64_t kBytes = 18, kCodes = 2, kHighBits = -1, kBias = -1;
  static constexpr int32_t kOffset = 8;
  static constexpr bool kSigned = false, kNibbles = true;
};
struct Q4_1 {
  static constexpr int64_t kBytes = 20, kCodes = 4, kHighBits = -1, kBias = 2;
  static constexpr int32_t kOffset = 0;
  static constexpr bool kSigned = false, kNibbles = true;
};
struct Q5_0 {
  static constexpr int64_t kBytes = 22, kCodes = 6, kHighBits = 2, kBias = -1;
  static constexpr int32_t kOffset = 16;
  static constexpr bool kSigned = false, kNibbles = true;
};
struct Q5_1 {
  static constexpr int64_t kBytes = 24, kCodes = 8, kHighBits = 4, kBias = 2;
  static constexpr int32_t kOffset = 0;
  static constexpr bool kSigned = false, kNibbles = true;
};
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kCodes = 2, kHighBits = -1, kBias = -1;
  static constexpr int32_t kOffset = 128;
  static constexpr bool kSigned = true, kNibbles = false;
};

template <class T>
struct Packed {
  static constexpr bool kHigh = T::kHighBits >= 0;                         // a plane of fifth bits (Q5)
  static constexpr int64_t kBiasAt = 16;                                   // after the 8 scales
  static constexpr int64_t kCodesAt = T::kBias >= 0 ? 32 : 16;             // after the scales (and biases)
  static constexpr int64_t kHighAt = kCodesAt + 128;                       // after the nibbles (kHigh)
  static constexpr int64_t kBytes = kCodesAt + (T::kNibbles ? 128 : 256) + (kHigh ? 32 : 0);  // a group's block
  // byte (and nibble shift) of code i of row r in a group's block (its low 4 bits for the nibble types)
  static constexpr int64_t byte(int64_t r, int64_t i) {
    const int64_t k = i / 4;
    return kCodesAt + ((T::kNibbles ? k % 4 : k) * kGroupRows + r) * 4 + i % 4;
  }
  static constexpr int shift(int64_t i) { return T::kNibbles && i >= 16 ? 4 : 0; }
  // byte and bit of code i of row r's fifth bit: bit p = 4 r + i % 4 of word i / 4 of the plane (kHigh)
  static constexpr int64_t high_byte(int64_t r, int64_t i) { return kHighAt + i / 4 * 4 + r / 2; }
  static constexpr int high_bit(int64_t r, int64_t i) { return static_cast<int>(r % 2 * 4 + i % 4); }
};

// u_i of a GGUF block (byte j of the nibbles holds weight j low, weight j + 16 high; bit i of the 32-bit
// little-endian word at kHighBits is u_i's fifth bit; Q8_0: the signed byte + 128).
template <class T>
inline int32_t file_code(const uint8_t* block, int64_t i) {
  if constexpr (T::kSigned) return static_cast<int8_t>(block[T::kCodes + i]) + 128;
  const uint8_t byte = block[T::kCodes + (i & 15)];
  int32_t code = i < 16 ? (byte & 15) : (byte >> 4);
  if constexpr (T::kHighBits >= 0) {
    uint32_t high;
    std::memcpy(&high, block + T::kHighBits, 4);
    code |= static_cast<int32_t>((high >> i) & 1) << 4;
  }
  return code;
}

template <class T>
inline int32_t packed_code(const uint8_t* group_block, int64_t r, int64_t i) {
  int32_t code = (group_block[Packed<T>::byte(r, i)] >> Packed<T>::shift(i)) & (T::kNibbles ? 15 : 255);
  if constexpr (Packed<T>::kHigh)
    code |= ((group_block[Packed<T>::high_byte(r, i)] >> Packed<T>::high_bit(r, i)) & 1) << 4;
  return code;
}

// GGUF blocks [N, K / 32 * kBytes] -> packed [ceil(N / 8), K / 32 * Packed::kBytes].
template <class T>
Tensor legacy_pack(const Tensor& blocks) {
  TORCH_CHECK(blocks.size(1) % T::kBytes == 0, "weight rows of ", blocks.size(1), " bytes are not whole ",
              T::kBytes, "-byte blocks");
  const Tensor src_tensor = blocks.contiguous();
  const int64_t rows = src_tensor.size(0), num_blocks = src_tensor.size(1) / T::kBytes;
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows;
  Tensor packed = at::zeros({groups, num_blocks * Packed<T>::kBytes}, src_tensor.options());
  const uint8_t* src = src_tensor.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t r = 0; r < kGroupRows && g * kGroupRows + r < rows; ++r) {
        const uint8_t* row = src + (g * kGroupRows + r) * num_blocks * T::kBytes;
        for (int64_t b = 0; b < num_blocks; ++b) {
          const uint8_t* block = row + b * T::kBytes;
          uint8_t* out = dst + (g * num_blocks + b) * Packed<T>::kBytes;
          std::memcpy(out + 2 * r, block, 2);
          if constexpr (T::kBias >= 0) std::memcpy(out + Packed<T>::kBiasAt + 2 * r, block + T::kBias, 2);
          for (int64_t i = 0; i < 32; ++i) {
            const int32_t code = file_code<T>(block, i), low = T::kNibbles ? code & 15 : code;
            out[Packed<T>::byte(r, i)] |= static_cast<uint8_t>(low << Packed<T>::shift(i));
            if constexpr (Packed<T>::kHigh)
              out[Packed<T>::high_byte(r, i)] |= static_cast<uint8_t>((code >> 4) << Packed<T>::high_bit(r, i));
          }
        }
      }
    }
  });
  return packed;
}

// Rows of the packed weight as float32: d * (u - offset) (+ m), the float32 operations of gguf's dequantizer
// (a product, then a sum: no fused multiply-add), so the values are gguf's bit for bit.
template <class T>
void legacy_dequantize_row(const uint8_t* packed, int64_t num_blocks, int64_t n, float* out) {
  const uint8_t* group = packed + (n / kGroupRows) * num_blocks * Packed<T>::kBytes;
  const int64_t r = n % kGroupRows;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = group + b * Packed<T>::kBytes;
    const float scale = half_to_float(block + 2 * r);
    float bias = 0.f;
    if constexpr (T::kBias >= 0) bias = half_to_float(block + Packed<T>::kBiasAt + 2 * r);
    for (int64_t i = 0; i < 32; ++i) {
      const float product = scale * static_cast<float>(packed_code<T>(block, r, i) - T::kOffset);
      out[b * 32 + i] = T::kBias >= 0 ? product + bias : product;
    }
  }
}

// Output rows [8 g0, 8 g1) against every activation row, one row of 8 lanes at a time (the portable path).
template <class T>
void legacy_groups_scalar(const uint8_t* packed, int64_t g0, int64_t g1, const ActivationRows& x, float* y,
                          int64_t num_rows) {
  const int64_t blocks = x.blocks;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t r = 0; r < kGroupRows && g * kGroupRows + r < num_rows; ++r) {
      for (int64_t m = 0; m < x.rows; ++m) {
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* block = packed + (g * blocks + b) * Packed<T>::kBytes;
          const int64_t a = m * blocks + b;
          const int8_t* q = x.q + a * 32;
          int32_t sum = 0;
          for (int64_t i = 0; i < 32; ++i) sum += packed_code<T>(block, r, i) * q[i];
          sum -= T::kOffset * x.sums[a];
          acc += static_cast<float>(sum) * (half_to_float(block + 2 * r) * x.d[a]);
          if constexpr (T::kBias >= 0) acc += half_to_float(block + Packed<T>::kBiasAt + 2 * r) * x.s[a];
        }
        y[m * num_rows + g * kGroupRows + r] = acc;
      }
    }
  }
}

}  // namespace qdot

#if QDOT_X86
// One step's fifth bits (a word of the plane, legacy.h's layout) as bytes: 16 in byte p where bit p of the word is
// set, 0 elsewhere (byte p / 8 of the word spread to byte p, then each byte's own bit tested). Compiled for AVX2
// alone, so that both the kernel's and the exact dequantizer's target regions inline it.
QDOT_TARGET_BEGIN("avx2")
namespace qdot::avx2_bits {
inline __m256i fifth_bits(const uint8_t* word) {
  int32_t bits;
  std::memcpy(&bits, word, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(bits), _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(16));
}
}  // namespace qdot::avx2_bits
QDOT_TARGET_END

QDOT_TARGET_BEGIN("avx2,fma,f16c")
namespace qdot::avx2 {
// acc + per 32-bit lane the sum of 4 products u8 * s8. Codes reaching 255 (Q8_0) would saturate pmaddubsw's
// 16-bit pairs: those are turned back into signed bytes w = u - 128 and multiplied as |w| * sign(q, w), so the
// lane gets sum(w q) = sum(u q) - 128 sum(q) (kSignedWide: the kernel then skips the offset term).
struct Dot {
  static constexpr bool kSignedWide = true;
  static inline __m256i add(__m256i acc, __m256i u, __m256i q) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)));
  }
  static inline __m256i add_wide(__m256i acc, __m256i u, __m256i q) {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    return add(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
  }
  // the 5-bit codes of one step: its low nibbles plus 16 where its word of fifth bits says so
  static inline __m256i with_fifth_bits(__m256i nibbles, const uint8_t* word) {
    return _mm256_or_si256(nibbles, avx2_bits::fifth_bits(word));
  }
};
#include "legacy_simd.inc"
}  // namespace qdot::avx2
QDOT_TARGET_END

// Rows [8 g0, 8 g1) dequantized into `out` (row-major, `in_features` a row, row 8 g0 first; rows past `num_rows`
// skipped), the values of legacy_dequantize_row. Compiled without FMA, so that d * (u - offset) + m rounds twice,
// as gguf's.
QDOT_TARGET_BEGIN("avx2,f16c")
namespace qdot::avx2_exact {
template <class T>
void legacy_dequantize_groups(const uint8_t* packed, int64_t num_blocks, int64_t g0, int64_t g1, int64_t num_rows,
                              float* out) {
  const int64_t in_features = num_blocks * 32;
  __m256i pair_index[4];
  for (int p = 0; p < 4; ++p)
    pair_index[p] = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
  const __m256i offset = _mm256_set1_epi32(T::kOffset);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n = g * kGroupRows, valid = std::min<int64_t>(kGroupRows, num_rows - n);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const uint8_t* block = packed + (g * num_blocks + b) * Packed<T>::kBytes;
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
      __m256 bias = _mm256_setzero_ps();
      if constexpr (T::kBias >= 0)
        bias = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + Packed<T>::kBiasAt)));
      __m256 scales[4], biases[4];
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        scales[p] = _mm256_permutevar8x32_ps(scale, pair_index[p]);
        biases[p] = _mm256_permutevar8x32_ps(bias, pair_index[p]);
      }
      const uint8_t* codes = block + Packed<T>::kCodesAt;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        __m256i v;
        if constexpr (T::kNibbles) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * (k % 4)));
          v = _mm256_and_si256(k < 4 ? raw : _mm256_srli_epi16(raw, 4), _mm256_set1_epi8(15));
          if constexpr (Packed<T>::kHigh)
            v = _mm256_or_si256(v, avx2_bits::fifth_bits(block + Packed<T>::kHighAt + 4 * k));
        } else {
          v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * k));
        }
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {  // rows 2p and 2p + 1: their 4 codes of step k
          const __m128i half = p < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
          const __m128i bytes = p % 2 ? _mm_srli_si128(half, 8) : half;
          const __m256i ints = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), offset);
          __m256 values = _mm256_mul_ps(_mm256_cvtepi32_ps(ints), scales[p]);
          if constexpr (T::kBias >= 0) values = _mm256_add_ps(values, biases[p]);
          const int64_t column = b * 32 + 4 * k;
          float* rows = out + (n - g0 * kGroupRows + 2 * p) * in_features + column;
          if (2 * p < valid) _mm_storeu_ps(rows, _mm256_castps256_ps128(values));
          if (2 * p + 1 < valid) _mm_storeu_ps(rows + in_features, _mm256_extractf128_ps(values, 1));
        }
      }
    }
  }
}
}  // namespace qdot::avx2_exact
QDOT_TARGET_END

QDOT_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace qdot::vnni {
// vpdpbusd: 32-bit sums without saturation, for every code width.
struct Dot {
  static constexpr bool kSignedWide = false;
  static inline __m256i add(__m256i acc, __m256i u, __m256i q) { return _mm256_dpbusd_epi32(acc, u, q); }
  static inline __m256i add_wide(__m256i acc, __m256i u, __m256i q) { return _mm256_dpbusd_epi32(acc, u, q); }
  // the word of fifth bits is the byte mask of the step's vector: one masked vpaddb of 16
  static inline __m256i with_fifth_bits(__m256i nibbles, const uint8_t* word) {
    uint32_t bits;
    std::memcpy(&bits, word, 4);
    return _mm256_mask_add_epi8(nibbles, _cvtu32_mask32(bits), nibbles, _mm256_set1_epi8(16));
  }
};
#include "legacy_simd.inc"

// The kernel on 512-bit vectors (kAvx512): two groups a vector, group g in lanes 0-7 and group g + 1 in lanes 8-15,
// each lane's integer sums and float accumulation exactly those of legacy_groups_chunk (the same operations in the
// same order), so the outputs are the 256-bit path's bit for bit. An odd last group goes to legacy_groups_chunk.
// Chunks of 8 activation rows keep one vpdpbusd chain a row (8 independent chains already; the registers would not
// hold two a row), smaller ones two as the 256-bit kernel: the integer sums are exact either way.
inline __m512i two_blocks(const uint8_t* first, const uint8_t* second) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second)), 1);
}

inline __m512 two_halves(const uint8_t* first, const uint8_t* second) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(first))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(second)), 1));
}

template <class T, int kCount>
inline void legacy_pairs_chunk(const uint8_t* packed, int64_t g0, int64_t g1, const ActivationRows& x, int64_t m0,
                               float* y, int64_t num_rows) {
  constexpr bool kOffsetTerm = T::kOffset != 0, kSplit = kCount <= 4;
  const int64_t blocks = x.blocks, next = blocks * Packed<T>::kBytes;
  int64_t g = g0;
  for (; g + 2 <= g1; g += 2) {
    __m512 acc[kCount];
    #pragma GCC unroll 8
    for (int j = 0; j < kCount; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = packed + (g * blocks + b) * Packed<T>::kBytes;
      const __m512 scale = two_halves(block, block + next);
      __m512 bias = _mm512_setzero_ps();
      if constexpr (T::kBias >= 0) bias = two_halves(block + Packed<T>::kBiasAt, block + next + Packed<T>::kBiasAt);
      const uint8_t* codes = block + Packed<T>::kCodesAt;
      __m512i c[8];
      if constexpr (T::kNibbles) {
        const __m512i mask = _mm512_set1_epi8(15);
        #pragma GCC unroll 8
        for (int k = 0; k < 4; ++k) {
          const __m512i v = two_blocks(codes + 32 * k, codes + next + 32 * k);
          c[k] = _mm512_and_si512(v, mask);
          c[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        }
      } else {
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) c[k] = two_blocks(codes + 32 * k, codes + next + 32 * k);
      }
      if constexpr (Packed<T>::kHigh) {  // the two groups' words of a step: the byte mask of its 64 bytes
        const uint8_t* words = block + Packed<T>::kHighAt;
        #pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          uint32_t first, second;
          std::memcpy(&first, words + 4 * k, 4);
          std::memcpy(&second, words + next + 4 * k, 4);
          const __mmask64 bits = _cvtu64_mask64(first | static_cast<uint64_t>(second) << 32);
          c[k] = _mm512_mask_add_epi8(c[k], bits, c[k], _mm512_set1_epi8(16));
        }
      }
      __m512i low[kCount], high[kCount];
      #pragma GCC unroll 8
      for (int j = 0; j < kCount; ++j) low[j] = high[j] = _mm512_setzero_si512();
      #pragma GCC unroll 8
      for (int k = 0; k < 4; ++k) {
        #pragma GCC unroll 8
        for (int j = 0; j < kCount; ++j) {
          const int8_t* q = x.q + ((m0 + j) * blocks + b) * 32;
          int32_t first, second;
          std::memcpy(&first, q + 4 * k, 4);
          std::memcpy(&second, q + 16 + 4 * k, 4);
          low[j] = _mm512_dpbusd_epi32(low[j], c[k], _mm512_set1_epi32(first));
          if constexpr (kSplit) high[j] = _mm512_dpbusd_epi32(high[j], c[k + 4], _mm512_set1_epi32(second));
          else low[j] = _mm512_dpbusd_epi32(low[j], c[k + 4], _mm512_set1_epi32(second));
        }
      }
      #pragma GCC unroll 8
      for (int j = 0; j < kCount; ++j) {
        const int64_t a = (m0 + j) * blocks + b;
        __m512i sum = kSplit ? _mm512_add_epi32(low[j], high[j]) : low[j];
        if constexpr (kOffsetTerm) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(T::kOffset * x.sums[a]));
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, _mm512_set1_ps(x.d[a])), acc[j]);
        if constexpr (T::kBias >= 0) acc[j] = _mm512_fmadd_ps(bias, _mm512_set1_ps(x.s[a]), acc[j]);
      }
    }
    const int64_t n = g * kGroupRows, valid = std::min<int64_t>(2 * kGroupRows, num_rows - n);
    const __mmask16 lanes = static_cast<__mmask16>((1u << valid) - 1);
    #pragma GCC unroll 8
    for (int j = 0; j < kCount; ++j) _mm512_mask_storeu_ps(y + (m0 + j) * num_rows + n, lanes, acc[j]);
  }
  if (g < g1) legacy_groups_chunk<T, kCount>(packed, g, g1, x, m0, y, num_rows);
}

// legacy_groups on 512-bit vectors: the same passes (an even number of groups each), chunks of 8 rows first.
template <class T>
void legacy_pairs(const uint8_t* packed, int64_t g0, int64_t g1, const ActivationRows& x, float* y,
                  int64_t num_rows) {
  const int64_t group_bytes = x.blocks * Packed<T>::kBytes;
  const int64_t per_pass = x.rows > 4 ? std::max<int64_t>(2, kPassBytes / group_bytes / 2 * 2) : g1 - g0;
  for (int64_t ga = g0; ga < g1; ga += per_pass) {
    const int64_t gb = std::min(g1, ga + per_pass);
    int64_t m0 = 0;
    for (; m0 + 8 <= x.rows; m0 += 8) legacy_pairs_chunk<T, 8>(packed, ga, gb, x, m0, y, num_rows);
    for (; m0 + 4 <= x.rows; m0 += 4) legacy_pairs_chunk<T, 4>(packed, ga, gb, x, m0, y, num_rows);
    switch (x.rows - m0) {
      case 3: legacy_pairs_chunk<T, 3>(packed, ga, gb, x, m0, y, num_rows); break;
      case 2: legacy_pairs_chunk<T, 2>(packed, ga, gb, x, m0, y, num_rows); break;
      case 1: legacy_pairs_chunk<T, 1>(packed, ga, gb, x, m0, y, num_rows); break;
      default: break;
    }
  }
}
}  // namespace qdot::vnni
QDOT_TARGET_END
#endif  // QDOT_X86

#include "legacy_amx.h"

namespace qdot {

template <class T>
Tensor legacy_matmul(const Tensor& x, const Tensor& packed, int64_t out_features, Isa isa) {
  const int64_t in_features = x.size(1), groups = (out_features + kGroupRows - 1) / kGroupRows;
  TORCH_CHECK(in_features % 32 == 0 && packed.size(0) == groups &&
                  packed.size(1) == in_features / 32 * Packed<T>::kBytes,
              "packed weight [", packed.size(0), ", ", packed.size(1), "] does not hold out_features=", out_features,
              " rows of in_features=", in_features);
  const ActivationRows act = quantize_rows(x, 32);
  const uint8_t* data = packed.data_ptr<uint8_t>();
  Tensor out = run_rows(groups, kGroupRows * in_features, out_features, act.rows, x,
                        [&](int64_t g0, int64_t g1, float* y) {
#if QDOT_X86
    if (isa == kAmx) return legacy_amx<T>(data, g0, g1, act, y, out_features);
    if (isa == kAvx512) return vnni::legacy_pairs<T>(data, g0, g1, act, y, out_features);
    if (isa == kAvx512Vnni) return vnni::legacy_groups<T>(data, g0, g1, act, y, out_features);
    if (isa == kAvx2) return avx2::legacy_groups<T>(data, g0, g1, act, y, out_features);
#endif
    legacy_groups_scalar<T>(data, g0, g1, act, y, out_features);
  });
  return store_outputs(out, x);
}

// Rows [8 g0, min(8 g1, stop)) of the packed weight as float32 into `out` (row 8 g0 first) on the path `isa`.
template <class T>
void legacy_dequantize_groups(const uint8_t* packed, int64_t num_blocks, int64_t g0, int64_t g1, int64_t stop,
                              Isa isa, float* out) {
#if QDOT_X86
  if (isa != kScalar) return avx2_exact::legacy_dequantize_groups<T>(packed, num_blocks, g0, g1, stop, out);
#endif
  for (int64_t n = g0 * kGroupRows; n < std::min(g1 * kGroupRows, stop); ++n)
    legacy_dequantize_row<T>(packed, num_blocks, n, out + (n - g0 * kGroupRows) * num_blocks * 32);
}

// float32 rows [start, stop) of the packed weight (`start` a multiple of 8), for the large-M tiles.
template <class T>
Tensor legacy_dequantize_range(const Tensor& packed, int64_t start, int64_t stop, int64_t in_features, Isa isa) {
  const int64_t num_blocks = in_features / 32;
  Tensor out = at::empty({stop - start, in_features}, packed.options().dtype(at::kFloat));
  const uint8_t* data = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t g0 = start / kGroupRows, g1 = (stop + kGroupRows - 1) / kGroupRows;
  at::parallel_for(g0, g1, std::max<int64_t>(1, 2048 / in_features), [&](int64_t a, int64_t z) {
    legacy_dequantize_groups<T>(data, num_blocks, a, z, stop, isa, dst + (a * kGroupRows - start) * in_features);
  });
  return out;
}

template <class T>
Tensor legacy_dequantize(const Tensor& packed, const Tensor& rows, int64_t in_features) {
  TORCH_CHECK(in_features % 32 == 0 && packed.size(1) == in_features / 32 * Packed<T>::kBytes,
              "packed weight rows of ", packed.size(1), " bytes do not hold in_features=", in_features);
  const Tensor index = rows.to(at::kLong).contiguous();
  const int64_t count = index.numel(), limit = packed.size(0) * kGroupRows;
  Tensor out = at::empty({count, in_features}, packed.options().dtype(at::kFloat));
  const int64_t* ids = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < limit, "row ", ids[i], " out of range");
  const uint8_t* data = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, count, std::max<int64_t>(1, 16384 / in_features), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) legacy_dequantize_row<T>(data, in_features / 32, ids[i], dst + i * in_features);
  });
  return out;
}

}  // namespace qdot
