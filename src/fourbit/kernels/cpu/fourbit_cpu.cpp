// fourbit's native CPU kernels: 4-bit dequantize and the fused 4-bit product.
//
// Plain C ABI (called through ctypes), no torch headers: the library compiles in seconds and
// does not depend on torch's C++ ABI. One translation unit holds three variants of each
// kernel, chosen at run time: AVX-512 (a 16-entry table lookup is one vpermps), AVX2 (two
// vpermps and a blend) and portable C++. Arithmetic follows the reference exactly:
// value = table[index] * scale in float32 (the table's zeros are +0.0), nested scales are
// nested_code[q] * nested_absmax[block / nested_blocksize] + offset, and conversions round to
// nearest even (bfloat16 NaN becomes 0xFFFF, as torch's vectorized conversion writes it).
// Products accumulate in float32; each output element is summed by one thread in a fixed
// order, so results do not depend on the number of threads.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FOURBIT_X86 1
#else
#define FOURBIT_X86 0
#endif

// AMX tiles need the compiler's intrinsics (GCC 11, clang 12) and Linux's permission to use them.
#if FOURBIT_X86 && defined(__linux__) && !defined(FOURBIT_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define FOURBIT_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FOURBIT_AMX 0
#endif

namespace {

enum Dtype : int32_t { F32 = 0, BF16 = 1, F16 = 2 };
enum Isa : int32_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };

// The smallest absmax a quantize divides by (reference.ABSMAX_FLOOR): all-zero blocks code to zero.
constexpr float ABSMAX_FLOOR = 1e-38f;

// Blocks handled in one run (a dequantize task; the blocks of a weight row in a product).
constexpr int64_t MAX_RUN = 512;

// One packed weight: the packed bytes, the 16-entry float32 table and its statistics.
struct Weight {
  const uint8_t* packed;
  const float* table;          // 16 entries, zeros as +0.0
  const float* absmax;         // float32 scale per block, or null when nested
  const uint8_t* qabsmax;      // nested: 8-bit codes of the scales
  const float* nested_code;    // nested: 256-entry table
  const float* nested_absmax;  // nested: one scale per nested block
  const float* offset;         // nested: added to every decoded scale
  int64_t nested_blocksize;
  int64_t blocksize;
};

inline float block_scale(const Weight& w, int64_t block) {
  if (w.absmax) return w.absmax[block];
  // two roundings, as the reference (the library is compiled without fused multiply-add contraction)
  const float product = w.nested_code[w.qabsmax[block]] * w.nested_absmax[block / w.nested_blocksize];
  return product + *w.offset;
}

