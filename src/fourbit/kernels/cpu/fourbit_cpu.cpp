// fourbit's native CPU kernels: 4-bit quantize, dequantize and the fused 4-bit product.
//
// Plain C ABI (called through ctypes), no torch headers: the library compiles in seconds and
// does not depend on torch's C++ ABI. One translation unit holds the variants of each kernel,
// chosen at run time: AMX tiles (bfloat16 products of several rows), AVX-512 with BF16, AVX-512
// (a 16-entry table lookup is one vpermps), AVX2 (two vpermps and a blend) and portable C++.
// Arithmetic follows the reference exactly:
// value = table[index] * scale in float32 (the table's zeros are +0.0), nested scales are
// nested_code[q] * nested_absmax[block / nested_blocksize] + offset, and conversions round to
// nearest even (bfloat16 NaN becomes 0xFFFF, as torch's vectorized conversion writes it).
// Products accumulate in float32; each output element is summed by one thread in a fixed
// order, so results do not depend on the number of threads.
//
// The kernels live in the headers beside this file (one translation unit, so the library
// compiles in one call); this file holds the C entry points.

#include "amx.h"
#include "common.h"
#include "dequantize.h"
#include "product.h"
#include "product_avx2.h"
#include "quantize.h"

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
    const auto by_dtype = [&](auto kernel) {  // kernel(std::integral_constant<int32_t, dtype>)
      if (dtype == F32) return kernel(std::integral_constant<int32_t, F32>{});
      if (dtype == BF16) return kernel(std::integral_constant<int32_t, BF16>{});
      kernel(std::integral_constant<int32_t, F16>{});
    };
    if (isa >= AVX512 && blocksize % 16 == 0) {
      by_dtype([&](auto d) {
        quantize_blocks_avx512<decltype(d)::value>(x, first, last, blocksize, midpoints, order, packed, absmax);
      });
      continue;
    }
    if (isa == AVX2 && blocksize % 16 == 0) {
      by_dtype([&](auto d) {
        quantize_blocks_avx2<decltype(d)::value>(x, first, last, blocksize, midpoints, order, packed, absmax);
      });
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

// fourbit_dequantize_range's values rounded to `dtype` (bfloat16 or float16), as the reference
// decodes them, written as float32: the many-rows product multiplies them in float32 where torch
// has no GEMM of that dtype. Each thread decodes runs of whole (nested) absmax groups into a
// buffer that stays in its caches and widens them from there, instead of a second pass over a
// 16-bit copy of the range.
// Elements a thread of fourbit_dequantize_range_widened decodes at once: 32 KB of 16-bit values,
// one nested group of blocksize 64.
constexpr int64_t WIDEN_RUN = 16384;

void fourbit_dequantize_range_widened(const Weight* w, int64_t first, int64_t count, float* out, int32_t dtype,
                                      int32_t isa, int32_t threads) {
  const int64_t unit = w->blocksize * (w->absmax ? 1 : w->nested_blocksize);
  const int64_t run = std::max(unit, WIDEN_RUN / unit * unit);  // elements a thread decodes at once
  const int64_t runs = (count + run - 1) / run;
#pragma omp parallel num_threads(threads) if (threads > 1 && runs > 1)
  {
    std::vector<uint16_t> staged(std::min(run, count));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < runs; ++i) {
      const int64_t start = i * run, size = std::min(run, count - start);
      fourbit_dequantize_range(w, first + start, size, staged.data(), dtype, isa, 1);
      widen(staged.data(), size, out + start, dtype, isa);
    }
  }
}

