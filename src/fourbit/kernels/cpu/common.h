// What every kernel shares: the dtype and variant codes, the packed weight, block scales, the
// float16/bfloat16 conversions and element access, and cache-line aligned buffers.

#pragma once

#include <algorithm>
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

// F32_BF16: float32 inputs and outputs whose products may use bfloat16 parts (the product's own
// code, as torch allows at the "medium" float32 matmul precision; never a tensor's dtype)
enum Dtype : int32_t { F32 = 0, BF16 = 1, F16 = 2, F32_BF16 = 3 };
enum Isa : int32_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };

// The smallest absmax a quantize divides by (reference.ABSMAX_FLOOR): all-zero blocks code to zero.
constexpr float ABSMAX_FLOOR = 1e-38f;

// What a block's values are multiplied by (reference.absmax_reciprocal): 1 / max(amax, ABSMAX_FLOOR),
// NaN kept, and 0 for an all-zero block, which then codes to zero where denormals are flushed
// (torch.set_flush_denormal(True)) and the floor itself reads as 0.
inline float absmax_reciprocal(float amax) {
  if (amax != amax) return amax;
  if (amax == 0.0f) return 0.0f;
  return 1.0f / (amax < ABSMAX_FLOOR ? ABSMAX_FLOOR : amax);
}

// Blocks handled in one run (a dequantize task; the blocks of a weight row in a product).
constexpr int64_t MAX_RUN = 512;

// One packed weight: the packed bytes, the 16-entry float32 table and its statistics.
struct Weight {
  const uint8_t* packed;
  const float* table;          // 16 entries (the entry points make its zeros +0.0)
  const float* absmax;         // float32 scale per block, or null when nested
  const uint8_t* qabsmax;      // nested: 8-bit codes of the scales
  const float* nested_code;    // nested: 256-entry table
  const float* nested_absmax;  // nested: one scale per nested block
  const float* offset;         // nested: added to every decoded scale
  int64_t nested_blocksize;
  int64_t blocksize;
};

// `w` reading its 16-entry table from `table`, a copy with every zero as +0.0, as the reference's
// decode table has them (FP4's -0 code decodes as +0): callers may pass the code table itself.
inline Weight with_clean_table(const Weight& w, float* table) {
  for (int j = 0; j < 16; ++j) table[j] = w.table[j] == 0.0f ? 0.0f : w.table[j];
  Weight clean = w;
  clean.table = table;
  return clean;
}

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

#if FOURBIT_X86
// Sixteen entries of the 256-entry table t[0..15] (sixteen floats each) at codes 0-255: four
// two-table permutes by the low five bits, then the three high bits pick among them. A gather took
// a third longer on a Zen 4 core, where it is the slowest part of a row's scales.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 lookup_256(__m512i codes,
                                                                                             const __m512* t) {
  const __mmask16 bit5 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(32));
  const __mmask16 bit6 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(64));
  const __mmask16 bit7 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(128));
  __m512 quarter[4];
  for (int j = 0; j < 4; ++j)
    quarter[j] = _mm512_mask_blend_ps(bit5, _mm512_permutex2var_ps(t[4 * j], codes, t[4 * j + 1]),
                                      _mm512_permutex2var_ps(t[4 * j + 2], codes, t[4 * j + 3]));
  return _mm512_mask_blend_ps(bit7, _mm512_mask_blend_ps(bit6, quarter[0], quarter[1]),
                              _mm512_mask_blend_ps(bit6, quarter[2], quarter[3]));
}