// The scales of blocks [first, first + count): one division for the run, not one per block.
void block_scales(const Weight& w, int64_t first, int64_t count, float* out) {
  if (w.absmax) {
    std::memcpy(out, w.absmax + first, count * sizeof(float));
    return;
  }
  int64_t group = first / w.nested_blocksize, left = (group + 1) * w.nested_blocksize - first;
  const float offset = *w.offset;
  for (int64_t i = 0; i < count; ++i) {
    if (left == 0) ++group, left = w.nested_blocksize;
    const float product = w.nested_code[w.qabsmax[first + i]] * w.nested_absmax[group];
    out[i] = product + offset;
    --left;
  }
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t to_bf16(float f) {
  if (f != f) return 0xFFFF;
  uint32_t u = bits_of(f);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline uint16_t to_f16(float f) {
  uint32_t u = bits_of(f);
  uint32_t sign = (u >> 16) & 0x8000;
  uint32_t a = u & 0x7FFFFFFF;
  uint32_t out;
  if (a >= 0x47800000) {  // 65536 and beyond: infinity, or NaN
    out = a > 0x7F800000 ? 0x7E00 : 0x7C00;
  } else if (a < 0x38800000) {  // below the smallest normal half: let float addition round
    const uint32_t magic = 0x3F000000;  // 0.5: its ulp is the half subnormal step
    out = bits_of(float_of(a) + float_of(magic)) - magic;
  } else {
    uint32_t odd = (a >> 13) & 1;
    a += 0xC8000FFF + odd;  // rebias the exponent (-112 << 23) and round to nearest even
    out = a >> 13;
  }
  return static_cast<uint16_t>(out | sign);
}

inline float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

inline float from_f16(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0x1F) return float_of(sign | 0x7F800000 | (mantissa << 13));
  if (exponent != 0) return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
  float value = static_cast<float>(mantissa) * float_of(0x33800000);  // 2^-24
  return sign ? -value : value;
}

// A float32 value rounded to `dtype` and widened again: the decoded weight the reference multiplies.
inline float round_to(float v, int32_t dtype) {
  if (dtype == BF16) return v != v ? v : from_bf16(to_bf16(v));
  if (dtype == F16) return from_f16(to_f16(v));
  return v;
}

inline float load_value(const void* base, int64_t i, int32_t dtype) {
  if (dtype == F32) return static_cast<const float*>(base)[i];
  uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dtype == BF16 ? from_bf16(h) : from_f16(h);
}

inline void store_value(void* base, int64_t i, float v, int32_t dtype) {
  if (dtype == F32)
    static_cast<float*>(base)[i] = v;
  else
    static_cast<uint16_t*>(base)[i] = dtype == BF16 ? to_bf16(v) : to_f16(v);
}

inline int index_at(const uint8_t* packed, int64_t e) {
  uint8_t byte = packed[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

// ------------------------------------------------------------------------------- dequantize

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
  const __m512i low_nibble = _mm512_set1_epi32(15);
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  float scales[MAX_RUN];
  block_scales(w, first_block, last_block - first_block, scales);
  for (int64_t b = first_block; b < last_block; ++b) {
    const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scales[b - first_block]));
    for (int64_t e = b * w.blocksize; e < (b + 1) * w.blocksize; e += 32) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + e / 2)));
      __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), scaled);
      __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(v, low_nibble), scaled);
      store16_avx512(out, e, _mm512_permutex2var_ps(even, first_half, odd), dtype, stream);
      store16_avx512(out, e + 16, _mm512_permutex2var_ps(even, second_half, odd), dtype, stream);
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 lookup_avx2(__m256i index, __m256 low, __m256 high) {
  __m256 a = _mm256_permutevar8x32_ps(low, index);
  __m256 b = _mm256_permutevar8x32_ps(high, index);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
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
  const __m256i low_nibble = _mm256_set1_epi32(15);
  float scales[MAX_RUN];
  block_scales(w, first_block, last_block - first_block, scales);
  for (int64_t b = first_block; b < last_block; ++b) {
    const __m256 scale = _mm256_set1_ps(scales[b - first_block]);
    const __m256 scaled_low = _mm256_mul_ps(low, scale), scaled_high = _mm256_mul_ps(high, scale);
    for (int64_t e = b * w.blocksize; e < (b + 1) * w.blocksize; e += 16) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + e / 2)));
      __m256 even = lookup_avx2(_mm256_srli_epi32(v, 4), scaled_low, scaled_high);
      __m256 odd = lookup_avx2(_mm256_and_si256(v, low_nibble), scaled_low, scaled_high);
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

// ------------------------------------------------------------------------------- product

// Inputs converted to float32 and split into even and odd elements of each row, so that the
// high and low nibbles of a packed byte meet their inputs without shuffles.
template <typename T>
struct CacheLineAllocator {  // 64-byte aligned rows: vector loads never straddle cache lines
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};

struct Inputs {
  std::vector<float, CacheLineAllocator<float>> even, odd;
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> even16, odd16;  // bfloat16 inputs, kept as they are
  int64_t half;  // K / 2
};

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
    for (int64_t j = 0; j < w.blocksize / 2; ++j) {
      const float hi = scaled[bytes[j] >> 4], lo = scaled[bytes[j] & 15];
      for (int r = 0; r < ROWS; ++r) {
        const int64_t i = (m0 + r) * x.half + base + j;
        acc[r] += hi * x.even[i] + lo * x.odd[i];
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = acc[r];
}

#if FOURBIT_X86
// Sixteen float32 values rounded to `dtype` and widened again (NaN kept).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 round_to_avx512(__m512 v, int32_t dtype) {
  if (dtype == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (dtype != BF16) return v;
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 round_to_avx2(__m256 v, int32_t dtype) {
  if (dtype == F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (dtype != BF16) return v;
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                               _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// One group of 16 packed bytes (32 weights) against ROWS input rows: high nibbles meet the even
// inputs, low nibbles the odd ones. Accumulators are indexed by constants only, so they stay
// in registers.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline void group_avx512(
    const uint8_t* bytes, const float* even, const float* odd, int64_t stride, __m512 scaled, __m512* acc_hi,
    __m512* acc_lo) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), scaled);
  __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), scaled);
  for (int r = 0; r < ROWS; ++r) {
    acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(even + r * stride), acc_hi[r]);
    acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(odd + r * stride), acc_lo[r]);
  }
}

