// The fused product of few input rows with AVX2: float32 rows decoded by vpermps, 16-bit rows
// (bfloat16, float16) by byte shuffles.

#pragma once

#include "product.h"

namespace {

#if FOURBIT_X86
// The sum of a vector's eight lanes.
__attribute__((target("avx2,fma,f16c"), always_inline)) inline float sum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// float32 rows with AVX2: WEIGHTS weight rows (1-2) against ROWS input rows (1-4), one sum per
// (weight, input) row pair, as dot_rows_avx512 (the same order whatever rows share the pass). A group of 8 packed bytes is 16 weights a row, looked up by lookup_avx2. Two
// weight rows a pass read each input once for both; with one, four input rows kept 16 sums and
// spilled the 16 registers (a Zen 4 core forced to AVX2, 4096x4096: 15% faster from 4 rows).
template <int ROWS, int WEIGHTS>
__attribute__((target("avx2,fma,f16c"))) void dot_rows_avx2(const Weight& w, int64_t n, int64_t k, const Inputs& x,
                                                            int64_t m0, float* sums, int64_t m) {
  const __m256 low = _mm256_loadu_ps(w.table), high = _mm256_loadu_ps(w.table + 8);
  __m256 acc[WEIGHTS][ROWS];
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 16, stride = x.stride;
  const int64_t step = w.blocksize / 2, row_bytes = k / 2;
  const uint8_t* bytes = w.packed + first * step;
  const float* even = x.even.data() + m0 * stride;
  const float* odd = x.odd.data() + m0 * stride;
  float scales[WEIGHTS * MAX_RUN];  // one call for the pass's rows, which are contiguous
  block_scales_avx2(w, first, WEIGHTS * blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 scaled_low[WEIGHTS], scaled_high[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      const __m256 scale = _mm256_set1_ps(scales[i * blocks + b]);
      scaled_low[i] = _mm256_mul_ps(low, scale);
      scaled_high[i] = _mm256_mul_ps(high, scale);
      prefetch_block(bytes + i * row_bytes, step, b, x.ahead);
    }
    for (int64_t g = 0; g < groups; ++g, bytes += 8, even += 8, odd += 8) {
      __m256 hi[WEIGHTS], lo[WEIGHTS];
      for (int i = 0; i < WEIGHTS; ++i) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i * row_bytes)));
        hi[i] = lookup_avx2(_mm256_srli_epi32(v, 4), scaled_low[i], scaled_high[i]);
        lo[i] = lookup_avx2(v, scaled_low[i], scaled_high[i]);
      }
      for (int r = 0; r < ROWS; ++r) {
        const __m256 e = _mm256_loadu_ps(even + r * stride), o = _mm256_loadu_ps(odd + r * stride);
        for (int i = 0; i < WEIGHTS; ++i) acc[i][r] = _mm256_fmadd_ps(lo[i], o, _mm256_fmadd_ps(hi[i], e, acc[i][r]));
      }
    }
  }
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) sums[i * m + r] = sum_avx2(acc[i][r]);
}

// WEIGHTS weight rows of float32 products against every input row: passes of four input rows.
template <int WEIGHTS>
void dot_all_rows_avx2(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums) {
  passes_of_four(0, m, [&](auto rows, int64_t m0) {
    dot_rows_avx2<decltype(rows)::value, WEIGHTS>(w, n, k, x, m0, sums + m0, m);
  });
}


// Where slot j (0-31) of a group of 32 inputs comes from in Inputs::grouped: the order in which
// dot_rows_avx2_16 decodes a group's 32 weights for `dtype` (bfloat16 or float16), four vectors
// of eight. A group's packed bytes give the even weights in the low 128-bit lane of the index
// and the odd ones in the high lane; interleaving the two byte tables' results makes 16-bit
// weights, which float16 widens a lane at a time (0, 2, ..., 14, then 1, 3, ..., 15) and bfloat16
// a 32-bit half at a time (the low halves 0, 4, 8, 12 | 1, 5, 9, 13, then the high ones).
inline int64_t grouped_position(int64_t j, int32_t dtype) {
  const int64_t vector = j / 8, lane = j % 8, base = vector >= 2 ? 16 : 0, second = vector % 2;
  if (dtype == F16) return base + 2 * lane + second;
  return base + 4 * (lane % 4) + 2 * second + lane / 4;
}

