// Dequantize: whole blocks per variant, single elements for the rest.

#pragma once

#include "common.h"

namespace {

// Elements [first, last) of the flat weight, one element at a time.
void dequantize_scalar(const Weight& w, int64_t first, int64_t last, void* out, int32_t dtype) {
  for (int64_t e = first; e < last; ++e)
    store_value(out, e, w.table[index_at(w.packed, e)] * block_scale(w, e / w.blocksize), dtype);
}

#if FOURBIT_X86
// Stores 16 values at element e; with `stream`, around the caches (a large output, aligned).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store16_avx512(void* out, int64_t e,
                                                                                           __m512 v, int32_t dtype,
                                                                                           bool stream) {
  if (dtype == F32) {
    if (stream)
      _mm512_stream_ps(static_cast<float*>(out) + e, v);
    else
      _mm512_storeu_ps(static_cast<float*>(out) + e, v);
    return;
  }
  __m256i half;
  if (dtype == BF16) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    half = _mm512_cvtepi32_epi16(r);
  } else {
    half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  __m256i* target = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + e);
  if (stream)
    _mm256_stream_si256(target, half);
  else
    _mm256_storeu_si256(target, half);
}

// Whole blocks [first_block, last_block) of a blocksize that is a multiple of 32.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dequantize_blocks_avx512(
    const Weight& w, int64_t first_block, int64_t last_block, void* out, int32_t dtype, bool stream) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  float scales[MAX_RUN];
  block_scales_avx512(w, first_block, last_block - first_block, scales);
  for (int64_t b = first_block; b < last_block; ++b) {
    const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scales[b - first_block]));
    for (int64_t e = b * w.blocksize; e < (b + 1) * w.blocksize; e += 32) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + e / 2)));
      __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), scaled);
      __m512 odd = _mm512_permutexvar_ps(v, scaled);  // vpermps reads the index's low four bits
      store16_avx512(out, e, _mm512_permutex2var_ps(even, first_half, odd), dtype, stream);
      store16_avx512(out, e + 16, _mm512_permutex2var_ps(even, second_half, odd), dtype, stream);
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline void store8_avx2(void* out, int64_t e, __m256 v, int32_t dtype) {
  if (dtype == F32) {
    _mm256_storeu_ps(static_cast<float*>(out) + e, v);
  } else if (dtype == BF16) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + e), packed);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + e),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

__attribute__((target("avx2,fma,f16c"))) void dequantize_blocks_avx2(const Weight& w, int64_t first_block,
                                                                      int64_t last_block, void* out, int32_t dtype) {
  const __m256 low = _mm256_loadu_ps(w.table), high = _mm256_loadu_ps(w.table + 8);
  float scales[MAX_RUN];
  block_scales_avx2(w, first_block, last_block - first_block, scales);
  for (int64_t b = first_block; b < last_block; ++b) {
    const __m256 scale = _mm256_set1_ps(scales[b - first_block]);
    const __m256 scaled_low = _mm256_mul_ps(low, scale), scaled_high = _mm256_mul_ps(high, scale);
    for (int64_t e = b * w.blocksize; e < (b + 1) * w.blocksize; e += 16) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + e / 2)));
      __m256 even = lookup_avx2(_mm256_srli_epi32(v, 4), scaled_low, scaled_high);
      __m256 odd = lookup_avx2(v, scaled_low, scaled_high);  // the low nibble needs no mask
      // interleave: unpack within 128-bit lanes, then put the lanes in order
      __m256 a = _mm256_unpacklo_ps(even, odd), c = _mm256_unpackhi_ps(even, odd);
      store8_avx2(out, e, _mm256_permute2f128_ps(a, c, 0x20), dtype);
      store8_avx2(out, e + 8, _mm256_permute2f128_ps(a, c, 0x31), dtype);
    }
  }
}
#endif

void dequantize_blocks_portable(const Weight& w, int64_t first_block, int64_t last_block, void* out, int32_t dtype) {
  float scales[MAX_RUN];
  block_scales(w, first_block, last_block - first_block, scales);
  for (int64_t b = first_block; b < last_block; ++b)
    for (int64_t e = b * w.blocksize; e < (b + 1) * w.blocksize; ++e)
      store_value(out, e, w.table[index_at(w.packed, e)] * scales[b - first_block], dtype);
}

#if FOURBIT_X86
__attribute__((target("avx2,fma,f16c"))) void widen_avx2(const uint16_t* values, int64_t count, float* out,
                                                          int32_t dtype) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + i));
    const __m256 wide = dtype == BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
                                      : _mm256_cvtph_ps(v);
    _mm256_storeu_ps(out + i, wide);
  }
  for (; i < count; ++i) out[i] = load_value(values, i, dtype);
}
#endif

// `count` bfloat16 or float16 values (`dtype`) written as float32: exact, every value fits.
void widen(const uint16_t* values, int64_t count, float* out, int32_t dtype, int32_t isa) {
#if FOURBIT_X86
  if (isa >= AVX2) return widen_avx2(values, count, out, dtype);
#endif
  for (int64_t i = 0; i < count; ++i) out[i] = load_value(values, i, dtype);
}

void dequantize_blocks(const Weight& w, int64_t first_block, int64_t last_block, void* out, int32_t dtype,
                       int32_t isa, bool stream) {
#if FOURBIT_X86
  if (w.blocksize % 32 == 0) {
    if (isa >= AVX512) return dequantize_blocks_avx512(w, first_block, last_block, out, dtype, stream);
    if (isa == AVX2) return dequantize_blocks_avx2(w, first_block, last_block, out, dtype);
  }
#endif
  dequantize_blocks_portable(w, first_block, last_block, out, dtype);
}

}  // namespace