// Two groups in flight (four accumulators per row), so that the adds do not wait on each other.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dot_rows_avx512(const Weight& w, int64_t n,
                                                                                    int64_t k, const Inputs& x,
                                                                                    int64_t m0, float* sums,
                                                                                    int32_t dtype) {
  const __m512 table = _mm512_loadu_ps(w.table);
  __m512 a0[ROWS], a1[ROWS], a2[ROWS], a3[ROWS];
  for (int r = 0; r < ROWS; ++r) a0[r] = a1[r] = a2[r] = a3[r] = _mm512_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 32, stride = x.half;
  const uint8_t* bytes = w.packed + first * w.blocksize / 2;
  const float* even = x.even.data() + m0 * stride;
  const float* odd = x.odd.data() + m0 * stride;
  float scales[MAX_RUN];
  block_scales(w, first, blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 scaled = round_to_avx512(_mm512_mul_ps(table, _mm512_set1_ps(scales[b])), dtype);
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2, bytes += 32, even += 32, odd += 32) {
      group_avx512<ROWS>(bytes, even, odd, stride, scaled, a0, a1);
      group_avx512<ROWS>(bytes + 16, even + 16, odd + 16, stride, scaled, a2, a3);
    }
    if (g < groups) {
      group_avx512<ROWS>(bytes, even, odd, stride, scaled, a0, a1);
      bytes += 16, even += 16, odd += 16;
    }
  }
  for (int r = 0; r < ROWS; ++r)
    sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_add_ps(a2[r], a3[r])));
}

template <int ROWS>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void group_avx2(const uint8_t* bytes, const float* even,
                                                                               const float* odd, int64_t stride,
                                                                               __m256 low, __m256 high,
                                                                               __m256* acc_hi, __m256* acc_lo) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  __m256 hi = lookup_avx2(_mm256_srli_epi32(v, 4), low, high);
  __m256 lo = lookup_avx2(_mm256_and_si256(v, _mm256_set1_epi32(15)), low, high);
  for (int r = 0; r < ROWS; ++r) {
    acc_hi[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(even + r * stride), acc_hi[r]);
    acc_lo[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(odd + r * stride), acc_lo[r]);
  }
}

