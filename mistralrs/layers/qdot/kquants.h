// The K-quant block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 weights) against Q8_K-style
// activation blocks (256 int8 codes, a float32 scale, and the sum of the codes of each group of 16).
//
// Every K-quant super-block decodes to unsigned codes u (0..63) and, per group g of 16 weights, integer scales
// sc_g and mn_g with two float factors d and dmin such that each weight is d * sc_g * u - dmin * mn_g:
//   Q2_K  d * sc * u - dmin * m        u in 0..3, sc and m 4-bit, one pair per 16 weights
//   Q3_K  d * (sc - 32) * (u - 4)      u in 0..7; sc_g = sc - 32, mn_g = 4 sc_g, dmin = d
//   Q4_K  d * sc * u - dmin * m        u in 0..15, sc and m 6-bit, one pair per 32 weights (two equal groups)
//   Q5_K  d * sc * u - dmin * m        u in 0..31, as Q4_K
//   Q6_K  d * sc * (u - 32)            u in 0..63, sc int8; mn_g = 32 sc_g, dmin = d
// (byte layouts: mistralrs/quant/kquant_types.py). With an activation block x_i ~ da * a_i (B_g the sum of a over
// group g), a super-block's dot product is
//   da * (d * sum_g sc_g * sum_{i in g} u_i a_i  -  dmin * sum_g mn_g B_g),
// both sums exact in int32: |u a| <= 63 * 127, so pmaddubsw's pair sums stay below 2^15, and pmaddwd /
// vpdpwssd multiply them by the int16 scales. The SIMD paths accumulate those two integers, scaled, in float32
// vectors across the row's blocks; the scalar path in one float32 per output (same integers, another order).
// Path kAvx512 from kWideKquantRows activation rows on: two weight rows in the halves of 512-bit vectors, each half
// the 256-bit VNNI kernel's operations in its order, so its outputs are kAvx512Vnni's bit for bit.
//
// Activation codes: a_i = round_half_even(x_i / da) with da = max|x| / 127 over the 256 values (the float32
// operations of the legacy blocks' quantizer, qdot.h), so each activation is off by at most da / 2.
//
// The weight is kept as the file's blocks (`pack` returns them unchanged). `kquant_dequantize_rows` gives gguf's
// float32 values bit for bit (scale * code + bias with scale = d * sc, bias = -(dmin * mn), two roundings as
// mistralrs/quant/block_types.py AffineBlocks), for the large-M tiles of qdot.h and for embedding lookups.
#pragma once

#include <type_traits>

