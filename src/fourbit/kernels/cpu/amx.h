// The product of several bfloat16 rows on AMX tiles.

#pragma once

#include "common.h"

namespace {

#if FOURBIT_AMX
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
// Input rows from which the tile unit pays, by dtype (F32, BF16): one bfloat16 row decodes as fast
// in vector registers; float32 rows cost three tile products each (4096x4096, 2 cores).
constexpr int64_t AMX_MIN_ROWS[2] = {4, 2};

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

// K step s of rows [r0, r0 + columns) of x (rows past m are left as they are: zero) in tile order:
// the even then the odd tile, each 16 rows of `columns` element pairs, pair kk of input row i
// (elements 4 kk + parity and 4 kk + 2 + parity of the step) at pair kk * columns + i. A row's
// step is split into its even and odd elements in two permutes, whose 16 pairs each are
// scattered down a column of their tile.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void amx_inputs_step(const uint16_t* x, int64_t k,
                                                                                   int64_t m, int64_t r0,
                                                                                   int64_t columns, int64_t s,
                                                                                   uint16_t* out) {
  alignas(64) static constexpr uint16_t EVEN[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                    32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i even_index = _mm512_load_si512(EVEN), odd_index = _mm512_add_epi16(even_index, _mm512_set1_epi16(1));
  const __m512i pairs = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(columns)));
  uint16_t* even_tile = out + 2 * s * AMX_ROWS * 2 * columns;
  uint16_t* odd_tile = even_tile + AMX_ROWS * 2 * columns;
  for (int64_t i = 0; i < columns && r0 + i < m; ++i) {
    const uint16_t* row = x + (r0 + i) * k + s * STEP;
    const __m512i low = _mm512_loadu_si512(row), high = _mm512_loadu_si512(row + 32);
    _mm512_i32scatter_epi32(even_tile + 2 * i, pairs, _mm512_permutex2var_epi16(low, even_index, high), 4);
    _mm512_i32scatter_epi32(odd_tile + 2 * i, pairs, _mm512_permutex2var_epi16(low, odd_index, high), 4);
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

// The same for float32 products split in bfloat16 pairs (tiles 0, 1: the weights' high and low
// parts; 2, 3: the inputs'): high x high + high x low + low x high.
#define FOURBIT_AMX_SPLIT_STEP(SUMS, high, low, stride) \
  do {                                                   \
    _tile_loadd(2, high, stride);                        \
    _tile_loadd(3, low, stride);                         \
    _tile_dpbf16ps(SUMS, 0, 2);                          \
    _tile_dpbf16ps(SUMS, 0, 3);                          \
    _tile_dpbf16ps(SUMS, 1, 2);                          \
  } while (0)

// A block's 16 scaled weights as bfloat16, twice over (vpermw picks with 5 index bits); with
// `low`, also what the bfloat16 values miss of the float32 ones (zero where they are not finite).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline __m512i scaled_table(
    __m512 table, float scale, __m512i* low) {
  const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scale));
  const __m512i high = (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);
  if (low) {
    const __m512 widened = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(high)), 16));
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(widened), _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
    const __m512 rest = _mm512_maskz_sub_ps(finite, scaled, widened);
    *low = (__m512i)_mm512_cvtne2ps_pbh(rest, rest);
  }
  return high;
}

