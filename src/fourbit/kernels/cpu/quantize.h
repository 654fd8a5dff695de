// Quantize: absmax per block, then each value's code (portable, AVX2 and AVX-512).

#pragma once

#include "common.h"

namespace {

// Quantize whole blocks [first, last) of `x` (of type T): absmax per block, then each value's code.
// The arithmetic is the reference's: float32 values times the float32 reciprocal of the absmax
// (floored at 1e-38), clamped to [-1, 1], bucketed against the 15 midpoints of the sorted table;
// NaN takes the last bucket and a block holding a NaN has a NaN absmax.
template <typename T, typename Load>
void quantize_blocks(const T* x, int64_t first, int64_t last, int64_t blocksize, const float* midpoints,
                     const uint8_t* order, uint8_t* packed, float* absmax, Load load) {
  std::vector<float> values(blocksize);
  std::vector<uint8_t> codes(blocksize);
  std::vector<int32_t> positions(blocksize);
  for (int64_t b = first; b < last; ++b) {
    const T* block = x + b * blocksize;
    float largest = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < blocksize; ++i) {
      const float v = load(block[i]);
      values[i] = v;
      const float a = v < 0.0f ? -v : v;
      nan |= v != v;
      largest = a > largest ? a : largest;
    }
    const float amax = nan ? std::numeric_limits<float>::quiet_NaN() : largest;
    absmax[b] = amax;
    const float reciprocal = absmax_reciprocal(amax);
    for (int64_t i = 0; i < blocksize; ++i) {  // branch-free, so that the compiler vectorizes it
      const float scaled = values[i] * reciprocal;
      const float bounded = scaled < -1.0f ? -1.0f : (scaled > 1.0f ? 1.0f : scaled);
      int32_t position = 0;
      for (int j = 0; j < 15; ++j) position += bounded > midpoints[j] ? 1 : 0;
      positions[i] = scaled != scaled ? 15 : position;
    }
    for (int64_t i = 0; i < blocksize; ++i) codes[i] = order[positions[i]];
    uint8_t* out = packed + b * blocksize / 2;
    for (int64_t i = 0; i < blocksize / 2; ++i) out[i] = static_cast<uint8_t>(codes[2 * i] << 4 | codes[2 * i + 1]);
  }
}