// Decode the first `numel` elements of a packed weight into `out` (of `dtype`).
void fourbit_dequantize(const Weight* w, int64_t numel, void* out, int32_t dtype, int32_t isa, int32_t threads) {
  float table[16];
  const Weight clean = with_clean_table(*w, table);
  w = &clean;
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
// x, out and bias are contiguous rows of `dtype`, float32 accumulation. F32_BF16: float32 rows
// whose inputs and weights the AVX512-BF16 kernels round to bfloat16 (one product each, as
// torch's "medium" precision allows); AMX tiles split them into three bfloat16 products, as for
// F32, and other kernels multiply in float32.
void fourbit_linear(const Weight* w, int64_t n_out, int64_t k, const void* x, int64_t m, const void* bias, void* out,
                    int32_t dtype, int32_t isa, int32_t threads) {
  float table[16];
  const Weight clean = with_clean_table(*w, table);
  w = &clean;
  const bool bf16_parts = dtype == F32_BF16;
  if (bf16_parts) dtype = F32;
  const bool whole_blocks = k % w->blocksize == 0 && w->blocksize % 32 == 0 && k / w->blocksize <= MAX_RUN;
  int64_t first = 0;  // the first weight row left to the vector kernels
#if FOURBIT_AMX
  if (isa == AMX && (dtype == BF16 || dtype == F32) && m >= AMX_MIN_ROWS[dtype] && whole_blocks &&
      w->blocksize % STEP == 0 && n_out >= AMX_ROWS) {
    const int64_t groups = n_out / AMX_ROWS;
    linear_amx(*w, n_out, groups, k, x, m, bias, out, dtype, threads);
    first = groups * AMX_ROWS;
    if (first == n_out) return;
  }
#endif
  Inputs inputs;
  if (whole_blocks) {
    inputs.half = k / 2;
    if (isa >= AVX512_BF16 && (dtype == BF16 || bf16_parts) && w->blocksize % 64 == 0) {
      const int64_t stride = inputs.stride = padded_row(inputs.half, sizeof(uint16_t));
      inputs.even16.resize(m * stride);
      inputs.odd16.resize(m * stride);
      const float* parts = static_cast<const float*>(x);
      const uint16_t* values = static_cast<const uint16_t*>(x);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0, i = r * k; j < inputs.half; ++j, i += 2) {
          inputs.even16[r * stride + j] = bf16_parts ? to_bf16(parts[i]) : values[i];
          inputs.odd16[r * stride + j] = bf16_parts ? to_bf16(parts[i + 1]) : values[i + 1];
        }
    } else if (isa == AVX2 && (dtype == BF16 || dtype == F16)) {
      const int64_t stride = inputs.stride = padded_row(k, sizeof(float));
      inputs.grouped.resize(m * stride);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < k; ++j)
          inputs.grouped[r * stride + j] = load_value(x, r * k + j / 32 * 32 + grouped_position(j % 32, dtype), dtype);
    } else {
      const int64_t stride = inputs.stride = padded_row(inputs.half, sizeof(float));
      inputs.even.resize(m * stride);
      inputs.odd.resize(m * stride);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < inputs.half; ++j) {
          inputs.even[r * stride + j] = load_value(x, r * k + 2 * j, dtype);
          inputs.odd[r * stride + j] = load_value(x, r * k + 2 * j + 1, dtype);
        }
    }
  }
  const int64_t work = n_out * k * (m < 4 ? m : 4);
  const int32_t used = work < (int64_t(1) << 18) ? 1 : threads;  // small products: no parallel region
  // the vector kernels of AVX-512 take four weight rows a pass: bfloat16 with AVX512-BF16
  // (dot_row_bf16 for one input row, dot_all_rows_bf16 for more), float32 sums otherwise (float32
  // and float16 inputs, bfloat16 without AVX512-BF16: dot_all_rows_avx512)
  const bool bf16_rows = whole_blocks && !inputs.even16.empty();
  const bool fours = whole_blocks && !inputs.even.empty() && isa >= AVX512;
  // (from eight bfloat16 rows, two: passes of eight input rows then fit the registers, and
  // measured 4-10% faster at 8 rows for K up to 3584, 5% slower at 4096)
  // AVX2: two weight rows a pass, float32 rows (dot_all_rows_avx2) or 16-bit ones (dot_all_rows_avx2_16)
  const bool avx2 = whole_blocks && !inputs.even.empty() && isa == AVX2;
  const bool avx2_16 = whole_blocks && !inputs.grouped.empty();
  const int64_t together = bf16_rows && m >= 8 ? 2 : bf16_rows || fours ? 4 : avx2 || avx2_16 ? 2 : 1;
  // the packed bytes of rows `ahead` further on are asked for while a row is read (the hardware
  // prefetchers stop at page boundaries and start late on each thread's run of rows): whole
  // groups of `together` rows, at least PREFETCH_AHEAD_BYTES ahead. A product of one or two
  // bfloat16 rows whose weight comes from memory (a model's, every token) waited on it with
  // prefetches into L1; into L2 only it does not (2 Zen 4 cores, 4096x4096 read from memory:
  // 1 row 410 -> 305 us, 2 rows 420 -> 366; 11008x4096 1108 -> 826 and 1085 -> 980; from L3
  // unchanged). From four rows, and in float32, the products take longer than the memory and
  // prefetches into L1 measured the same or faster.
  inputs.prefetch_l2 = bf16_rows && m <= PREFETCH_L2_MAX_ROWS;
  const int64_t row_bytes = (k + 1) / 2, group_bytes = together * row_bytes;
  const int64_t reach = inputs.prefetch_l2 ? PREFETCH_L2_AHEAD_BYTES : PREFETCH_AHEAD_BYTES;
  const int64_t ahead = (reach + group_bytes - 1) / group_bytes;
  inputs.ahead = ahead * group_bytes;
#pragma omp parallel num_threads(used) if (used > 1)
  {
    std::vector<float> sums(together * m);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < (n_out - first + together - 1) / together; ++i) {
      const int64_t n = first + i * together, rows = n_out - n < together ? n_out - n : together;
      if (!whole_blocks)  // the vector kernels prefetch as they read (prefetch_block)
        for (int64_t j = 0; j < rows; ++j)
          if (n + j + ahead < n_out) prefetch_bytes(w->packed + (n + j + ahead) * k / 2, row_bytes);
#if FOURBIT_X86
      if (bf16_rows && m == 1)
        dispatch_weights(rows, [&](auto weights) { dot_row_bf16<decltype(weights)::value>(*w, n, k, inputs, sums.data()); });
      else if (bf16_rows)
        dispatch_weights(rows, [&](auto weights) { dot_all_rows_bf16<decltype(weights)::value>(*w, n, k, inputs, m, sums.data()); });
      else if (fours)
        dispatch_weights(rows, [&](auto weights) {
          dot_all_rows_avx512<decltype(weights)::value>(*w, n, k, inputs, m, sums.data(), dtype);
        });
      else if (avx2)
        dispatch_weights<2>(rows, [&](auto weights) {
          dot_all_rows_avx2<decltype(weights)::value>(*w, n, k, inputs, m, sums.data());
        });
      else if (avx2_16)
        dispatch_weights<2>(rows, [&](auto weights) {
          dot_all_rows_avx2_16<decltype(weights)::value>(*w, n, k, inputs, m, sums.data(), dtype);
        });
      else
#endif
          if (whole_blocks)
        dot_all_rows(*w, n, k, inputs, m, sums.data(), dtype);
      else
        dot_any(*w, n, k, x, dtype, m, sums.data());
      for (int64_t j = 0; j < rows; ++j) {
        const float b = bias ? load_value(bias, n + j, dtype) : 0.0f;
        for (int64_t r = 0; r < m; ++r) store_value(out, r * n_out + n + j, sums[j * m + r] + b, dtype);
      }
    }
  }
}

}  // extern "C"