namespace qdot {

// GGML type numbers of the K-quant types (ggml.h `enum ggml_type`).
enum KQuantType : int64_t { kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

constexpr int64_t kSuperBlock = 256;  // weights per super-block, values per activation block

inline bool is_kquant(int64_t type) { return type >= kQ2_K && type <= kQ6_K; }

// `f(std::integral_constant<int64_t, T>{})` for the K-quant type `type` as the compile-time T (kQ6_K for any
// other value): the one place a run-time type picks a kernel's template instance.
template <class F>
inline decltype(auto) with_kquant_type(int64_t type, F&& f) {
  switch (type) {
    case kQ2_K: return f(std::integral_constant<int64_t, kQ2_K>{});
    case kQ3_K: return f(std::integral_constant<int64_t, kQ3_K>{});
    case kQ4_K: return f(std::integral_constant<int64_t, kQ4_K>{});
    case kQ5_K: return f(std::integral_constant<int64_t, kQ5_K>{});
    default: return f(std::integral_constant<int64_t, kQ6_K>{});
  }
}

// Bytes of one super-block of `type`.
inline int64_t kquant_bytes(int64_t type) {
  switch (type) {
    case kQ2_K: return 84;
    case kQ3_K: return 110;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    default: return 210;
  }
}

// The code offset of the plain decoding (code = u - offset) and whether it has a bias per group.
inline int64_t kquant_offset(int64_t type) { return type == kQ3_K ? 4 : type == kQ6_K ? 32 : 0; }
inline bool kquant_has_bias(int64_t type) { return type == kQ2_K || type == kQ4_K || type == kQ5_K; }

// One activation block (the layout of ggml's block_q8_K).
struct BlockQ8K {
  float d;               // da: the value of code 1
  int8_t qs[kSuperBlock];  // codes, -127..127
  int16_t bsums[16];     // the sum of the codes of each group of 16
};

// Quantizes `k` floats (k a multiple of 256) to k / 256 activation blocks.
inline void quantize_q8k_scalar(const float* x, int64_t k, BlockQ8K* out) {
  for (int64_t b = 0; b < k / kSuperBlock; ++b, x += kSuperBlock) {
    BlockQ8K& block = out[b];
    float amax = 0.f;
    for (int64_t i = 0; i < kSuperBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.f;
    const float inverse = scale != 0.f ? 1.f / scale : 0.f;
    block.d = scale;
    for (int64_t g = 0; g < 16; ++g) {
      int32_t sum = 0;
      for (int64_t i = 16 * g; i < 16 * g + 16; ++i) {
        const int32_t code = static_cast<int32_t>(std::nearbyint(x[i] * inverse));
        block.qs[i] = static_cast<int8_t>(code);
        sum += code;
      }
      block.bsums[g] = static_cast<int16_t>(sum);
    }
  }
}

// One super-block decoded (see the file comment).
struct KDecoded {
  uint8_t u[kSuperBlock];
  int16_t sc[16];
  int16_t mn[16];
  float d, dmin;
};

// The scales, mins and factors of a super-block (portable; the SIMD paths have their own, tested equal).
inline void kquant_scales(int64_t type, const uint8_t* block, KDecoded& out) {
  switch (type) {
    case kQ2_K:
      for (int g = 0; g < 16; ++g) {
        out.sc[g] = block[g] & 0x0F;
        out.mn[g] = block[g] >> 4;
      }
      out.d = half_to_float(block + 80);
      out.dmin = half_to_float(block + 82);
      return;
    case kQ3_K: {
      const uint8_t* s = block + 96;
      for (int g = 0; g < 16; ++g) {
        const int low = g < 8 ? (s[g] & 0x0F) : (s[g - 8] >> 4);
        const int high = (s[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
        out.sc[g] = static_cast<int16_t>((low | (high << 4)) - 32);
        out.mn[g] = static_cast<int16_t>(4 * out.sc[g]);
      }
      out.d = out.dmin = half_to_float(block + 108);
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const uint8_t* s = block + 4;
      for (int j = 0; j < 8; ++j) {  // 6-bit (scale, min) of sub-block j of 32
        const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        out.sc[2 * j] = out.sc[2 * j + 1] = static_cast<int16_t>(sc);
        out.mn[2 * j] = out.mn[2 * j + 1] = static_cast<int16_t>(m);
      }
      out.d = half_to_float(block);
      out.dmin = half_to_float(block + 2);
      return;
    }
    default: {  // Q6_K
      const int8_t* s = reinterpret_cast<const int8_t*>(block + 192);
      for (int g = 0; g < 16; ++g) {
        out.sc[g] = s[g];
        out.mn[g] = static_cast<int16_t>(32 * s[g]);
      }
      out.d = out.dmin = half_to_float(block + 208);
      return;
    }
  }
}

// The codes of a super-block, weight i in u[i].
inline void kquant_codes(int64_t type, const uint8_t* block, KDecoded& out) {
  uint8_t* u = out.u;
  switch (type) {
    case kQ2_K:  // byte 32 h + l holds weights 128 h + 32 k + l in bits 2 k, 2 k + 1
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 32; ++l) u[128 * h + 32 * k + l] = (block[16 + 32 * h + l] >> (2 * k)) & 3;
      return;
    case kQ3_K:  // the same 2-bit layout, plus bit 4 h + k of mask byte l as the third bit
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 32; ++l) {
            const int low = (block[32 + 32 * h + l] >> (2 * k)) & 3;
            const int high = (block[l] >> (4 * h + k)) & 1;
            u[128 * h + 32 * k + l] = static_cast<uint8_t>(low | (high << 2));
          }
      return;
    case kQ4_K:
    case kQ5_K: {  // byte 32 c + l: weight 64 c + l low, 64 c + 32 + l high; Q5_K: bit i of byte l is bit 4 of 32 i + l
      const uint8_t* qs = block + (type == kQ4_K ? 16 : 48);
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
          u[64 * c + l] = qs[32 * c + l] & 0x0F;
          u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
      if (type == kQ5_K)
        for (int i = 0; i < 8; ++i)
          for (int l = 0; l < 32; ++l) u[32 * i + l] |= ((block[16 + l] >> i) & 1) << 4;
      return;
    }
    default:  // Q6_K: low nibbles as Q4_K per 128 weights, high 2 bits as Q2_K's codes
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
      return;
  }
}

// Output rows [n0, n1) against every activation row (y [M, num_rows]), portable.
inline void kquant_rows_scalar(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                               const BlockQ8K* act, int64_t rows, int64_t blocks, float* y, int64_t num_rows) {
  const int64_t bytes = kquant_bytes(type);
  KDecoded block;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < rows; ++m) y[m * num_rows + n] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* data = w + n * row_bytes + b * bytes;
      kquant_scales(type, data, block);
      kquant_codes(type, data, block);
      for (int64_t m = 0; m < rows; ++m) {
        const BlockQ8K& a = act[m * blocks + b];
        int32_t isum = 0, msum = 0;
        for (int g = 0; g < 16; ++g) {
          int32_t s = 0;
          for (int i = 16 * g; i < 16 * g + 16; ++i) s += static_cast<int32_t>(block.u[i]) * a.qs[i];
          isum += block.sc[g] * s;
          msum += block.mn[g] * a.bsums[g];
        }
        y[m * num_rows + n] += a.d * (block.d * static_cast<float>(isum) - block.dmin * static_cast<float>(msum));
      }
    }
  }
}