#if FOURBIT_X86
// AVX-512 `quantize_blocks`: the same arithmetic 16 values at a time (blocksize a multiple of 16).
template <int32_t DTYPE>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 load16_avx512(const void* x, int64_t i) {
  if (DTYPE == F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
  if (DTYPE == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int32_t DTYPE>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void quantize_blocks_avx512(
    const void* x, int64_t first, int64_t last, int64_t blocksize, const float* midpoints, const uint8_t* order,
    uint8_t* packed, float* absmax) {
  __m512 mids[15];
  for (int j = 0; j < 15; ++j) mids[j] = _mm512_set1_ps(midpoints[j]);
  alignas(64) int32_t order32[16];
  for (int j = 0; j < 16; ++j) order32[j] = order[j];
  const __m512i order_vec = _mm512_load_si512(order32);
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 lower = _mm512_set1_ps(-1.0f), upper = _mm512_set1_ps(1.0f);
  const __m512i one = _mm512_set1_epi32(1), last_bucket = _mm512_set1_epi32(15);
  for (int64_t b = first; b < last; ++b) {
    const int64_t base = b * blocksize;
    __m512 largest = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512 v = load16_avx512<DTYPE>(x, base + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      largest = _mm512_max_ps(largest, _mm512_and_ps(v, magnitude));
    }
    const float amax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(largest);
    absmax[b] = amax;
    const __m512 reciprocal = _mm512_set1_ps(absmax_reciprocal(amax));
    uint8_t* out = packed + base / 2;
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512 scaled = _mm512_mul_ps(load16_avx512<DTYPE>(x, base + i), reciprocal);
      const __m512 bounded = _mm512_min_ps(_mm512_max_ps(scaled, lower), upper);
      __m512i position = _mm512_setzero_si512();
      for (int j = 0; j < 15; ++j)
        position = _mm512_mask_add_epi32(position, _mm512_cmp_ps_mask(bounded, mids[j], _CMP_GT_OQ), position, one);
      position = _mm512_mask_mov_epi32(position, _mm512_cmp_ps_mask(scaled, scaled, _CMP_UNORD_Q), last_bucket);
      const __m128i codes = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(position, order_vec));
      // byte pairs (first, second) as 16-bit lanes -> first << 4 | second, then one byte per lane
      const __m128i pairs = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(codes, 4), _mm_set1_epi16(0x0FF0)),
                                         _mm_srli_epi16(codes, 8));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm_packus_epi16(pairs, _mm_setzero_si128()));
    }
  }
}
// AVX2 `quantize_blocks`: the same arithmetic 8 values a vector, 16 a step (blocksize a multiple of
// 16). A comparison's all-ones lanes are -1, so subtracting it counts the midpoints passed; one
// byte shuffle maps the sixteen sorted positions to their codes.
template <int32_t DTYPE>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 load8_avx2(const void* x, int64_t i) {
  if (DTYPE == F32) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
  if (DTYPE == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Each value's sorted position among the 15 midpoints (the last bucket for NaN).
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256i positions_avx2(__m256 v, __m256 reciprocal,
                                                                                     const __m256* mids) {
  const __m256 scaled = _mm256_mul_ps(v, reciprocal);
  const __m256 bounded = _mm256_min_ps(_mm256_max_ps(scaled, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
  __m256i position = _mm256_setzero_si256();
  for (int j = 0; j < 15; ++j)
    position = _mm256_sub_epi32(position, _mm256_castps_si256(_mm256_cmp_ps(bounded, mids[j], _CMP_GT_OQ)));
  const __m256 nan = _mm256_cmp_ps(scaled, scaled, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(position, _mm256_set1_epi32(15), _mm256_castps_si256(nan));
}

template <int32_t DTYPE>
__attribute__((target("avx2,fma,f16c"))) void quantize_blocks_avx2(const void* x, int64_t first, int64_t last,
                                                                   int64_t blocksize, const float* midpoints,
                                                                   const uint8_t* order, uint8_t* packed,
                                                                   float* absmax) {
  __m256 mids[15];
  for (int j = 0; j < 15; ++j) mids[j] = _mm256_set1_ps(midpoints[j]);
  const __m128i order_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(order));
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = first; b < last; ++b) {
    const int64_t base = b * blocksize;
    __m256 largest = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocksize; i += 8) {
      const __m256 v = load8_avx2<DTYPE>(x, base + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
    }
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
    const bool any_nan = _mm256_movemask_ps(nan) != 0;
    const float amax = any_nan ? std::numeric_limits<float>::quiet_NaN() : _mm_cvtss_f32(half);
    absmax[b] = amax;
    const __m256 reciprocal = _mm256_set1_ps(absmax_reciprocal(amax));
    uint8_t* out = packed + base / 2;
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m256i p0 = positions_avx2(load8_avx2<DTYPE>(x, base + i), reciprocal, mids);
      const __m256i p1 = positions_avx2(load8_avx2<DTYPE>(x, base + i + 8), reciprocal, mids);
      // 32-bit positions -> 16 bytes in order (the pack works per 128-bit lane), then their codes
      const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(p0, p1), 0xD8);
      const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
      const __m128i codes = _mm_shuffle_epi8(order_bytes, bytes);
      const __m128i pairs = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(codes, 4), _mm_set1_epi16(0x0FF0)),
                                         _mm_srli_epi16(codes, 8));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm_packus_epi16(pairs, _mm_setzero_si128()));
    }
  }
}
#endif

}  // namespace