// Eight entries of the 16-entry table (low = entries 0-7, high = 8-15) at the nibbles in the low
// four bits of each index; higher bits are ignored (vpermps reads the low three, and the blend
// takes bit 3 shifted to the sign), so a low nibble needs no mask.
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 lookup_avx2(__m256i index, __m256 low,
                                                                                  __m256 high) {
  const __m256 a = _mm256_permutevar8x32_ps(low, index), b = _mm256_permutevar8x32_ps(high, index);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

// block_scales, sixteen nested scales at a time, with the same two roundings (the nested table
// has 256 entries: NativeWeight pads shorter ones).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void block_scales_avx512(const Weight& w, int64_t first,
                                                                             int64_t count, float* out) {
  if (w.absmax) {
    std::memcpy(out, w.absmax + first, count * sizeof(float));
    return;
  }
  __m512 table[16];
  for (int j = 0; j < 16; ++j) table[j] = _mm512_loadu_ps(w.nested_code + 16 * j);
  const __m512 offset = _mm512_set1_ps(*w.offset);
  for (int64_t i = 0; i < count;) {
    const int64_t group = (first + i) / w.nested_blocksize;
    const int64_t end = std::min(count, (group + 1) * w.nested_blocksize - first);  // this group's last
    const __m512 scale = _mm512_set1_ps(w.nested_absmax[group]);
    for (; i < end; i += 16) {
      const __mmask16 mask = end - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - i)) - 1);
      const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, w.qabsmax + first + i));
      const __m512 decoded = lookup_256(codes, table);
      _mm512_mask_storeu_ps(out + i, mask, _mm512_add_ps(_mm512_mul_ps(decoded, scale), offset));
    }
    i = end;
  }
}

// block_scales, eight nested scales at a time (a gather from the 256-entry nested table), with the
// same two roundings.
__attribute__((target("avx2,fma,f16c"))) void block_scales_avx2(const Weight& w, int64_t first, int64_t count,
                                                                float* out) {
  if (w.absmax) {
    std::memcpy(out, w.absmax + first, count * sizeof(float));
    return;
  }
  const __m256 offset = _mm256_set1_ps(*w.offset);
  for (int64_t i = 0; i < count;) {
    const int64_t group = (first + i) / w.nested_blocksize;
    const int64_t end = std::min(count, (group + 1) * w.nested_blocksize - first);  // this group's last
    const __m256 scale = _mm256_set1_ps(w.nested_absmax[group]);
    for (; i + 8 <= end; i += 8) {
      const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.qabsmax + first + i)));
      const __m256 decoded = _mm256_i32gather_ps(w.nested_code, codes, 4);
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(decoded, scale), offset));
    }
    for (; i < end; ++i) out[i] = block_scale(w, first + i);
  }
}

#endif

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

// Ask for the bytes [p, p + bytes) in the caches ahead of their use: a model reads each weight
// once per token, from memory. Only a hint (never a fault), portable across GCC and clang.
inline void prefetch_bytes(const uint8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

// Packed bytes ahead of the weight row being read that the vector products prefetch (a few rows of
// small K, one of large): measured inside transformers' generate, see fourbit_linear. Prefetches
// into L2 reach further (PREFETCH_L2_AHEAD_BYTES).
constexpr int64_t PREFETCH_AHEAD_BYTES = 2048;
constexpr int64_t PREFETCH_L2_AHEAD_BYTES = 4096;
// __builtin_prefetch's locality for prefetches into L1 (prefetcht0) and into L2 only (prefetcht1).
// A template argument, not a runtime choice: GCC 12 dropped every prefetch of a kernel whose
// locality depended on a flag.
constexpr int PREFETCH_L1 = 3, PREFETCH_L2 = 2;

// One prefetch per 64 packed bytes read, `ahead` bytes past block b's `step` bytes at `bytes`:
// spread over the row, where asking for a whole row before it (32 prefetches at once for 4096
// weights) cost a Zen 4 core 8% of a one-row product whose weight sat in L3.
template <int LOCALITY = PREFETCH_L1>
inline void prefetch_block(const uint8_t* bytes, int64_t step, int64_t b, int64_t ahead) {
  if (step >= 64) {
    for (int64_t j = 0; j < step; j += 64) __builtin_prefetch(bytes + ahead + j, 0, LOCALITY);
  } else if (((b * step) & 63) == 0) {
    __builtin_prefetch(bytes + ahead, 0, LOCALITY);
  }
}

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

}  // namespace
