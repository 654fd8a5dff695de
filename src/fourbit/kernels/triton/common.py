"""Triton building blocks shared by the 4-bit kernels: block scales, code lookup, unpacking.

A packed byte holds an even element (high nibble) and the next odd one (low nibble). The fast
kernels read packed data as little-endian int32 words (8 elements) and unpack a word with the
shift vector of ``word_shifts`` into 8 consecutive elements. Index arithmetic is done in int64
so that tensors of more than 2**31 elements work.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...formats import NESTED_BLOCKSIZE, NestedStatistics

#: Triton reads this once, at import: kernels run on CPU tensors in its interpreter, which runs
#: no PTX (kernels with inline PTX take another path or are not chosen there).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Compile options every kernel states (a launch's own options may override them). The kernels'
#: bits were checked with floating-point contraction (``a * b + c`` as one fma), Triton's default
#: until 3.9; Triton 3.9 warns on every compile that leaves it unstated, and 3.10 turns it off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def nested_arguments(absmax: torch.Tensor, nested: NestedStatistics | None) -> tuple:
    """The kernels' nested-statistics arguments (absmax, code, offset pointers, NESTED,
    NESTED_BLOCKSIZE); without nested statistics, ``absmax`` stands in for the three tensors,
    which a kernel specialized on NESTED=False never reads."""
    if nested is None:
        return (absmax, absmax, absmax), False, NESTED_BLOCKSIZE
    return (nested.absmax, nested.code, nested.offset), True, nested.blocksize


@triton.jit
def tile_row_words(rows, K, TILED: tl.constexpr):
    """int32 offset of each weight row's word at column 0: in bitsandbytes' rows, or (``TILED``)
    in ``fourbit.layout``'s tiles of 16 rows by 64 columns, where a row's 8 words of a tile are
    contiguous and tiles follow one another along K. ``column_words`` goes on from there."""
    if TILED:
        return (rows // 16).to(tl.int64) * (K // 64) * 128 + (rows % 16) * 8
    else:
        return rows.to(tl.int64) * (K // 8)


@triton.jit
def column_words(column, TILED: tl.constexpr):
    """int32 offset, past ``tile_row_words``, of a row's word at ``column`` (a multiple of 8); the
    row's words up to the next multiple of 64 columns follow it in both layouts."""
    if TILED:
        return (column // 64) * 128 + (column % 64) // 8
    else:
        return column // 8


@triton.jit
def block_scale(
    absmax_ptr,
    block,
    mask,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """Float32 absmax of 4-bit block ``block``; nested: ``code[q] * scale + offset`` (two roundings)."""
    raw = stored_absmax(absmax_ptr, block, mask, NESTED)
    return absmax_from_stored(
        raw, block, mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED, NESTED_BLOCKSIZE
    )


@triton.jit
def stored_absmax(absmax_ptr, block, mask, NESTED: tl.constexpr):
    """What is stored for block ``block``: its float32 absmax, or (nested) its 8-bit code. Loading
    this early (one iteration ahead) hides the memory latency of ``block_scale``."""
    if NESTED:
        return tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def absmax_from_stored(
    raw,
    block,
    mask,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """The float32 absmax of block ``block`` from ``stored_absmax``."""
    if NESTED:
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + raw) * scale + tl.load(nested_offset_ptr)
    else:
        return raw


@triton.jit
def decode_weight_tile(
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    offs_n,
    k0,
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """Float32 values of the weight tile rows ``offs_n``, columns ``k0 .. k0 + BLOCK_K``, for any
    K (rows need not start on a byte or block boundary): every element finds its own byte,
    nibble and block. Outside the matrix, 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k[None, :] < K)
    element = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    packed = tl.load(w_ptr + element // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(element % 2 == 0, packed >> 4, packed & 15)
    scale = block_scale(
        absmax_ptr, element // BLOCKSIZE, mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
        NESTED, NESTED_BLOCKSIZE,
    )  # fmt: skip
    return tl.where(mask, tl.load(code_ptr + nibble) * scale, 0.0)


@triton.jit
def word_shifts():
    """Shift of each of the 8 nibbles of a little-endian int32 word, in element order: element
    2b is the high nibble of byte b (shift 8b + 4), element 2b + 1 its low nibble (shift 8b)."""
    lane = tl.arange(0, 8)
    return (lane // 2) * 8 + 4 * (1 - lane % 2)


@triton.jit
def store_output(
    out_ptr, bias_ptr, value, out_row, out_col, M, N, stride_om, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """Write the float32 products ``value`` to ``out[out_row, out_col]`` (index tensors broadcast
    to its shape; outside ``M x N`` nothing is written), adding ``bias[out_col]`` and casting to
    the output's type; with split K, ``out_ptr`` is the float32 workspace instead and the
    products are added to it atomically (``finish_split`` writes the output)."""
    out = out_ptr + out_row * stride_om + out_col
    mask = (out_row < M) & (out_col < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            value += tl.load(bias_ptr + out_col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, value, mask=mask, sem="relaxed")


@triton.jit
def last_of_split(counter_ptr, tile, SPLIT_K: tl.constexpr):
    """Whether this program is the last of its tile's ``SPLIT_K`` programs to have added its
    partial sums (after every thread of the program has added them). The last one resets the
    tile's counter, so the counters are all zero again once the kernel ends."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    if last:
        tl.atomic_xchg(counter_ptr + tile, 0)
    return last


@triton.jit
def finish_split(out_ptr, workspace_ptr, bias_ptr, out_row, out_col, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """The last program of a split tile: take the summed products out of the workspace (leaving
    zeros), add the bias and store them in the output's type (``store_output`` without split)."""
    mask = (out_row < M) & (out_col < N)
    partial = workspace_ptr + out_row * stride_om + out_col
    value = tl.atomic_add(partial, 0.0, mask=mask, sem="relaxed")  # read where the sums were made
    tl.store(partial, 0.0, mask=mask)
    store_output(out_ptr, bias_ptr, value, out_row, out_col, M, N, stride_om, 1, HAS_BIAS)


@triton.jit
def write_output(
    out_ptr, workspace_ptr, counter_ptr, tile, bias_ptr, value, out_row, out_col, M, N, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """``store_output`` for a kernel whose tile ``tile`` may be split over K: without a split the
    products are stored; with one they are added to the zeroed float32 workspace (laid out like
    the output) and the last program of the tile writes the output, so no kernel runs after."""
    if SPLIT_K == 1:
        store_output(out_ptr, bias_ptr, value, out_row, out_col, M, N, stride_om, 1, HAS_BIAS)
    else:
        store_output(workspace_ptr, bias_ptr, value, out_row, out_col, M, N, stride_om, SPLIT_K, HAS_BIAS)
        if last_of_split(counter_ptr, tile, SPLIT_K):
            finish_split(out_ptr, workspace_ptr, bias_ptr, out_row, out_col, M, N, stride_om, HAS_BIAS)
