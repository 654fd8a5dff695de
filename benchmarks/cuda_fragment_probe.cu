// A CUDA C++ form of the fragment kernel (few-row products on mma.sync), for measurement only:
// benchmarks/cuda_fragment_probe.py compiles it at run time by NVRTC and times it beside the
// Triton kernel and cuBLAS. Same algorithm as src/fourbit/kernels/triton/fragments.py: each lane
// reads 8 bytes of weight rows g and g + 8 a 64-column step, looks each byte up in a shared table
// of code pairs (one column per lane, so a warp's lookups never share a bank) and scales a step's
// products once per row. What Triton does not let a kernel say: packed words and statistics held
// DEPTH groups of four steps ahead in registers, one pipeline running through all of a persistent
// block's row blocks, and lookup offsets made by one byte permute in a spread table (SPREAD).
// NF4/FP4 bytes in bitsandbytes' rows or fourbit.layout's tiles, blocksize 64, K a multiple of
// 256 * KSPLIT, N of 16 * GROUPS, bf16 inputs and outputs; no headers, so NVRTC alone compiles it.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct __align__(8) Words2 { u32 x, y; };
struct __align__(16) Words4 { u32 x, y, z, w; };

// A weight load: through the non-coherent path (LDG.CONSTANT), or with -DPLAIN_LOADS a plain one
// (measured alike).
__device__ __forceinline__ Words2 weight_load(const Words2* p) {
#ifdef PLAIN_LOADS
  Words2 r;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
#else
  return *p;
#endif
}

__device__ __forceinline__ u16 to_bf16(float v) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1, bool first) {
  if (first) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.0f));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Byte b of word, as a spread table's offset: value x 256 + lane x 4 (lane4's byte 1 is zero).
__device__ __forceinline__ u32 spread_offset(u32 word, u32 lane4, int b) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(word), "r"(lane4), "r"(0x5504 | (b << 4)));
  return r;
}

// The 16 codes' bf16 values as byte planes: byte j of high[i] is the high byte of code 4 i + j,
// of low[i] its low byte.
struct Planes {
  u32 high[4], low[4];
};

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 selector) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

// The four code pairs of a packed word (byte b: its high nibble's code in the low half) by byte
// permutes, no shared memory: per half word, each nibble's low three bits pick a byte among codes
// 0-7 and 8-15, its top bit one of the two, and two permutes interleave high and low bytes.
__device__ __forceinline__ void decode_word(u32 word, const Planes& p, u32 (&pairs)[4]) {
  u32 low3 = word & 0x77777777u;
  u32 top = ((word >> 1) & 0x44444444u) | 0x3210u;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const u32 hi = prmt(prmt(p.high[0], p.high[1], low3), prmt(p.high[2], p.high[3], low3), top);
    const u32 lo = prmt(prmt(p.low[0], p.low[1], low3), prmt(p.low[2], p.low[3], low3), top);
    pairs[2 * half] = prmt(lo, hi, 0x4051);
    pairs[2 * half + 1] = prmt(lo, hi, 0x6273);
    low3 >>= 16;
    top = (top >> 16) | 0x3210u;
  }
}

