// The fused product of few input rows: the weight decoded in registers, float32 sums.

#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"

namespace {

// Inputs converted to float32 and split into even and odd elements of each row, so that the
// high and low nibbles of a packed byte meet their inputs without shuffles.
struct Inputs {
  std::vector<float, CacheLineAllocator<float>> even, odd;
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> even16, odd16;  // bfloat16 inputs, kept as they are
  std::vector<float, CacheLineAllocator<float>> grouped;  // AVX2's 16-bit products: rows of K (grouped_position)
  int64_t half;  // K / 2
  int64_t stride = 0;  // elements from one input row to the next in the filled vectors (padded_row)
  int64_t ahead = 0;  // how far past the packed bytes being read the kernels prefetch (prefetch_block)
  bool prefetch_l2 = false;  // the bfloat16 kernels prefetch into L2 only (fourbit_linear says why)
};

// Elements a row of `elements` takes in Inputs' vectors: an odd number of whole cache lines, so
// that the rows a pass reads at one column lie in as many different sets of a 64-set L1 (rows a
// multiple of 4 KiB apart share one set: eight bfloat16 rows of K 4096, each in the even and the
// odd vector, are 16 lines for 8 ways, and a Zen 4 core's 8-row product ran 1.6x slower in the
// processes whose two vectors started at the same offset in a page).
inline int64_t padded_row(int64_t elements, int64_t element_bytes) {
  const int64_t per_line = 64 / element_bytes, lines = (elements + per_line - 1) / per_line;
  return (lines | 1) * per_line;
}

// The most bfloat16 input rows whose products prefetch the weight into L2 only (Inputs::prefetch_l2).
constexpr int64_t PREFETCH_L2_MAX_ROWS = 2;

// f(std::integral_constant<int, rows>{}, m0) over input rows [m0, m): passes of four rows, then
// the rest, so that kernels take the rows of a pass as a template argument.
template <typename F>
void passes_of_four(int64_t m0, int64_t m, F&& f) {
  for (; m0 + 4 <= m; m0 += 4) f(std::integral_constant<int, 4>{}, m0);
  switch (m - m0) {
    case 3: f(std::integral_constant<int, 3>{}, m0); break;
    case 2: f(std::integral_constant<int, 2>{}, m0); break;
    case 1: f(std::integral_constant<int, 1>{}, m0); break;
    default: break;
  }
}

// The dot products of weight row n with rows [m0, m0 + rows) of the inputs (K a multiple of the
// blocksize, the blocksize a multiple of 32).
template <int ROWS>
void dot_rows_portable(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m0, float* sums,
                       int32_t dtype) {
  float acc[ROWS] = {};
  const int64_t blocks = k / w.blocksize, first = n * blocks;
  float scaled[16], scales[MAX_RUN];
  block_scales(w, first, blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    const float s = scales[b];
    for (int j = 0; j < 16; ++j) scaled[j] = round_to(w.table[j] * s, dtype);
    const uint8_t* bytes = w.packed + (first + b) * w.blocksize / 2;
    const int64_t base = b * w.blocksize / 2;
    prefetch_block(bytes, w.blocksize / 2, b, x.ahead);
    for (int64_t j = 0; j < w.blocksize / 2; ++j) {
      const float hi = scaled[bytes[j] >> 4], lo = scaled[bytes[j] & 15];
      for (int r = 0; r < ROWS; ++r) {
        const int64_t i = (m0 + r) * x.stride + base + j;
        acc[r] += hi * x.even[i] + lo * x.odd[i];
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = acc[r];
}

#if FOURBIT_X86
// A block's scaled table (the table times `scale`) rounded to `dtype` and widened again (NaN
// kept). Only a scale that is not finite makes NaN entries (infinity times the table's zero), so
// finite scales skip that check: 4% of a bfloat16 row on Zen 4 (AVX-512 without its BF16
// instructions).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 scaled_table_avx512(__m512 table,
                                                                                               float scale,
                                                                                               int32_t dtype) {
  const __m512 v = _mm512_mul_ps(table, _mm512_set1_ps(scale));
  if (dtype == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (dtype != BF16) return v;
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  if (std::isfinite(scale)) return _mm512_castsi512_ps(r);
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

// float32 sums with AVX-512 (float32 and float16 inputs, bfloat16 without AVX512-BF16): WEIGHTS
// weight rows (1-4) against ROWS input rows (1-4). A group of 16 packed bytes is 32 weights a row;
// high nibbles meet the even inputs, low nibbles the odd ones (vpermps reads only the low four
// bits of each index, so the low nibble needs no mask). Each (weight, input) row pair has one sum,
// the high nibbles' product then the low ones' each group, the same whatever rows share the pass:
// a row's bits depend on neither its batch nor the weight rows beside it. Four weight rows a pass
// read each input once for four, where one weight row and eight input rows read 2 KB of inputs
// from L2 per block (27 ns a block on a Zen 4 core); at one input row, four sums are in flight.
template <int ROWS, int WEIGHTS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dot_rows_avx512(const Weight& w, int64_t n,
                                                                                    int64_t k, const Inputs& x,
                                                                                    int64_t m0, float* sums, int64_t m,
                                                                                    int32_t dtype) {
  const __m512 table = _mm512_loadu_ps(w.table);
  __m512 acc[WEIGHTS][ROWS];
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 32, stride = x.stride;
  const int64_t step = w.blocksize / 2, row_bytes = k / 2;
  const uint8_t* bytes = w.packed + first * step;
  const float* even = x.even.data() + m0 * stride;
  const float* odd = x.odd.data() + m0 * stride;
  float scales[WEIGHTS * MAX_RUN];  // one call for the pass's rows, which are contiguous
  block_scales_avx512(w, first, WEIGHTS * blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 scaled[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      scaled[i] = scaled_table_avx512(table, scales[i * blocks + b], dtype);
      prefetch_block(bytes + i * row_bytes, step, b, x.ahead);
    }
    for (int64_t g = 0; g < groups; ++g, bytes += 16, even += 16, odd += 16) {
      __m512 hi[WEIGHTS], lo[WEIGHTS];
      for (int i = 0; i < WEIGHTS; ++i) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i * row_bytes)));
        hi[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), scaled[i]);
        lo[i] = _mm512_permutexvar_ps(v, scaled[i]);
      }
      for (int r = 0; r < ROWS; ++r) {
        const __m512 e = _mm512_loadu_ps(even + r * stride), o = _mm512_loadu_ps(odd + r * stride);
        for (int i = 0; i < WEIGHTS; ++i) acc[i][r] = _mm512_fmadd_ps(lo[i], o, _mm512_fmadd_ps(hi[i], e, acc[i][r]));
      }
    }
  }
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) sums[i * m + r] = _mm512_reduce_add_ps(acc[i][r]);
}

