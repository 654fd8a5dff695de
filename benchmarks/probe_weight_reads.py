"""How fast a GPU reads a packed 4-bit weight in each order a product kernel could use.

Pure-load Triton kernels (no arithmetic: each thread XORs what it reads) over 117 MB weights of
several row pitches, timed as CUDA graph replays. "fragment" is the fragment kernel's order on
bitsandbytes' rows (each lane reads 8 bytes of rows g and g + 8, a warp 16 rows 32 bytes at a
time); "padded" the same with each row padded by 256 bytes; "line" 128 bytes of a row per 8
lanes; "wide" a row's 512 bytes per load; "tiled" ``fourbit.layout``'s tiles (each warp's 16 rows
by 64 columns as 512 contiguous bytes, one run per warp). K must be a multiple of 1024 (the wide
order reads 512 bytes of a row at once). docs/performance.md has a run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def _fragment(w_ptr, out_ptr, PITCH, K16, WARPS: tl.constexpr):
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    row = tl.program_id(0) * (16 * WARPS) + (t // 32) * 16 + lane // 4
    base_g = row.to(tl.int64) * PITCH + lane % 4
    base_h = base_g + 8 * PITCH
    acc = tl.zeros((32 * WARPS,), dtype=tl.int64)
    for k in range(0, K16, 16):
        for s in tl.static_range(4):
            acc ^= tl.load(w_ptr + base_g + k + 4 * s) ^ tl.load(w_ptr + base_h + k + 4 * s)
    tl.store(out_ptr + tl.program_id(0) * 32 * WARPS + t, acc)


@triton.jit
def _line(w_ptr, out_ptr, PITCH, K16, WARPS: tl.constexpr):
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    row = tl.program_id(0) * (16 * WARPS) + (t // 32) * 16 + lane // 8
    base = row.to(tl.int64) * PITCH + (lane % 8) * 2
    acc = tl.zeros((32 * WARPS,), dtype=tl.int64)
    for k in range(0, K16, 16):
        for r in tl.static_range(4):
            pointer = w_ptr + base + 4 * r * PITCH + k
            acc ^= tl.load(pointer) ^ tl.load(pointer + 1)
    tl.store(out_ptr + tl.program_id(0) * 32 * WARPS + t, acc)


@triton.jit
def _wide(w_ptr, out_ptr, PITCH, K16, WARPS: tl.constexpr):
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    first_row = tl.program_id(0) * (16 * WARPS) + (t // 32) * 16
    base = first_row.to(tl.int64) * PITCH + lane * 2
    acc = tl.zeros((32 * WARPS,), dtype=tl.int64)
    for k in range(0, K16, 64):
        for r in tl.static_range(16):
            pointer = w_ptr + base + r * PITCH + k
            acc ^= tl.load(pointer) ^ tl.load(pointer + 1)
    tl.store(out_ptr + tl.program_id(0) * 32 * WARPS + t, acc)


@triton.jit
def _tiled(w_ptr, out_ptr, PITCH, K16, WARPS: tl.constexpr):
    t = tl.arange(0, 32 * WARPS)
    lane = t % 32
    group = tl.program_id(0) * WARPS + t // 32
    base = group.to(tl.int64) * 16 * K16 + lane
    acc = tl.zeros((32 * WARPS,), dtype=tl.int64)
    for k in range(0, K16, 16):
        for s in tl.static_range(4):
            step = base + (k + 4 * s) * 16
            acc ^= tl.load(w_ptr + step) ^ tl.load(w_ptr + step + 32)
    tl.store(out_ptr + tl.program_id(0) * 32 * WARPS + t, acc)


#: The orders: name, kernel, extra 8-byte words of pitch per row.
ORDERS = [
    ("fragment", _fragment, 0),
    ("padded", _fragment, 32),
    ("line", _line, 0),
    ("wide", _wide, 0),
    ("tiled", _tiled, 0),
]
WARPS = 4


def time_order(kernel: triton.JITFunction, n: int, k: int, pad: int) -> float:
    """Milliseconds per read of an n x k packed weight (rows padded by ``pad`` words) in one order."""
    words = k // 16  # 8-byte words per row
    weight = torch.randint(-(2**62), 2**62, (n * (words + pad),), dtype=torch.int64, device="cuda")
    programs = triton.cdiv(n, 16 * WARPS)
    out = torch.empty(programs * 32 * WARPS, dtype=torch.int64, device="cuda")

    def run() -> None:
        kernel[(programs,)](weight, out, words + pad, words, WARPS=WARPS, num_warps=WARPS)

    run()
    return do_bench_cudagraph(run, rep=100)


def main() -> None:
    for n, k in [(28672, 8192), (57344, 4096), (16384, 14336), (8192, 14336)]:
        for name, kernel, pad in ORDERS:
            ms = time_order(kernel, n, k, pad)
            print(f"{n}x{k} {name:9s} {ms * 1e3:7.1f} us {n * k // 2 / ms / 1e9:6.2f} TB/s")


if __name__ == "__main__":
    main()
