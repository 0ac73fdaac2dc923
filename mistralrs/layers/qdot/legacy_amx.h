// The Q8_0 kernel on AMX tiles (Isa kAmx), included by legacy.h after the 512-bit kernel (qdot::vnni), whose float
// work it repeats operation for operation: only the integer dot products move to the tiles.
//
// A group's block of legacy.h's packed layout is nearly an AMX "B" tile: 8 steps of 32 bytes, step k holding codes
// 4k..4k+3 of the group's 8 rows (K = 32 codes, N = 8 columns of 4 bytes). Two groups g, g + 1 are taken at a time
// and their block b copied into one B tile of 8 steps x 64 bytes (group g's step, then group g + 1's: N = 16, the
// 512-bit vector legacy_pairs_chunk multiplies), each code turned back into the signed weight w = u - 128 on the
// way (xor 0x80). The activation rows' 32 int8 codes of block b are the "A" tile (M rows, one row of x.q each:
// stride K bytes), and one TDPBSSD gives the M x 16 exact sums sum_i w_i q_i = sum_i u_i q_i - 128 sum_i q_i in a
// "C" tile of int32: for each activation row, the 16 integers of legacy_pairs_chunk's vector after its offset
// term. The C tile is stored to memory ([M][16] int32) and the scales and the float accumulation are then
// legacy_pairs_chunk's, in its order: the outputs are the 512-bit (and the 256-bit VNNI) path's bit for bit.
//
// Per pair of groups and block: one A load, a 512-byte copy, one B load, one TDPBSSD, one C store, and the float
// work. The copy and the C store are the costly parts (measured: docs/benchmarks.md, issue 20); the loop is
// skewed so that none of them waits on its producer: block b + 2's copy, block b + 1's TDP and block b's C store are
// issued before block b's float work (two C tiles and three copy buffers in turn), and the packed stream is
// prefetched kAhead bytes ahead.
//
// A tile holds at most 16 rows: 4..16 activation rows take this kernel on large weights (the dispatch `legacy_amx`);
// fewer rows, more than 16, small weights, the other types and an odd last group take the 512-bit kernel. Linux
// hands the tile state to a process that asks for it (qdot.h `amx_permitted`, once, from isa_supported); each call
// loads its tile configuration (LDTILECFG) on its own thread and releases the tiles (TILERELEASE) when done.
#pragma once

#if QDOT_X86
QDOT_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-int8")
namespace qdot::amx {

// Tiles: 0 the activations (A: M rows of 32 codes), 1 the codes of groups g and g + 1 side by side (B: 8 steps of
// 64 bytes, 16 columns), 2 and 3 their sums for even and odd blocks (C: M rows of 16 int32).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes[16] = {};  // bytes a row
  uint8_t rows[16] = {};
};

inline void load_tiles(int64_t count) {
  TileConfig config;
  config.bytes[0] = 32;
  config.rows[0] = static_cast<uint8_t>(count);
  config.bytes[1] = 64;
  config.rows[1] = 8;
  for (int t = 2; t <= 3; ++t) {
    config.bytes[t] = 64;
    config.rows[t] = static_cast<uint8_t>(count);
  }
  asm volatile("" ::: "memory");
  _tile_loadconfig(&config);
}

// Block b's codes of groups g and g + 1 (`block`: group g's block b, `next` bytes to group g + 1's) as one B tile of
// signed weights in `codes` (step k: group g's 32 bytes, then group g + 1's), and a compiler barrier: the tile load
// that reads them is an asm statement that names no memory.
template <class T>
inline void pair_codes(const uint8_t* block, int64_t next, uint8_t* codes) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  #pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    _mm512_store_si512(codes + 64 * k, _mm512_xor_si512(vnni::two_blocks(block + Packed<T>::kCodesAt + 32 * k,
                                                                         block + next + Packed<T>::kCodesAt + 32 * k),
                                                        sign));
  asm volatile("" ::: "memory");
}

// The products of a block's activation codes (`q`: M rows `stride` bytes apart) with its pair of groups' weights
// (`codes`, from pair_codes) into C tile 2 (kOdd: 3). The tile numbers are spelled out: the instructions take
// them literally.
template <bool kOdd>
inline void tile_products(const uint8_t* codes, const int8_t* q, int64_t stride) {
  _tile_loadd(0, q, stride);
  _tile_loadd(1, codes, 64);
  if constexpr (kOdd) {
    _tile_zero(3);
    _tile_dpbssd(3, 0, 1);
  } else {
    _tile_zero(2);
    _tile_dpbssd(2, 0, 1);
  }
}

// C tile 2 (kOdd: 3) as [M][16] int32 into `sums`.
template <bool kOdd>
inline void store_sums(int32_t* sums) {
  if constexpr (kOdd) _tile_stored(3, sums, 64);
  else _tile_stored(2, sums, 64);
}

// legacy_pairs_chunk's float work for one block (8-bit codes: no bias term), from the integer sums of its kCount
// rows, offset term included.
template <class T, int kCount>
inline void accumulate(const int32_t* sums, const uint8_t* block, int64_t next, const ActivationRows& x, int64_t b,
                       __m512* acc) {
  const __m512 scale = vnni::two_halves(block, block + next);
  #pragma GCC unroll 16
  for (int j = 0; j < kCount; ++j) {
    const int64_t a = j * x.blocks + b;
    const __m512i sum = _mm512_load_si512(sums + 16 * j);
    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, _mm512_set1_ps(x.d[a])), acc[j]);
  }
}