template <int ROWS>
__attribute__((target("avx2,fma,f16c"))) void dot_rows_avx2(const Weight& w, int64_t n, int64_t k, const Inputs& x,
                                                            int64_t m0, float* sums, int32_t dtype) {
  const __m256 low = _mm256_loadu_ps(w.table), high = _mm256_loadu_ps(w.table + 8);
  __m256 a0[ROWS], a1[ROWS], a2[ROWS], a3[ROWS];
  for (int r = 0; r < ROWS; ++r) a0[r] = a1[r] = a2[r] = a3[r] = _mm256_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 16, stride = x.half;
  const uint8_t* bytes = w.packed + first * w.blocksize / 2;
  const float* even = x.even.data() + m0 * stride;
  const float* odd = x.odd.data() + m0 * stride;
  float scales[MAX_RUN];
  block_scales(w, first, blocks, scales);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256 scale = _mm256_set1_ps(scales[b]);
    const __m256 scaled_low = round_to_avx2(_mm256_mul_ps(low, scale), dtype);
    const __m256 scaled_high = round_to_avx2(_mm256_mul_ps(high, scale), dtype);
    for (int64_t g = 0; g < groups; g += 2, bytes += 16, even += 16, odd += 16) {  // groups is even
      group_avx2<ROWS>(bytes, even, odd, stride, scaled_low, scaled_high, a0, a1);
      group_avx2<ROWS>(bytes + 8, even + 8, odd + 8, stride, scaled_low, scaled_high, a2, a3);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    __m256 total = _mm256_add_ps(_mm256_add_ps(a0[r], a1[r]), _mm256_add_ps(a2[r], a3[r]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    sums[r] = _mm_cvtss_f32(s);
  }
}

// bfloat16 inputs with AVX512-BF16: a block's scaled table is rounded to bfloat16 (the weights the
// reference multiplies) and duplicated into 32 lanes, so that vpermw decodes 32 weights from the
// low five bits of each byte (the fifth bit picks the duplicate) and vdpbf16ps multiplies 32
// weight and input pairs, accumulating in float32. Blocks of 64 and more.
template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) inline void block_bf16(
    const uint8_t* bytes, const uint16_t* even, const uint16_t* odd, int64_t stride, int64_t groups, __m512i table,
    __m512* acc_hi, __m512* acc_lo) {
  for (int64_t g = 0; g < groups; ++g, bytes += 32, even += 32, odd += 32) {
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
    __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(v, table);
    for (int r = 0; r < ROWS; ++r) {
      acc_hi[r] = _mm512_dpbf16_ps(acc_hi[r], hi, (__m512bh)_mm512_loadu_si512(even + r * stride));
      acc_lo[r] = _mm512_dpbf16_ps(acc_lo[r], lo, (__m512bh)_mm512_loadu_si512(odd + r * stride));
    }
  }
}

template <int ROWS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void dot_rows_bf16(const Weight& w, int64_t n,
                                                                                             int64_t k,
                                                                                             const Inputs& x,
                                                                                             int64_t m0, float* sums) {
  const __m512 table = _mm512_loadu_ps(w.table);
  __m512 a0[ROWS], a1[ROWS], a2[ROWS], a3[ROWS];
  for (int r = 0; r < ROWS; ++r) a0[r] = a1[r] = a2[r] = a3[r] = _mm512_setzero_ps();
  const int64_t blocks = k / w.blocksize, first = n * blocks, groups = w.blocksize / 64, stride = x.half;
  const int64_t step = w.blocksize / 2;  // bytes (and inputs of each parity) per block
  const uint8_t* bytes = w.packed + first * step;
  const uint16_t* even = x.even16.data() + m0 * stride;
  const uint16_t* odd = x.odd16.data() + m0 * stride;
  float scales[MAX_RUN];
  block_scales(w, first, blocks, scales);
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2, bytes += 2 * step, even += 2 * step, odd += 2 * step) {
    const __m512 s0 = _mm512_mul_ps(table, _mm512_set1_ps(scales[b]));
    const __m512 s1 = _mm512_mul_ps(table, _mm512_set1_ps(scales[b + 1]));
    block_bf16<ROWS>(bytes, even, odd, stride, groups, (__m512i)_mm512_cvtne2ps_pbh(s0, s0), a0, a1);
    block_bf16<ROWS>(bytes + step, even + step, odd + step, stride, groups, (__m512i)_mm512_cvtne2ps_pbh(s1, s1),
                     a2, a3);
  }
  if (b < blocks) {
    const __m512 s0 = _mm512_mul_ps(table, _mm512_set1_ps(scales[b]));
    block_bf16<ROWS>(bytes, even, odd, stride, groups, (__m512i)_mm512_cvtne2ps_pbh(s0, s0), a0, a1);
  }
  for (int r = 0; r < ROWS; ++r)
    sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_add_ps(a2[r], a3[r])));
}
#endif

template <int ROWS>
void dot_rows(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m0, float* sums, int32_t dtype,
              int32_t isa) {
#if FOURBIT_X86
  if (isa >= AVX512_BF16 && dtype == BF16 && w.blocksize % 64 == 0) return dot_rows_bf16<ROWS>(w, n, k, x, m0, sums);
  if (isa >= AVX512) return dot_rows_avx512<ROWS>(w, n, k, x, m0, sums, dtype);
  if (isa == AVX2) return dot_rows_avx2<ROWS>(w, n, k, x, m0, sums, dtype);
#endif
  dot_rows_portable<ROWS>(w, n, k, x, m0, sums, dtype);
}