// A float32 product or sum kept from being fused with the next operation into a multiply-add: the dequantized
// weights must round as the plain path's separate `scale * code` and `+ bias` do.
template <class V>
inline V kept(V value) {
#if defined(__GNUC__) || defined(__clang__)
  asm("" : "+m"(value));
#endif
  return value;
}

// Dequantizes `count` super-blocks (consecutive in memory) to float32 values (scale * code + bias, with
// scale = d * sc and bias = -(dmin * mn): AffineBlocks.dequantize's operations), portable.
inline void kquant_dequantize_scalar(int64_t type, const uint8_t* w, int64_t count, float* out) {
  const int64_t bytes = kquant_bytes(type), offset = kquant_offset(type);
  const bool has_bias = kquant_has_bias(type);
  KDecoded block;
  for (int64_t b = 0; b < count; ++b, out += kSuperBlock) {
    kquant_scales(type, w + b * bytes, block);
    kquant_codes(type, w + b * bytes, block);
    for (int g = 0; g < 16; ++g) {
      const float scale = block.d * static_cast<float>(block.sc[g]);
      const float bias = -(block.dmin * static_cast<float>(block.mn[g]));
      for (int i = 16 * g; i < 16 * g + 16; ++i) {
        const float value = kept(scale * static_cast<float>(block.u[i] - offset));
        out[i] = has_bias ? value + bias : value;
      }
    }
  }
}

}  // namespace qdot

#if QDOT_X86
QDOT_TARGET_BEGIN("avx2,fma,f16c")
namespace qdot::avx2 {
#define KQUANT_VNNI 0
#include "kquants_simd.inc"
#undef KQUANT_VNNI
}  // namespace qdot::avx2
QDOT_TARGET_END

QDOT_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace qdot::vnni {
#define KQUANT_VNNI 1
#include "kquants_simd.inc"
#undef KQUANT_VNNI
}  // namespace qdot::vnni
QDOT_TARGET_END
#endif  // QDOT_X86

namespace qdot {

// Activation rows [M, K] as Q8_K blocks [M, K / 256], quantized in parallel.
inline Tensor kquant_quantize_rows(const Tensor& x, Isa isa) {
  Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0), cols = xf.size(1), blocks = cols / kSuperBlock;
  Tensor storage = at::empty({rows * blocks * static_cast<int64_t>(sizeof(BlockQ8K))}, xf.options().dtype(at::kByte));
  auto* out = reinterpret_cast<BlockQ8K*>(storage.data_ptr<uint8_t>());
  const float* src = xf.data_ptr<float>();
  at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
    const int64_t count = end - begin;
#if QDOT_X86
    if (isa >= kAvx512Vnni) return vnni::quantize_q8k(src + begin * kSuperBlock, count * kSuperBlock, out + begin);
    if (isa == kAvx2) return avx2::quantize_q8k(src + begin * kSuperBlock, count * kSuperBlock, out + begin);
#endif
    quantize_q8k_scalar(src + begin * kSuperBlock, count * kSuperBlock, out + begin);
  });
  return storage;
}