// Weight rows [n0, n0 + 16) against input tiles [t0, t0 + count): the sums of each input tile
// (16 x 16 float32) to `sums`. `scales` holds the 16 rows' block scales; `tiles` is 8 KB. With
// `low_inputs` (float32 inputs), the products are split in bfloat16 pairs. `next` (or null):
// packed bytes to prefetch, the 16 rows the caller takes next (one contiguous run), spread over
// the steps, as a weight read once per model step comes from memory and the hardware
// prefetchers do not follow 16 rows read 32 bytes at a time.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void amx_pass(
    const Weight& w, int64_t n0, int64_t k, const uint16_t* inputs, const uint16_t* low_inputs, int64_t columns,
    int64_t count, const float* scales, uint8_t* tiles, float* sums, const uint8_t* next) {
  const __m512 table = _mm512_loadu_ps(w.table);
  const bool split = low_inputs != nullptr;
  const int64_t blocks = k / w.blocksize, per_block = w.blocksize / STEP, steps = k / STEP;
  const int64_t input_tile = AMX_ROWS * 2 * columns, per_input = steps * 2 * input_tile;  // uint16 elements
  const int stride = static_cast<int>(4 * columns);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t s = 0; s < steps; ++s) {
    if (next)  // a step reads 16 x 32 bytes: prefetch as many of the next rows
      for (int line = 0; line < AMX_ROWS * 32 / 64; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + s * AMX_ROWS * 32 + line * 64), _MM_HINT_T0);
    // two buffers of four tiles: a decode need not wait for the loads of the step before
    uint8_t* step = tiles + (s & 1) * 4 * TILE_BYTES;
    for (int r = 0; r < AMX_ROWS; ++r) {
      __m512i low_table;
      const __m512i high_table = scaled_table(table, scales[r * blocks + s / per_block], split ? &low_table : nullptr);
      const uint8_t* bytes = w.packed + (n0 + r) * k / 2 + s * 32;
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
      const __m512i high_nibbles = _mm512_srli_epi16(v, 4);
      _mm512_store_si512(step + r * 64, _mm512_permutexvar_epi16(high_nibbles, high_table));
      _mm512_store_si512(step + TILE_BYTES + r * 64, _mm512_permutexvar_epi16(v, high_table));
      if (split) {
        _mm512_store_si512(step + 2 * TILE_BYTES + r * 64, _mm512_permutexvar_epi16(high_nibbles, low_table));
        _mm512_store_si512(step + 3 * TILE_BYTES + r * 64, _mm512_permutexvar_epi16(v, low_table));
      }
    }
    const uint16_t* even = inputs + 2 * s * input_tile;
    if (!split) {
      _tile_loadd(0, step, 64);
      _tile_loadd(1, step + TILE_BYTES, 64);
      FOURBIT_AMX_STEP(4, even, even + input_tile, stride);
      if (count > 1) FOURBIT_AMX_STEP(5, even + per_input, even + per_input + input_tile, stride);
      if (count > 2) FOURBIT_AMX_STEP(6, even + 2 * per_input, even + 2 * per_input + input_tile, stride);
      if (count > 3) FOURBIT_AMX_STEP(7, even + 3 * per_input, even + 3 * per_input + input_tile, stride);
      continue;
    }
    const uint16_t* low_even = low_inputs + 2 * s * input_tile;
    for (int parity = 0; parity < 2; ++parity) {
      _tile_loadd(0, step + parity * TILE_BYTES, 64);
      _tile_loadd(1, step + (2 + parity) * TILE_BYTES, 64);
      const uint16_t* high = even + parity * input_tile;
      const uint16_t* low = low_even + parity * input_tile;
      FOURBIT_AMX_SPLIT_STEP(4, high, low, stride);
      if (count > 1) FOURBIT_AMX_SPLIT_STEP(5, high + per_input, low + per_input, stride);
      if (count > 2) FOURBIT_AMX_SPLIT_STEP(6, high + 2 * per_input, low + 2 * per_input, stride);
      if (count > 3) FOURBIT_AMX_SPLIT_STEP(7, high + 3 * per_input, low + 3 * per_input, stride);
    }
  }
  _tile_stored(4, sums, 64);
  if (count > 1) _tile_stored(5, sums + 256, 64);
  if (count > 2) _tile_stored(6, sums + 512, 64);
  if (count > 3) _tile_stored(7, sums + 768, 64);
}

// bfloat16 parts of float32 inputs: the nearest bfloat16 and the nearest to what it misses
// (zero where the first is not finite).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void split_inputs(const float* x, int64_t n,
                                                                                          uint16_t* high,
                                                                                          uint16_t* low) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    const __m512 widened = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(widened), _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + i), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, v, widened)));
  }
  for (; i < n; ++i) {
    high[i] = to_bf16(x[i]);
    const float widened = from_bf16(high[i]);
    low[i] = widened - widened == 0.0f ? to_bf16(x[i] - widened) : 0;
  }
}