// A block's scaled table rounded to `DTYPE` (bfloat16 or float16), as the reference multiplies it,
// split into two 16-byte tables, each in both 128-bit lanes: the entries' low bytes and their
// high bytes. A NaN entry (from a scale that is not finite) stays NaN.
template <int32_t DTYPE>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void byte_tables_avx2(__m256 low, __m256 high,
                                                                                    float scale, __m256i* low_bytes,
                                                                                    __m256i* high_bytes) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 a = _mm256_mul_ps(low, s), b = _mm256_mul_ps(high, s);
  __m256i words;  // lane 0: entries 0-3 and 8-11, lane 1: 4-7 and 12-15, as 16-bit values
  if (DTYPE == F16) {
    constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m128i first = _mm256_cvtps_ph(a, nearest), second = _mm256_cvtps_ph(b, nearest);
    words = _mm256_set_m128i(_mm_unpackhi_epi64(first, second), _mm_unpacklo_epi64(first, second));
  } else {
    __m256i half[2];
    const __m256 v[2] = {a, b};
    const bool finite = std::isfinite(scale);
    for (int h = 0; h < 2; ++h) {  // round to nearest even; a NaN keeps its (quiet) high half
      const __m256i u = _mm256_castps_si256(v[h]), top = _mm256_srli_epi32(u, 16);
      const __m256i bias = _mm256_add_epi32(_mm256_and_si256(top, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
      half[h] = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      if (!finite)
        half[h] = _mm256_blendv_epi8(half[h], top, _mm256_castps_si256(_mm256_cmp_ps(v[h], v[h], _CMP_UNORD_Q)));
    }
    words = _mm256_packus_epi32(half[0], half[1]);
  }
  // each lane's four low bytes of its first four entries, then of its second four, then the high
  // bytes likewise; then the 32-bit quarters in entry order, in both lanes
  const __m256i split = _mm256_shuffle_epi8(
      words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
                              5, 7, 9, 11, 13, 15));
  *low_bytes = _mm256_permutevar8x32_epi32(split, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
  *high_bytes = _mm256_permutevar8x32_epi32(split, _mm256_setr_epi32(2, 6, 3, 7, 2, 6, 3, 7));
}

// float32 sums of bfloat16 or float16 rows with AVX2: WEIGHTS weight rows (1-2) against ROWS input
// rows (1-4). Each block's two byte tables (byte_tables_avx2) decode a group of 16 packed bytes,
// 32 weights, with two vpshufb, where a float32 table takes two vpermps and a blend for 8. The
// inputs are in Inputs::grouped's order; each (weight, input) row pair sums every group as
// (w0 x0 + w2 x2) + (w1 x1 + w3 x3), the same whatever rows share the pass.
template <int ROWS, int WEIGHTS, int32_t DTYPE>
__attribute__((target("avx2,fma,f16c"))) void dot_rows_avx2_16(const Weight& w, int64_t n, int64_t k,
                                                               const Inputs& x, int64_t m0, float* sums, int64_t m) {
  const __m256 low = _mm256_loadu_ps(w.table), high = _mm256_loadu_ps(w.table + 8);
  const __m128i nibble = _mm_set1_epi8(15);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[WEIGHTS][ROWS];
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 32;
  const int64_t step = w.blocksize / 2, row_bytes = k / 2;
  const uint8_t* bytes = w.packed + first * step;
  const float* inputs = x.grouped.data() + m0 * x.stride;
  float scales[WEIGHTS * MAX_RUN];  // one call for the pass's rows, which are contiguous
  block_scales_avx2(w, first, WEIGHTS * blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i low_bytes[WEIGHTS], high_bytes[WEIGHTS];
    for (int i = 0; i < WEIGHTS; ++i) {
      byte_tables_avx2<DTYPE>(low, high, scales[i * blocks + b], &low_bytes[i], &high_bytes[i]);
      prefetch_block(bytes + i * row_bytes, step, b, x.ahead);
    }
    for (int64_t g = 0; g < groups; ++g, bytes += 16, inputs += 32) {
      __m256 weights[WEIGHTS][4];
      for (int i = 0; i < WEIGHTS; ++i) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i * row_bytes));
        const __m256i index = _mm256_set_m128i(_mm_and_si128(packed, nibble),
                                               _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
        const __m256i lows = _mm256_shuffle_epi8(low_bytes[i], index);
        const __m256i highs = _mm256_shuffle_epi8(high_bytes[i], index);
        const __m256i first_words = _mm256_unpacklo_epi8(lows, highs), second_words = _mm256_unpackhi_epi8(lows, highs);
        if (DTYPE == F16) {
          weights[i][0] = _mm256_cvtph_ps(_mm256_castsi256_si128(first_words));
          weights[i][1] = _mm256_cvtph_ps(_mm256_extracti128_si256(first_words, 1));
          weights[i][2] = _mm256_cvtph_ps(_mm256_castsi256_si128(second_words));
          weights[i][3] = _mm256_cvtph_ps(_mm256_extracti128_si256(second_words, 1));
        } else {
          weights[i][0] = _mm256_castsi256_ps(_mm256_slli_epi32(first_words, 16));
          weights[i][1] = _mm256_castsi256_ps(_mm256_and_si256(first_words, top));
          weights[i][2] = _mm256_castsi256_ps(_mm256_slli_epi32(second_words, 16));
          weights[i][3] = _mm256_castsi256_ps(_mm256_and_si256(second_words, top));
        }
      }
      for (int r = 0; r < ROWS; ++r) {
        const float* row = inputs + r * x.stride;
        const __m256 x0 = _mm256_loadu_ps(row), x1 = _mm256_loadu_ps(row + 8);
        const __m256 x2 = _mm256_loadu_ps(row + 16), x3 = _mm256_loadu_ps(row + 24);
        for (int i = 0; i < WEIGHTS; ++i) {
          const __m256 even = _mm256_fmadd_ps(weights[i][2], x2, _mm256_mul_ps(weights[i][0], x0));
          const __m256 odd = _mm256_fmadd_ps(weights[i][3], x3, _mm256_mul_ps(weights[i][1], x1));
          acc[i][r] = _mm256_add_ps(acc[i][r], _mm256_add_ps(even, odd));
        }
      }
    }
  }
  for (int i = 0; i < WEIGHTS; ++i)
    for (int r = 0; r < ROWS; ++r) sums[i * m + r] = sum_avx2(acc[i][r]);
}

// WEIGHTS weight rows of 16-bit products against every input row: passes of four input rows.
template <int WEIGHTS>
void dot_all_rows_avx2_16(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums,
                          int32_t dtype) {
  passes_of_four(0, m, [&](auto rows, int64_t m0) {
    constexpr int ROWS = decltype(rows)::value;
    if (dtype == F16) return dot_rows_avx2_16<ROWS, WEIGHTS, F16>(w, n, k, x, m0, sums + m0, m);
    dot_rows_avx2_16<ROWS, WEIGHTS, BF16>(w, n, k, x, m0, sums + m0, m);
  });
}
#endif

}  // namespace