// TILES: 8 input rows each (1: M <= 8, 2: M <= 16). KSPLIT warps share a 16-row group's K,
// GROUPS row groups a block. DEPTH: groups of four steps whose words are in flight. WARPS: the
// warps a multiprocessor should hold (which caps the registers). SPREAD: table rows of 256 bytes
// (64 KiB), whose lookup offsets take one byte permute, against 128 (32 KiB). ALU: how many of a
// lane's four words a step (row g + 8's last, then its first) are decoded by byte permutes
// (decode_word) instead of lookups, moving work from the shared-memory pipe to the integer one.
// TILED: the packed bytes in fourbit.layout's tiles (a row group's 64-column step is 512
// contiguous bytes: rows 0-7 then 8-15, four 8-byte words a row) instead of bitsandbytes' rows.
template <int TILES, int KSPLIT, int GROUPS, int DEPTH, int WARPS, int ALU, bool SPREAD, bool TILED, bool NESTED>
__global__ void __launch_bounds__(32 * KSPLIT * GROUPS, (WARPS / (KSPLIT * GROUPS)) > 0 ? WARPS / (KSPLIT * GROUPS) : 1)
fragment_probe(const u16* __restrict__ x, const u8* __restrict__ w, const u8* __restrict__ absmax_codes,
               const float* __restrict__ absmax_plain, const float* __restrict__ code,
               const float* __restrict__ nested_code, const float* __restrict__ nested_absmax,
               const float* __restrict__ nested_offset, u16* __restrict__ out, int M, int N, int K) {
  constexpr int THREADS = 32 * KSPLIT * GROUPS;
  extern __shared__ __align__(16) u32 table[];  // SPREAD ? 256 x 64 : 256 x 32 words
  constexpr int ROW_WORDS = SPREAD ? 64 : 32;
  __shared__ float codes2[256];
  __shared__ float parts[KSPLIT > 1 ? GROUPS * (KSPLIT - 1) * 4 * TILES * 32 : 1];  // parts 1 ..
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  for (int i = tid; i < 256 * 8; i += THREADS) {  // value i / 8, lanes 4 (i % 8) .. + 3
    const int v = i >> 3;
    const u32 pair = (u32)to_bf16(code[v >> 4]) | ((u32)to_bf16(code[v & 15]) << 16);
    reinterpret_cast<Words4*>(table + v * ROW_WORDS)[i & 7] = Words4{pair, pair, pair, pair};
  }
  if (NESTED)
    for (int i = tid; i < 256; i += THREADS) codes2[i] = nested_code[i];
  __syncthreads();

  const int group = warp / KSPLIT, part = warp % KSPLIT;
  const int row_blocks = N / (16 * GROUPS);
  const int k_warp = K / KSPLIT, k0 = part * k_warp, groups = k_warp / 256;
  const int blocks_per_row = K / 64;
  // One pipeline runs through all of this block's row blocks: unit q is group q % groups of the
  // block's row block q / groups, so the loads of the next row block start before this one ends.
  const int mine = (row_blocks - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
  const int units = mine * groups;
  const float offset = NESTED ? nested_offset[0] : 0.0f;
  const u32* table_lane = table + lane;
  const u8* table_bytes = reinterpret_cast<const u8*>(table);
  const u32 lane4 = 4 * lane;
  // the code pair of byte b of word, from the table
  auto lookup = [&](u32 word, int b) -> u32 {
    if (SPREAD)  // one byte permute makes the offset: value x 256 + lane x 4
      return *reinterpret_cast<const u32*>(table_bytes + spread_offset(word, lane4, b));
    return table_lane[((word >> (8 * b)) & 255) * 32];
  };
  Planes planes;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    planes.high[i] = planes.low[i] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 value = to_bf16(code[4 * i + j]);
      planes.high[i] |= (value >> 8) << (8 * j);
      planes.low[i] |= (value & 255) << (8 * j);
    }
  }

  // Where the loads of a unit start: row g's words and absmax block. Units are counted by (item,
  // group) pairs, not divided, and a cursor moves by constants inside a row block.
  struct Cursor {
    const Words2* words;
    size_t block;
  };
  // step s of rows g and g + 8: in rows 32 bytes each, this lane's 8 at 8 t; tiled, 512 bytes
  // (64 words) of which this lane's are words 4 g + t and 32 + 4 g + t
  constexpr int STEP_WORDS = TILED ? 64 : 4;
  const size_t row_h_words = TILED ? 32 : (size_t)8 * (K / 16), row_h_blocks = (size_t)8 * blocks_per_row;
  auto first_row = [&](int item) { return (((int)blockIdx.x + item * (int)gridDim.x) * GROUPS + group) * 16 + g; };
  auto cursor_at = [&](int item) {
    const int row_g = first_row(item);
    const Words2* words = TILED
        ? reinterpret_cast<const Words2*>(w) + ((size_t)(row_g / 16) * (K / 64) + k0 / 64) * 64 + 4 * g + t
        : reinterpret_cast<const Words2*>(w + (size_t)row_g * (K / 2) + k0 / 2) + t;
    return Cursor{words, (size_t)row_g * blocks_per_row + k0 / 64};
  };
  auto advance = [&](int& item, int& gi, Cursor* cursor) {
    if (++gi == groups) {
      gi = 0;
      ++item;
      if (cursor) *cursor = cursor_at(item);
    } else if (cursor) {
      cursor->words += 4 * STEP_WORDS;
      cursor->block += 4;
    }
  };

  Words2 words[DEPTH][4][2];
  u32 stats_q[DEPTH][2];
  float stats_f[DEPTH][2][4];
  float stats_2[DEPTH][2];

  auto load = [&](const Cursor& at, Words2 (&wd)[4][2], u32 (&sq)[2], float (&sf)[2][4], float (&s2)[2]) {
    const Words2* wg = at.words;
    const Words2* wh = wg + row_h_words;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      wd[s][0] = weight_load(wg + s * STEP_WORDS);
      wd[s][1] = weight_load(wh + s * STEP_WORDS);
    }
    const size_t block_g = at.block, block_h = block_g + row_h_blocks;
    if (NESTED) {
      sq[0] = *reinterpret_cast<const u32*>(absmax_codes + block_g);
      sq[1] = *reinterpret_cast<const u32*>(absmax_codes + block_h);
      s2[0] = nested_absmax[block_g >> 8];
      s2[1] = nested_absmax[block_h >> 8];
    } else {
      const Words4 fg = *reinterpret_cast<const Words4*>(absmax_plain + block_g);
      const Words4 fh = *reinterpret_cast<const Words4*>(absmax_plain + block_h);
      sf[0][0] = __uint_as_float(fg.x); sf[0][1] = __uint_as_float(fg.y);
      sf[0][2] = __uint_as_float(fg.z); sf[0][3] = __uint_as_float(fg.w);
      sf[1][0] = __uint_as_float(fh.x); sf[1][1] = __uint_as_float(fh.y);
      sf[1][2] = __uint_as_float(fh.z); sf[1][3] = __uint_as_float(fh.w);
    }
  };

  float acc[TILES][4];