// Up to four input rows per pass over a weight row: the decode is shared by the rows.
void dot_all_rows(const Weight& w, int64_t n, int64_t k, const Inputs& x, int64_t m, float* sums, int32_t dtype,
                  int32_t isa) {
  int64_t m0 = 0;
  for (; m0 + 4 <= m; m0 += 4) dot_rows<4>(w, n, k, x, m0, sums + m0, dtype, isa);
  switch (m - m0) {
    case 3: dot_rows<3>(w, n, k, x, m0, sums + m0, dtype, isa); break;
    case 2: dot_rows<2>(w, n, k, x, m0, sums + m0, dtype, isa); break;
    case 1: dot_rows<1>(w, n, k, x, m0, sums + m0, dtype, isa); break;
    default: break;
  }
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
    const float reciprocal = 1.0f / (nan ? amax : (amax < ABSMAX_FLOOR ? ABSMAX_FLOOR : amax));
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
    const __m512 reciprocal = _mm512_set1_ps(1.0f / (nan ? amax : (amax < ABSMAX_FLOOR ? ABSMAX_FLOOR : amax)));
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
#endif

#if FOURBIT_AMX
// ------------------------------------------------------------------------------- AMX product
//
// bfloat16 inputs on CPUs with AMX. 16 weight rows at a time are decoded (the scaled table
// rounded to bfloat16, as dot_rows_bf16 decodes) one K step of 64 weights after another into
// two tiles that stay in L1, and TDPBF16PS multiplies them with up to 64 input rows at once,
// accumulating in float32; more input rows take further passes. Within a step, K is ordered as
// the packed bytes hold it: the 32 high nibbles (even elements), then the 32 low nibbles (odd
// elements); the inputs are laid out in the same order, so the decode needs no shuffle.

bool amx_supported() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  if (!tiles || !bf16) return false;
  // Linux hands out the tile state only to processes that ask for it (once per process).
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int AMX_ROWS = 16;       // weight rows per group, input rows per input tile
constexpr int STEP = 64;           // weights of a row per K step
constexpr int TILE_BYTES = AMX_ROWS * 64;
constexpr int TILES_PER_PASS = 4;  // input tiles (each with its sums tile) per pass

// Tiles: 0, 1 the decoded step (even, odd elements); 2, 3 an input tile's step (even, odd);
// 4-7 the sums of up to four input tiles. Input tiles hold `columns` rows (all of them when
// there are at most 16, else 16 with the last tile padded with zero rows).
__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles(int64_t columns) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = AMX_ROWS;
    config.colsb[t] = static_cast<uint16_t>(t < 2 ? 64 : 4 * columns);
  }
  _tile_loadconfig(&config);
}

// Rows [r0, r0 + columns) of x (rows past m stay zero) in tile order: per K step, the even then
// the odd tile, each 16 rows of `columns` element pairs.
void amx_inputs(const uint16_t* x, int64_t k, int64_t m, int64_t r0, int64_t columns, uint16_t* out) {
  for (int64_t s = 0; s < k / STEP; ++s)
    for (int parity = 0; parity < 2; ++parity) {
      uint16_t* tile = out + (2 * s + parity) * AMX_ROWS * 2 * columns;
      for (int kk = 0; kk < AMX_ROWS; ++kk)
        for (int64_t i = 0; i < columns && r0 + i < m; ++i) {
          const uint16_t* row = x + (r0 + i) * k + s * STEP + 4 * kk + parity;
          tile[(kk * columns + i) * 2] = row[0];
          tile[(kk * columns + i) * 2 + 1] = row[2];
        }
    }
}

// One step of input tile SUMS - 4 (a tile number: the intrinsics take constants only).
#define FOURBIT_AMX_STEP(SUMS, even, odd, stride) \
  do {                                             \
    _tile_loadd(2, even, stride);                  \
    _tile_dpbf16ps(SUMS, 0, 2);                    \
    _tile_loadd(3, odd, stride);                   \
    _tile_dpbf16ps(SUMS, 1, 3);                    \
  } while (0)