// WEIGHTS weight rows against every input row: passes of four input rows, then the rest.
template <int WEIGHTS>
void dot_all_rows_avx512(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums,
                         int32_t dtype) {
  passes_of_four(0, m, [&](auto rows, int64_t m0) {
    dot_rows_avx512<decltype(rows)::value, WEIGHTS>(w, n, k, x, m0, sums + m0, m, dtype);
  });
}

// bfloat16 inputs with AVX512-BF16: a block's scaled table is rounded to bfloat16 (the weights the
// reference multiplies) and duplicated into 32 lanes, so that vpermw decodes 32 weights from the
// low five bits of each byte (the fifth bit picks the duplicate) and vdpbf16ps multiplies 32
// weight and input pairs, accumulating in float32. Blocks of 64 and more. WEIGHTS (1-4) weight
// rows share each input load: with one input load per product, the loads limited eight rows
// (an AMD Zen 4 core: 12.3 ns per 64-weight block of one weight row, 6.4 for two; in the whole
// product at 8 rows, four took 7.3 ns a block against 7.7 for two). Each (weight, input) row pair
// has one sum, the high nibbles' product then the low ones', the same whatever rows share the pass.
template <int ROWS, int WEIGHTS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) inline void block_bf16(
    const uint8_t* bytes, int64_t row_bytes, const uint16_t* even, const uint16_t* odd, int64_t stride,
    int64_t groups, const __m512i* tables, __m512 (*acc)[ROWS]) {
  for (int64_t g = 0; g < groups; ++g, bytes += 32, even += 32, odd += 32) {
    __m512bh hi[WEIGHTS], lo[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + i * row_bytes)));
      hi[i] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tables[i]);
      lo[i] = (__m512bh)_mm512_permutexvar_epi16(v, tables[i]);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh e = (__m512bh)_mm512_loadu_si512(even + r * stride), o = (__m512bh)_mm512_loadu_si512(odd + r * stride);
      for (int i = 0; i < WEIGHTS; ++i) {
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], hi[i], e);
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], lo[i], o);
      }
    }
  }
}