// An input tile's sums (16 weight rows x `columns` input rows, float32, a weight row per tile row)
// plus the 16 weight rows' `biases`, to rows [row0, row0 + columns) of `out` (those below `m`),
// columns [n0, n0 + 16), rounded as store_value rounds (`dtype` BF16 or F32, the tile unit's
// outputs). One input row at a time: a column of the
// tile gathered, 16 outputs written at once; element by element, the stores of 16 weight rows
// went n_out elements apart, which a power-of-two n_out sends to one L1 set (4096x4096 at 64
// rows spent 40% of its time there).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store_sums(
    const float* sums, __m512 biases, int64_t row0, int64_t columns, int64_t m, int64_t n0, int64_t n_out, void* out,
    int32_t dtype) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  for (int64_t i = 0; i < columns && row0 + i < m; ++i) {
    const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, sums + i, 4), biases);
    const int64_t at = (row0 + i) * n_out + n0;
    if (dtype == F32) {
      _mm512_storeu_ps(static_cast<float*>(out) + at, v);
      continue;
    }
    // to_bf16: round to nearest even, NaN as 0xFFFF
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + at), _mm512_cvtepi32_epi16(rounded));
  }
}

// The product for weight rows [0, groups * 16) (the caller does the rest); `dtype` BF16, or F32
// (products split in bfloat16 pairs).
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq"))) void linear_amx(
    const Weight& w, int64_t n_out, int64_t groups, int64_t k, const void* x, int64_t m, const void* bias, void* out,
    int32_t dtype, int32_t threads) {
  const int64_t columns = m < AMX_ROWS ? m : AMX_ROWS, input_tiles = (m + AMX_ROWS - 1) / AMX_ROWS;
  const int64_t per_input = k * columns;  // uint16 elements of one input tile over all steps
  const bool split = dtype == F32;
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> inputs(static_cast<size_t>(per_input * input_tiles));
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> low_inputs(split ? inputs.size() : 0);
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> high_x(split ? m * k : 0), low_x(split ? m * k : 0);
  if (split) split_inputs(static_cast<const float*>(x), m * k, high_x.data(), low_x.data());
  const uint16_t* x16 = split ? high_x.data() : static_cast<const uint16_t*>(x);
  if (columns * input_tiles != m) {
    std::memset(inputs.data(), 0, inputs.size() * sizeof(uint16_t));
    std::memset(low_inputs.data(), 0, low_inputs.size() * sizeof(uint16_t));
  }
  const int64_t steps = k / STEP;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m * k >= (int64_t(1) << 16))
  for (int64_t job = 0; job < input_tiles * steps; ++job) {
    const int64_t t = job / steps, s = job % steps;
    amx_inputs_step(x16, k, m, t * AMX_ROWS, columns, s, inputs.data() + per_input * t);
    if (split) amx_inputs_step(low_x.data(), k, m, t * AMX_ROWS, columns, s, low_inputs.data() + per_input * t);
  }
  const int64_t blocks = k / w.blocksize;
#pragma omp parallel num_threads(threads) if (threads > 1 && groups > 1)
  {
    std::vector<uint8_t, CacheLineAllocator<uint8_t>> tiles(8 * TILE_BYTES);
    std::vector<float> scales(static_cast<size_t>(AMX_ROWS * blocks));
    alignas(64) float sums[TILES_PER_PASS * 256];
    configure_tiles(columns);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = g * AMX_ROWS;
      for (int r = 0; r < AMX_ROWS; ++r) block_scales_avx512(w, (n0 + r) * blocks, blocks, scales.data() + r * blocks);
      alignas(64) float group_bias[AMX_ROWS];
      for (int r = 0; r < AMX_ROWS; ++r) group_bias[r] = bias ? load_value(bias, n0 + r, dtype) : 0.0f;
      const __m512 biases = _mm512_load_ps(group_bias);
      for (int64_t t0 = 0; t0 < input_tiles; t0 += TILES_PER_PASS) {
        const int64_t count = input_tiles - t0 < TILES_PER_PASS ? input_tiles - t0 : TILES_PER_PASS;
        const uint8_t* next = t0 == 0 && g + 1 < groups ? w.packed + (n0 + AMX_ROWS) * k / 2 : nullptr;
        amx_pass(w, n0, k, inputs.data() + per_input * t0, split ? low_inputs.data() + per_input * t0 : nullptr,
                 columns, count, scales.data(), tiles.data(), sums, next);
        for (int64_t t = 0; t < count; ++t)
          store_sums(sums + t * 256, biases, (t0 + t) * AMX_ROWS, columns, m, n0, n_out, out, dtype);
      }
    }
    _tile_release();
  }
}
#endif

}  // namespace