inline void check_kquant_weight(int64_t in_features, const Tensor& w, int64_t type) {
  TORCH_CHECK(in_features % kSuperBlock == 0, "in_features=", in_features, " is not a multiple of ", kSuperBlock,
              " (GGML type ", type, ")");
  TORCH_CHECK(w.size(1) == in_features / kSuperBlock * kquant_bytes(type), "weight rows of ", w.size(1),
              " bytes do not hold in_features=", in_features, " weights of ", kquant_bytes(type), "-byte blocks");
}

// float32 values of `count` consecutive super-blocks starting at `blocks`, on the path `isa`.
inline void kquant_dequantize_blocks(int64_t type, const uint8_t* blocks, int64_t count, float* out, Isa isa) {
#if QDOT_X86
  if (isa >= kAvx512Vnni) return vnni::kquant_dequantize(type, blocks, count, out);
  if (isa == kAvx2) return avx2::kquant_dequantize(type, blocks, count, out);
#endif
  kquant_dequantize_scalar(type, blocks, count, out);
}

// float32 rows [start, stop) of K-quant blocks [N, row bytes], gguf's values bit for bit (every path).
inline Tensor kquant_dequantize_rows(const Tensor& w, int64_t type, int64_t start, int64_t stop, int64_t in_features,
                                     Isa isa) {
  check_kquant_weight(in_features, w, type);
  TORCH_CHECK(0 <= start && start <= stop && stop <= w.size(0), "rows [", start, ", ", stop, ") out of range");
  const int64_t blocks_per_row = in_features / kSuperBlock;
  Tensor out = at::empty({stop - start, in_features}, w.options().dtype(at::kFloat));
  const uint8_t* src = w.data_ptr<uint8_t>() + start * w.size(1);  // rows are whole blocks, back to back
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, (stop - start) * blocks_per_row, 64, [&](int64_t begin, int64_t end) {
    kquant_dequantize_blocks(type, src + begin * kquant_bytes(type), end - begin, dst + begin * kSuperBlock, isa);
  });
  return out;
}

// float32 rows `rows` (int64 ids, any order) of K-quant blocks [N, row bytes]: an embedding lookup.
inline Tensor kquant_dequantize_ids(const Tensor& w, int64_t type, const Tensor& rows, int64_t in_features) {
  check_kquant_weight(in_features, w, type);
  Tensor ids = rows.to(at::kLong).contiguous();
  const int64_t count = ids.numel(), blocks_per_row = in_features / kSuperBlock;
  Tensor out = at::empty({count, in_features}, w.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(0 <= id[i] && id[i] < w.size(0), "row ", id[i], " out of range for ", w.size(0), " rows");
  const Isa isa = best_isa();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      kquant_dequantize_blocks(type, w.data_ptr<uint8_t>() + id[i] * w.size(1), blocks_per_row,
                               out.data_ptr<float>() + i * in_features, isa);
  });
  return out;
}

// From this many activation rows on, the kAvx512 path takes the 512-bit kernel (vnni::kquant_rows_wide); below, where
// decoding two rows and joining their halves costs more than the wider products save, the 256-bit one.
constexpr int64_t kWideKquantRows = 3;

