"""The fragment kernel's input operands (``fragments``): read from the input rows in place, or from
a copy of them in fragment order.

An ``mma.sync`` right operand needs, in lane ``l`` of a warp, input row ``l // 4``: each load
instruction of a warp therefore touches eight rows, eight 128-byte lines, and the L1 data path
takes one pass (a wavefront) per line. From 9 rows on, the input loads are about half of the
L1 passes of the whole kernel, which limits it there (Nsight Compute on an H200, 28672x8192 at 16
rows: L1 90% busy, DRAM 36%). Copied in fragment order (``InputPermute``), each half of a lane's
words lies in one 512-byte run across the warp, four lines an instruction: one more kernel, worth
it for large weights (``tuning.PermuteRule``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch

__all__ = ["InputPermute", "permuted_inputs", "row_inputs"]

#: Words of the copy that one program of ``_permute_kernel`` writes.
_PERMUTE_BLOCK = 1024


@triton.jit
def _input_columns(x_ptr, row, M, stride_xm, column, live):
    """The four int64 words (four 16-bit values each) of input row ``row`` from int64 column
    ``column`` on, as two 16-byte loads per thread; zeros for rows beyond M and where not
    ``live``."""
    start = x_ptr + row.to(tl.int64)[:, None] * stride_xm + column[:, None] + tl.arange(0, 2)[None, :]
    mask = ((row < M) & live)[:, None]
    w0, w1 = tl.split(tl.load(start, mask=mask, other=0))
    w2, w3 = tl.split(tl.load(start + 2, mask=mask, other=0))
    return w0, w1, w2, w3


@triton.jit
def row_inputs(x_ptr, group, M, stride_xm, column, live, TILES: tl.constexpr):
    """The input operands of one step for this lane, read from the rows: four int64 words per
    tile of input rows (rows ``group`` and ``group + 8``; the second four repeat the first when
    TILES == 1)."""
    a0, a1, a2, a3 = _input_columns(x_ptr, group, M, stride_xm, column, live)
    if TILES == 2:
        b0, b1, b2, b3 = _input_columns(x_ptr, group + 8, M, stride_xm, column, live)
    else:
        b0, b1, b2, b3 = a0, a1, a2, a3
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _permuted_columns(x_ptr, lane, step, tile, live, TILES: tl.constexpr):
    """``_input_columns`` from the copy in fragment order: this lane's words of tile ``tile`` at
    step ``step``."""
    start = x_ptr + (((step * TILES + tile) * 64 + lane) * 2)[:, None] + tl.arange(0, 2)[None, :]
    mask = ((lane < 32) & live)[:, None]  # live may be one value for the whole program
    w0, w1 = tl.split(tl.load(start, mask=mask, other=0))
    w2, w3 = tl.split(tl.load(start + 64, mask=mask, other=0))
    return w0, w1, w2, w3


@triton.jit
def permuted_inputs(x_ptr, lane, step, live, TILES: tl.constexpr):
    """``row_inputs`` from the copy in fragment order (``InputPermute``), at step ``step``."""
    a0, a1, a2, a3 = _permuted_columns(x_ptr, lane, step, 0, live, TILES)
    if TILES == 2:
        b0, b1, b2, b3 = _permuted_columns(x_ptr, lane, step, 1, live, TILES)
    else:
        b0, b1, b2, b3 = a0, a1, a2, a3
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _permute_kernel(x_ptr, out_ptr, M, stride_xm, total, TILES: tl.constexpr, BLOCK: tl.constexpr):
    """Input rows (int64 words of four 16-bit values) in fragment order: word ``e`` of half ``h``
    of lane ``l`` in tile ``t`` at step ``s`` goes to ``(((s * TILES + t) * 2 + h) * 32 + l) * 2 +
    e``, from row ``8t + l // 4``, word ``16s + 4 (l % 4) + 2h + e``; rows from M on are zeros."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = index % 2
    lane = (index // 2) % 32
    half = (index // 64) % 2
    tile = (index // 128) % TILES
    step = index // (128 * TILES)
    row = tile * 8 + lane // 4
    column = step * 16 + (lane % 4) * 4 + half * 2 + e
    value = tl.load(x_ptr + row.to(tl.int64) * stride_xm + column, mask=(index < total) & (row < M), other=0)
    tl.store(out_ptr + index, value, mask=index < total)


class InputPermute:
    """The fragment kernel's ``prepare_input`` for inputs in fragment order: copies 2-d 16-bit
    inputs of ``tiles`` tiles of 8 rows and ``k`` columns (a multiple of 64) by one direct launch."""

    __slots__ = ("launch", "tiles", "total")

    def __init__(self, tiles: int, k: int, device: torch.device) -> None:
        self.tiles = tiles
        self.total = (k // 64) * tiles * 128
        grid = (triton.cdiv(self.total, _PERMUTE_BLOCK),)
        self.launch = KernelLaunch(_permute_kernel, grid, {"num_warps": 4}, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(1) != 1 or x.stride(0) % 4 or x.data_ptr() % 8:  # int64 words of whole rows
            x = x.contiguous()
        out = torch.empty(self.total, dtype=torch.int64, device=x.device)
        arguments = (x.shape[0], x.stride(0) // 4, self.total, self.tiles, _PERMUTE_BLOCK)  # in int64 words
        if self.launch.direct():  # the pointer: no int64 view to make
            self.launch.run(x.data_ptr(), out.data_ptr(), *arguments)
        else:
            self.launch(x.view(torch.int64), out, *arguments)
        return out