// How far ahead in each group's stream the packed blocks are prefetched (measured: 1-4 KB do alike, none is slower).
constexpr int64_t kAhead = 2048;

// Output rows [8 g0, 8 g1) against the kCount = x.rows <= 16 activation rows.
template <class T, int kCount>
void legacy_tiles(const uint8_t* packed, int64_t g0, int64_t g1, const ActivationRows& x, float* y,
                  int64_t num_rows) {
  static_assert(T::kBias < 0 && !T::kNibbles, "the tiles read 8-bit codes and add no bias term");
  const int64_t blocks = x.blocks, next = blocks * Packed<T>::kBytes;
  alignas(64) int32_t sums[2][kCount * 16];
  alignas(64) uint8_t codes[3][8 * 64];
  load_tiles(kCount);
  int64_t g = g0;
  for (; g + 2 <= g1; g += 2) {
    const uint8_t* group = packed + g * next;
    __m512 acc[kCount];
    #pragma GCC unroll 16
    for (int j = 0; j < kCount; ++j) acc[j] = _mm512_setzero_ps();
    pair_codes<T>(group, next, codes[0]);
    if (blocks > 1) pair_codes<T>(group + Packed<T>::kBytes, next, codes[1]);
    tile_products<false>(codes[0], x.q, x.cols);
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = group + b * Packed<T>::kBytes;
      #pragma GCC unroll 8
      for (int64_t o = 0; o < Packed<T>::kBytes; o += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(block + kAhead + o), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(block + next + kAhead + o), _MM_HINT_T0);
      }
      const bool odd = b % 2;
      if (b + 2 < blocks) pair_codes<T>(block + 2 * Packed<T>::kBytes, next, codes[(b + 2) % 3]);
      if (b + 1 < blocks) {
        if (odd) tile_products<false>(codes[(b + 1) % 3], x.q + 32 * (b + 1), x.cols);
        else tile_products<true>(codes[(b + 1) % 3], x.q + 32 * (b + 1), x.cols);
      }
      if (odd) store_sums<true>(sums[1]);
      else store_sums<false>(sums[0]);
      if (b > 0) accumulate<T, kCount>(sums[!odd], block - Packed<T>::kBytes, next, x, b - 1, acc);
    }
    accumulate<T, kCount>(sums[(blocks - 1) % 2], group + (blocks - 1) * Packed<T>::kBytes, next, x, blocks - 1, acc);
    const int64_t n = g * kGroupRows, valid = std::min<int64_t>(2 * kGroupRows, num_rows - n);
    const __mmask16 lanes = static_cast<__mmask16>((1u << valid) - 1);
    #pragma GCC unroll 16
    for (int j = 0; j < kCount; ++j) _mm512_mask_storeu_ps(y + j * num_rows + n, lanes, acc[j]);
  }
  _tile_release();
  if (g < g1) vnni::legacy_groups_chunk<T, kCount>(packed, g, g1, x, 0, y, num_rows);
}

}  // namespace qdot::amx
QDOT_TARGET_END

namespace qdot {

// The tiles take Q8_0 from kAmxRows activation rows on (to 16) and ranges of at least kAmxGroups groups of 8
// output rows (a thread's share of the weight). Measured on the 2-core Xeon (docs/benchmarks.md, issue 20): at 2-4
// rows the two kernels are even (the packed stream's speed), from 6 rows on the tiles are ahead; a call on tiles
// costs about 2 us more (the tile configuration and release on each thread), more than a 256-row weight gains.
constexpr int64_t kAmxRows = 4, kAmxGroups = 64;

// legacy_matmul's row range under kAmx: the tiles where they pay (above), the 512-bit kernel otherwise.
template <class T>
void legacy_amx(const uint8_t* packed, int64_t g0, int64_t g1, const ActivationRows& x, float* y, int64_t num_rows) {
  if constexpr (std::is_same_v<T, Q8_0>) {
    switch (x.rows < kAmxRows || g1 - g0 < kAmxGroups ? 0 : x.rows) {
      case 4: return amx::legacy_tiles<T, 4>(packed, g0, g1, x, y, num_rows);
      case 5: return amx::legacy_tiles<T, 5>(packed, g0, g1, x, y, num_rows);
      case 6: return amx::legacy_tiles<T, 6>(packed, g0, g1, x, y, num_rows);
      case 7: return amx::legacy_tiles<T, 7>(packed, g0, g1, x, y, num_rows);
      case 8: return amx::legacy_tiles<T, 8>(packed, g0, g1, x, y, num_rows);
      case 9: return amx::legacy_tiles<T, 9>(packed, g0, g1, x, y, num_rows);
      case 10: return amx::legacy_tiles<T, 10>(packed, g0, g1, x, y, num_rows);
      case 11: return amx::legacy_tiles<T, 11>(packed, g0, g1, x, y, num_rows);
      case 12: return amx::legacy_tiles<T, 12>(packed, g0, g1, x, y, num_rows);
      case 13: return amx::legacy_tiles<T, 13>(packed, g0, g1, x, y, num_rows);
      case 14: return amx::legacy_tiles<T, 14>(packed, g0, g1, x, y, num_rows);
      case 15: return amx::legacy_tiles<T, 15>(packed, g0, g1, x, y, num_rows);
      case 16: return amx::legacy_tiles<T, 16>(packed, g0, g1, x, y, num_rows);
      default: break;
    }
  }
  vnni::legacy_pairs<T>(packed, g0, g1, x, y, num_rows);
}

}  // namespace qdot
#endif  // QDOT_X86