// Weight rows [n0, n0 + 16) against input tiles [t0, t0 + count): the sums of each input tile
// (16 x 16 float32) to `sums`. `scales` holds the 16 rows' block scales; `tiles` is 4 KB.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void amx_pass(
    const Weight& w, int64_t n0, int64_t k, const uint16_t* inputs, int64_t columns, int64_t count,
    const float* scales, uint8_t* tiles, float* sums) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const int64_t blocks = k / w.blocksize, per_block = w.blocksize / STEP, steps = k / STEP;
  const int64_t input_tile = AMX_ROWS * 2 * columns, per_input = steps * 2 * input_tile;  // uint16 elements
  const int stride = static_cast<int>(4 * columns);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t s = 0; s < steps; ++s) {
    uint8_t* step = tiles + (s & 1) * 2 * TILE_BYTES;  // two buffers: a decode need not wait for a load
    for (int r = 0; r < AMX_ROWS; ++r) {
      const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scales[r * blocks + s / per_block]));
      const __m512i doubled = (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);
      const uint8_t* bytes = w.packed + (n0 + r) * k / 2 + s * 32;
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
      _mm512_store_si512(step + r * 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), doubled));
      _mm512_store_si512(step + TILE_BYTES + r * 64, _mm512_permutexvar_epi16(v, doubled));
    }
    _tile_loadd(0, step, 64);
    _tile_loadd(1, step + TILE_BYTES, 64);
    const uint16_t* even = inputs + 2 * s * input_tile;
    FOURBIT_AMX_STEP(4, even, even + input_tile, stride);
    if (count > 1) FOURBIT_AMX_STEP(5, even + per_input, even + per_input + input_tile, stride);
    if (count > 2) FOURBIT_AMX_STEP(6, even + 2 * per_input, even + 2 * per_input + input_tile, stride);
    if (count > 3) FOURBIT_AMX_STEP(7, even + 3 * per_input, even + 3 * per_input + input_tile, stride);
  }
  _tile_stored(4, sums, 64);
  if (count > 1) _tile_stored(5, sums + 256, 64);
  if (count > 2) _tile_stored(6, sums + 512, 64);
  if (count > 3) _tile_stored(7, sums + 768, 64);
}

// The product for weight rows [0, groups * 16) (the caller does the rest).
__attribute__((target("amx-tile,amx-bf16"))) void linear_amx(const Weight& w, int64_t n_out, int64_t groups, int64_t k,
                                                             const uint16_t* x, int64_t m, const void* bias, void* out,
                                                             int32_t threads) {
  const int64_t columns = m < AMX_ROWS ? m : AMX_ROWS, input_tiles = (m + AMX_ROWS - 1) / AMX_ROWS;
  const int64_t per_input = k * columns;  // uint16 elements of one input tile over all steps
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> inputs(static_cast<size_t>(per_input * input_tiles));
  if (columns * input_tiles != m) std::memset(inputs.data(), 0, inputs.size() * sizeof(uint16_t));
  for (int64_t t = 0; t < input_tiles; ++t) amx_inputs(x, k, m, t * AMX_ROWS, columns, inputs.data() + per_input * t);
  const int64_t blocks = k / w.blocksize;
#pragma omp parallel num_threads(threads) if (threads > 1 && groups > 1)
  {
    std::vector<uint8_t, CacheLineAllocator<uint8_t>> tiles(4 * TILE_BYTES);
    std::vector<float> scales(static_cast<size_t>(AMX_ROWS * blocks));
    alignas(64) float sums[TILES_PER_PASS * 256];
    configure_tiles(columns);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = g * AMX_ROWS;
      for (int r = 0; r < AMX_ROWS; ++r) block_scales(w, (n0 + r) * blocks, blocks, scales.data() + r * blocks);
      for (int64_t t0 = 0; t0 < input_tiles; t0 += TILES_PER_PASS) {
        const int64_t count = input_tiles - t0 < TILES_PER_PASS ? input_tiles - t0 : TILES_PER_PASS;
        amx_pass(w, n0, k, inputs.data() + per_input * t0, columns, count, scales.data(), tiles.data(), sums);
        for (int64_t t = 0; t < count; ++t)
          for (int r = 0; r < AMX_ROWS; ++r) {
            const float b = bias ? load_value(bias, n0 + r, BF16) : 0.0f;
            for (int64_t i = 0; i < columns && (t0 + t) * AMX_ROWS + i < m; ++i)
              store_value(out, ((t0 + t) * AMX_ROWS + i) * n_out + n0 + r, sums[t * 256 + r * 16 + i] + b, BF16);
          }
      }
    }
    _tile_release();
  }
}
#endif

}  // namespace