// y [M, out_features] = x [M, K] @ W^T for K-quant blocks W [out_features, row bytes], with the integer kernels
// (qdot.h `matmul` sends large M to its dequantized tiles before this).
inline Tensor kquant_matmul(const Tensor& x, const Tensor& w, int64_t type, Isa isa) {
  check_kquant_weight(x.size(1), w, type);
  const int64_t num_rows = w.size(0), in_features = x.size(1), rows = x.size(0);
  const Tensor storage = kquant_quantize_rows(x, isa);
  const auto* act = reinterpret_cast<const BlockQ8K*>(storage.data_ptr<uint8_t>());
  const uint8_t* blocks = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), blocks_per_row = in_features / kSuperBlock;
  Tensor out = run_rows(num_rows, in_features, num_rows, rows, x, [&](int64_t n0, int64_t n1, float* y) {
#if QDOT_X86
    if (isa >= kAvx512 && rows >= kWideKquantRows)
      return vnni::kquant_rows_wide(type, blocks, row_bytes, n0, n1, act, rows, blocks_per_row, y, num_rows);
    if (isa >= kAvx512Vnni)
      return vnni::kquant_rows(type, blocks, row_bytes, n0, n1, act, rows, blocks_per_row, y, num_rows);
    if (isa == kAvx2)
      return avx2::kquant_rows(type, blocks, row_bytes, n0, n1, act, rows, blocks_per_row, y, num_rows);
#endif
    kquant_rows_scalar(type, blocks, row_bytes, n0, n1, act, rows, blocks_per_row, y, num_rows);
  });
  return store_outputs(out, x);
}

// What the `isa` path decodes from super-blocks [n, type bytes]: (codes u uint8 [n, 256], sc int16 [n, 16],
// mn int16 [n, 16], d float32 [n], dmin float32 [n]). For the bit-level tests.
inline std::vector<Tensor> kquant_unpack(const Tensor& blocks, int64_t type, Isa isa) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) == kquant_bytes(type),
              "blocks must be uint8 [n, ", kquant_bytes(type), "]");
  Tensor data = blocks.contiguous();
  const int64_t n = data.size(0);
  const auto options = data.options();
  std::vector<Tensor> out = {at::empty({n, kSuperBlock}, options), at::empty({n, 16}, options.dtype(at::kShort)),
                             at::empty({n, 16}, options.dtype(at::kShort)), at::empty({n}, options.dtype(at::kFloat)),
                             at::empty({n}, options.dtype(at::kFloat))};
  for (int64_t b = 0; b < n; ++b) {
    const uint8_t* block = data.data_ptr<uint8_t>() + b * kquant_bytes(type);
    KDecoded decoded;
#if QDOT_X86
    if (isa >= kAvx512Vnni) vnni::kquant_unpack_block(type, block, decoded);
    else if (isa == kAvx2) avx2::kquant_unpack_block(type, block, decoded);
    else
#endif
    {
      kquant_scales(type, block, decoded);
      kquant_codes(type, block, decoded);
    }
    std::memcpy(out[0].data_ptr<uint8_t>() + b * kSuperBlock, decoded.u, kSuperBlock);
    std::memcpy(out[1].data_ptr<int16_t>() + b * 16, decoded.sc, 32);
    std::memcpy(out[2].data_ptr<int16_t>() + b * 16, decoded.mn, 32);
    out[3].data_ptr<float>()[b] = decoded.d;
    out[4].data_ptr<float>()[b] = decoded.dmin;
  }
  return out;
}

// The activation quantization of the K-quant kernels: (int8 codes [M, K], float32 da [M, K / 256],
// int16 group sums [M, K / 16]).
inline std::vector<Tensor> kquant_quantize_activations(const Tensor& x, Isa isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kSuperBlock == 0, "activations must be [rows, in_features] with "
              "in_features a multiple of ", kSuperBlock);
  const int64_t rows = x.size(0), cols = x.size(1), blocks = rows * cols / kSuperBlock;
  const Tensor storage = kquant_quantize_rows(x, isa);
  const auto* act = reinterpret_cast<const BlockQ8K*>(storage.data_ptr<uint8_t>());
  Tensor codes = at::empty({rows, cols}, x.options().dtype(at::kChar));
  Tensor scales = at::empty({rows, cols / kSuperBlock}, x.options().dtype(at::kFloat));
  Tensor sums = at::empty({rows, cols / 16}, x.options().dtype(at::kShort));
  for (int64_t b = 0; b < blocks; ++b) {
    std::memcpy(codes.data_ptr<int8_t>() + b * kSuperBlock, act[b].qs, kSuperBlock);
    scales.data_ptr<float>()[b] = act[b].d;
    std::memcpy(sums.data_ptr<int16_t>() + b * 16, act[b].bsums, 32);
  }
  return {codes, scales, sums};
}

}  // namespace qdot