// Weight rows [n, n + WEIGHTS) against input rows [m0, m0 + ROWS): row i's sums at sums + i * m.
// LOCALITY: where the weight rows ahead are prefetched to (prefetch_block).
template <int ROWS, int WEIGHTS, int LOCALITY>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void dot_rows_bf16(const Weight& w, int64_t n,
                                                                                             int64_t k,
                                                                                             const Inputs& x,
                                                                                             int64_t m0, float* sums,
                                                                                             int64_t m) {
  const __m512 table = _mm512_loadu_ps(w.table);
  __m512 acc[WEIGHTS][ROWS];
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 64, stride = x.stride;
  const int64_t step = w.blocksize / 2;  // bytes (and inputs of each parity) per block
  const uint8_t* bytes = w.packed + first * step;
  const uint16_t* even = x.even16.data() + m0 * stride;
  const uint16_t* odd = x.odd16.data() + m0 * stride;
  float scales[WEIGHTS * MAX_RUN];  // one call for the pass's rows, which are contiguous
  block_scales_avx512(w, first, WEIGHTS * blocks, scales);
  for (int64_t b = 0; b < blocks; ++b, bytes += step, even += step, odd += step) {
    __m512i tables[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      prefetch_block<LOCALITY>(bytes + i * (k / 2), step, b, x.ahead);
      const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scales[i * blocks + b]));
      tables[i] = (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);
    }
    block_bf16<ROWS, WEIGHTS>(bytes, k / 2, even, odd, stride, groups, tables, acc);
  }
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) sums[i * m + r] = _mm512_reduce_add_ps(acc[i][r]);
}

// One input row against weight rows [n, n + WEIGHTS) with AVX512-BF16 (the decode of block_bf16):
// two sums a weight row, the high nibbles' products and the low ones'. One input row gives
// nothing else to overlap, so several weight rows keep enough vdpbf16ps chains in flight (with
// one, a Zen 4 core waited on the instruction's latency), and a pass's scales come from one call
// (for one weight row of 1024 weights, their table and setup cost 1.7 ns a block). GROUPS: a
// block's groups of 64 weights when known at compile time (blocksize 64), else 0. LOCALITY: as
// dot_rows_bf16's.
template <int WEIGHTS, int GROUPS, int LOCALITY>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void dot_row_bf16_blocks(const Weight& w,
                                                                                                  int64_t n, int64_t k,
                                                                                                  const Inputs& x,
                                                                                                  float* sums) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const int64_t blocks = k / w.blocksize, first = n * blocks, step = w.blocksize / 2, row_bytes = k / 2;
  const int64_t groups = GROUPS ? GROUPS : w.blocksize / 64;
  const uint8_t* bytes = w.packed + first * step;
  const uint16_t* even = x.even16.data();
  const uint16_t* odd = x.odd16.data();
  __m512 hi_sums[WEIGHTS], lo_sums[WEIGHTS];
  for (int i = 0; i < WEIGHTS; ++i) hi_sums[i] = lo_sums[i] = _mm512_setzero_ps();
  float scales[WEIGHTS * MAX_RUN];  // one call for the pass's rows, which are contiguous
  block_scales_avx512(w, first, WEIGHTS * blocks, scales);
  for (int64_t b = 0; b < blocks; ++b, bytes += step, even += step, odd += step) {
    __m512i t[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scales[i * blocks + b]));
      t[i] = (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);
      prefetch_block<LOCALITY>(bytes + i * row_bytes, step, b, x.ahead);
    }
    for (int64_t g = 0; g < groups; ++g) {
      const __m512bh e = (__m512bh)_mm512_loadu_si512(even + 32 * g), o = (__m512bh)_mm512_loadu_si512(odd + 32 * g);
      for (int i = 0; i < WEIGHTS; ++i) {
        const __m512i v =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + i * row_bytes + 32 * g)));
        hi_sums[i] = _mm512_dpbf16_ps(hi_sums[i], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t[i]), e);
        lo_sums[i] = _mm512_dpbf16_ps(lo_sums[i], (__m512bh)_mm512_permutexvar_epi16(v, t[i]), o);
      }
    }
  }
  for (int i = 0; i < WEIGHTS; ++i) sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(hi_sums[i], lo_sums[i]));
}