extern "C" {

// Quantize `blocks` whole blocks of `blocksize` (even) values of `dtype` at `x`: packed codes (two
// per byte, the first in the high nibble) and the float32 absmax of each block. `midpoints` are
// the 15 float32 midpoints of the sorted table, `order` maps a sorted position to a code index.
void fourbit_quantize(const void* x, int32_t dtype, int64_t blocks, int64_t blocksize, const float* midpoints,
                      const uint8_t* order, uint8_t* packed, float* absmax, int32_t isa, int32_t threads) {
  const int64_t chunk = blocksize >= 4096 ? 1 : 4096 / blocksize;  // blocks per task
  const int64_t tasks = (blocks + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t first = t * chunk, last = first + chunk < blocks ? first + chunk : blocks;
#if FOURBIT_X86
    if (isa >= AVX512 && blocksize % 16 == 0) {
      if (dtype == F32)
        quantize_blocks_avx512<F32>(x, first, last, blocksize, midpoints, order, packed, absmax);
      else if (dtype == BF16)
        quantize_blocks_avx512<BF16>(x, first, last, blocksize, midpoints, order, packed, absmax);
      else
        quantize_blocks_avx512<F16>(x, first, last, blocksize, midpoints, order, packed, absmax);
      continue;
    }
#endif
    if (dtype == F32)
      quantize_blocks(static_cast<const float*>(x), first, last, blocksize, midpoints, order, packed, absmax,
                      [](float v) { return v; });
    else if (dtype == BF16)
      quantize_blocks(static_cast<const uint16_t*>(x), first, last, blocksize, midpoints, order, packed, absmax,
                      from_bf16);
    else
      quantize_blocks(static_cast<const uint16_t*>(x), first, last, blocksize, midpoints, order, packed, absmax,
                      from_f16);
  }
}

void fourbit_dequantize(const Weight* w, int64_t numel, void* out, int32_t dtype, int32_t isa, int32_t threads);

// The best variant this CPU runs (4 AMX tiles with AVX-512 BF16, 3 AVX-512 with BF16, 2 AVX-512,
// 1 AVX2, 0 portable).
int32_t fourbit_cpu_isa() {
#if FOURBIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    if (!__builtin_cpu_supports("avx512bf16")) return AVX512;
#if FOURBIT_AMX
    static const bool amx = amx_supported();
    if (amx) return AMX;
#endif
    return AVX512_BF16;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
#endif
  return PORTABLE;
}

// Decode elements [first, first + count) of a packed weight into `out` (of `dtype`); `first` is
// a multiple of the blocksize, and the range ends at a block boundary or at the weight's end.
void fourbit_dequantize_range(const Weight* w, int64_t first, int64_t count, void* out, int32_t dtype, int32_t isa,
                              int32_t threads) {
  Weight shifted = *w;
  const int64_t first_block = first / w->blocksize;
  shifted.packed = w->packed + first / 2;
  if (w->absmax) {
    shifted.absmax = w->absmax + first_block;
    fourbit_dequantize(&shifted, count, out, dtype, isa, threads);
    return;
  }
  // nested scales: the kernels index codes by block, so the codes move and the groups stay put;
  // a range that starts inside a group decodes from the group's start into a scratch prefix
  const int64_t group_start = first_block / w->nested_blocksize * w->nested_blocksize;
  shifted.qabsmax = w->qabsmax + group_start;
  shifted.nested_absmax = w->nested_absmax + group_start / w->nested_blocksize;
  shifted.packed = w->packed + group_start * w->blocksize / 2;
  const int64_t skipped = (first_block - group_start) * w->blocksize;
  if (skipped == 0) {
    fourbit_dequantize(&shifted, count, out, dtype, isa, threads);
    return;
  }
  const int64_t size = dtype == F32 ? 4 : 2;
  std::vector<uint8_t> scratch((skipped + count) * size);
  fourbit_dequantize(&shifted, skipped + count, scratch.data(), dtype, isa, threads);
  std::memcpy(out, scratch.data() + skipped * size, count * size);
}

// Decode the first `numel` elements of a packed weight into `out` (of `dtype`).
void fourbit_dequantize(const Weight* w, int64_t numel, void* out, int32_t dtype, int32_t isa, int32_t threads) {
  const int64_t whole = numel / w->blocksize;
  const int64_t chunk = 64;  // blocks per task
  const int64_t tasks = (whole + chunk - 1) / chunk;
  // outputs far larger than the caches are written around them (no read for ownership)
  const bool stream = false;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t first = t * chunk, last = first + chunk < whole ? first + chunk : whole;
    dequantize_blocks(*w, first, last, out, dtype, isa, stream);
  }
#if FOURBIT_X86
  if (stream) _mm_sfence();
#endif
  dequantize_scalar(*w, whole * w->blocksize, numel, out, dtype);
}