#pragma unroll
  for (int i = 0; i < TILES; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;

  int load_item = 0, load_gi = 0;  // the unit the next load takes
  Cursor cursor = cursor_at(0);
  int item = 0, gi = 0;  // the unit being multiplied
#pragma unroll
  for (int d = 0; d < DEPTH; ++d)
    if (d < units) {
      load(cursor, words[d], stats_q[d], stats_f[d], stats_2[d]);
      advance(load_item, load_gi, &cursor);
    }

  for (int base = 0; base < units; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int q = base + d;
      if (q < units) {
        float scale[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int s = 0; s < 4; ++s)
            scale[r][s] = NESTED ? codes2[(stats_q[d][r] >> (8 * s)) & 255] * stats_2[d][r] + offset : stats_f[d][r][s];
        Words2 cur[4][2];
#pragma unroll
        for (int s = 0; s < 4; ++s) { cur[s][0] = words[d][s][0]; cur[s][1] = words[d][s][1]; }
        if (q + DEPTH < units) {
          load(cursor, words[d], stats_q[d], stats_f[d], stats_2[d]);
          advance(load_item, load_gi, &cursor);
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          u32 a[2][8];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const u32 lo = cur[s][r].x, hi = cur[s][r].y;
            const bool lo_alu = r == 1 && ALU >= 2, hi_alu = r == 1 && ALU >= 1;
            if (lo_alu) {
              u32 pairs[4];
              decode_word(lo, planes, pairs);
#pragma unroll
              for (int b = 0; b < 4; ++b) a[r][b] = pairs[b];
            }
            if (hi_alu) {
              u32 pairs[4];
              decode_word(hi, planes, pairs);
#pragma unroll
              for (int b = 0; b < 4; ++b) a[r][4 + b] = pairs[b];
            }
#pragma unroll
            for (int b = 0; b < 4; ++b) {
              if (!lo_alu) a[r][b] = lookup(lo, b);
              if (!hi_alu) a[r][4 + b] = lookup(hi, b);
            }
          }
#pragma unroll
          for (int i = 0; i < TILES; ++i) {
            float dd[4];
            Words4 x0{0, 0, 0, 0}, x1{0, 0, 0, 0};
            if (8 * i + g < M) {
              const u16* row = x + (size_t)(8 * i + g) * K + k0 + (gi * 4 + s) * 64 + 16 * t;
              const Words4* xp = reinterpret_cast<const Words4*>(row);
              x0 = xp[0];
              x1 = xp[1];
            }
            mma(dd, a[0][0], a[1][0], a[0][1], a[1][1], x0.x, x0.y, true);
            mma(dd, a[0][2], a[1][2], a[0][3], a[1][3], x0.z, x0.w, false);
            mma(dd, a[0][4], a[1][4], a[0][5], a[1][5], x1.x, x1.y, false);
            mma(dd, a[0][6], a[1][6], a[0][7], a[1][7], x1.z, x1.w, false);
            acc[i][0] = fmaf(dd[0], scale[0][s], acc[i][0]);
            acc[i][1] = fmaf(dd[1], scale[0][s], acc[i][1]);
            acc[i][2] = fmaf(dd[2], scale[1][s], acc[i][2]);
            acc[i][3] = fmaf(dd[3], scale[1][s], acc[i][3]);
          }
        }
        if (gi == groups - 1) {  // the row block's last group: sum the K parts, store, start again
          if (KSPLIT > 1) {
            float* slot = parts + ((group * (KSPLIT - 1) + part - 1) * 4 * TILES) * 32;
            if (part > 0)
#pragma unroll
              for (int i = 0; i < TILES; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) slot[(4 * i + c) * 32 + lane] = acc[i][c];
            __syncthreads();
            if (part == 0) {
              const float* all = parts + (group * (KSPLIT - 1) * 4 * TILES) * 32;
#pragma unroll
              for (int i = 0; i < TILES; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c)
#pragma unroll
                  for (int p = 0; p < KSPLIT - 1; ++p) acc[i][c] += all[(p * 4 * TILES + 4 * i + c) * 32 + lane];
            }
            __syncthreads();  // the parts, for the next row block
          }
          if (part == 0) {
            const int row_g = first_row(item);
#pragma unroll
            for (int i = 0; i < TILES; ++i)
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const int m = 8 * i + 2 * t + (c & 1);
                const int row = c < 2 ? row_g : row_g + 8;
                if (m < M && row < N) out[(size_t)m * N + row] = to_bf16(acc[i][c]);
              }
          }
#pragma unroll
          for (int i = 0; i < TILES; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
        }
        advance(item, gi, nullptr);
      }
    }
  }
}