template <int WEIGHTS, int LOCALITY>
void dot_row_bf16_prefetching(const Weight& w, int64_t n, int64_t k, const Inputs& x, float* sums) {
  if (w.blocksize == 64) return dot_row_bf16_blocks<WEIGHTS, 1, LOCALITY>(w, n, k, x, sums);
  dot_row_bf16_blocks<WEIGHTS, 0, LOCALITY>(w, n, k, x, sums);
}

template <int WEIGHTS>
void dot_row_bf16(const Weight& w, int64_t n, int64_t k, const Inputs& x, float* sums) {
  if (x.prefetch_l2) return dot_row_bf16_prefetching<WEIGHTS, PREFETCH_L2>(w, n, k, x, sums);
  dot_row_bf16_prefetching<WEIGHTS, PREFETCH_L1>(w, n, k, x, sums);
}

// WEIGHTS weight rows against every input row (bfloat16 inputs with AVX512-BF16, blocks of 64
// and more, two input rows or more): passes of eight input rows (four with more than two weight
// rows, for registers), four and fewer.
template <int WEIGHTS>
void dot_all_rows_bf16(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums) {
  int64_t m0 = 0;
  if constexpr (WEIGHTS <= 2)
    for (; m0 + 8 <= m; m0 += 8) dot_rows_bf16<8, WEIGHTS, PREFETCH_L1>(w, n, k, x, m0, sums + m0, m);
  passes_of_four(m0, m, [&](auto rows, int64_t first) {
    constexpr int ROWS = decltype(rows)::value;
    if constexpr (ROWS <= PREFETCH_L2_MAX_ROWS)
      if (x.prefetch_l2) return dot_rows_bf16<ROWS, WEIGHTS, PREFETCH_L2>(w, n, k, x, first, sums + first, m);
    dot_rows_bf16<ROWS, WEIGHTS, PREFETCH_L1>(w, n, k, x, first, sums + first, m);
  });
}
#endif

// f(std::integral_constant<int, rows>{}) for the 1-MAX (at most 4) weight rows of a pass, so that
// kernels take the count as a template argument.
template <int MAX = 4, typename F>
void dispatch_weights(int64_t rows, F&& f) {
  if constexpr (MAX >= 4)
    if (rows == 4) return f(std::integral_constant<int, 4>{});
  if constexpr (MAX >= 3)
    if (rows == 3) return f(std::integral_constant<int, 3>{});
  if (rows == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// One weight row against every input row, four input rows a pass, which share its decode (the
// portable kernel; AVX2 and AVX-512 take several weight rows a pass).
void dot_all_rows(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums, int32_t dtype) {
  passes_of_four(0, m, [&](auto rows, int64_t m0) {
    dot_rows_portable<decltype(rows)::value>(w, n, k, x, m0, sums + m0, dtype);
  });
}

// Any shape: element by element (K not a multiple of the blocksize, small or odd blocksizes).
void dot_any(const Weight& w, int64_t n, int64_t k, const void* x, int32_t dtype, int64_t m, float* sums) {
  for (int64_t r = 0; r < m; ++r) sums[r] = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = n * k + j;
    const float value = round_to(w.table[index_at(w.packed, e)] * block_scale(w, e / w.blocksize), dtype);
    for (int64_t r = 0; r < m; ++r) sums[r] += value * load_value(x, r * k + j, dtype);
  }
}

}  // namespace