// out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for the packed weight W of shape (n_out, k);
// x, out and bias are contiguous rows of `dtype`, float32 accumulation.
void fourbit_linear(const Weight* w, int64_t n_out, int64_t k, const void* x, int64_t m, const void* bias, void* out,
                    int32_t dtype, int32_t isa, int32_t threads) {
  const bool whole_blocks = k % w->blocksize == 0 && w->blocksize % 32 == 0 && k / w->blocksize <= MAX_RUN;
  int64_t first = 0;  // the first weight row left to the vector kernels
#if FOURBIT_AMX
  if (isa == AMX && dtype == BF16 && m >= 2 && whole_blocks && w->blocksize % STEP == 0 && n_out >= AMX_ROWS) {
    const int64_t groups = n_out / AMX_ROWS;
    linear_amx(*w, n_out, groups, k, static_cast<const uint16_t*>(x), m, bias, out, threads);
    first = groups * AMX_ROWS;
    if (first == n_out) return;
  }
#endif
  Inputs inputs;
  if (whole_blocks) {
    inputs.half = k / 2;
    if (isa >= AVX512_BF16 && dtype == BF16 && w->blocksize % 64 == 0) {
      const uint16_t* values = static_cast<const uint16_t*>(x);
      inputs.even16.resize(m * inputs.half);
      inputs.odd16.resize(m * inputs.half);
      for (int64_t i = 0; i < m * inputs.half; ++i) {
        inputs.even16[i] = values[2 * i];
        inputs.odd16[i] = values[2 * i + 1];
      }
    } else {
      inputs.even.resize(m * inputs.half);
      inputs.odd.resize(m * inputs.half);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < inputs.half; ++j) {
          inputs.even[r * inputs.half + j] = load_value(x, r * k + 2 * j, dtype);
          inputs.odd[r * inputs.half + j] = load_value(x, r * k + 2 * j + 1, dtype);
        }
    }
  }
  const int64_t work = n_out * k * (m < 4 ? m : 4);
  const int32_t used = work < (int64_t(1) << 18) ? 1 : threads;  // small products: no parallel region
#pragma omp parallel num_threads(used) if (used > 1)
  {
    std::vector<float> sums(m);
#pragma omp for schedule(static)
    for (int64_t n = first; n < n_out; ++n) {
      if (whole_blocks)
        dot_all_rows(*w, n, k, inputs, m, sums.data(), dtype, isa);
      else
        dot_any(*w, n, k, x, dtype, m, sums.data());
      const float b = bias ? load_value(bias, n, dtype) : 0.0f;
      for (int64_t r = 0; r < m; ++r) store_value(out, r * n_out + n, sums[r] + b, dtype);
    }
  }
}

}  // extern "C"
