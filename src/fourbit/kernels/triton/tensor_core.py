"""The tensor-core 4-bit product: each packed word decoded in registers by byte permutes, then ``tl.dot``."""

from __future__ import annotations

import triton
import triton.language as tl

from .byte_permute import decode_words, plane_words
from .common import absmax_from_stored, stored_absmax, tile_row_words, write_output


@triton.jit
def decode_dot_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    bias_ptr,
    out_ptr,
    workspace_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TILED: tl.constexpr,
):
    """``out.T = W @ x.T`` on the tensor cores, W decoded in registers by byte permutes.

    The weight is the dot's left operand, so its rows fill the instruction's 64-row side even
    for one input row. A K tile is ``SUB`` dots of ``SUB_K`` columns, each inside one absmax
    block; a dot's product is scaled per weight row (few input rows), or (``SCALE_WEIGHTS``, many
    rows) the decoded weights are scaled and the dot accumulates in place. The stored absmax of
    the next tile is loaded one iteration ahead. The weight is in rows or ``TILED``
    (``fourbit.layout``; then SUB_K is 64), K a multiple of 8.
    """
    SUB_K: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
    SUB: tl.constexpr = BLOCK_K // SUB_K
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, SUB)
    n_mask = offs_n < N
    m_mask = offs_m < M
    row_words = tile_row_words(offs_n, K, TILED)[:, None]
    row_blocks = offs_n.to(tl.int64)[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    planes = plane_words(code_ptr, x_ptr.dtype.element_ty)
    block = row_blocks + ((k_start + offs_s * SUB_K) // BLOCKSIZE)[None, :]
    stored = stored_absmax(absmax_ptr, block, n_mask[:, None] & (k_start < k_stop), NESTED)  # an empty split reads none
    for k0 in range(k_start, k_stop, BLOCK_K):
        next_block = row_blocks + ((k0 + BLOCK_K + offs_s * SUB_K) // BLOCKSIZE)[None, :]
        next_stored = stored_absmax(absmax_ptr, next_block, n_mask[:, None] & (k0 + BLOCK_K < k_stop), NESTED)
        scales = absmax_from_stored(
            stored, block, n_mask[:, None], nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED,
            NESTED_BLOCKSIZE,
        )  # fmt: skip
        for sub in tl.static_range(SUB):
            k = k0 + sub * SUB_K
            if TILED:  # SUB_K is 64: a dot's words are one tile row, 128-word aligned per tile
                tl.static_assert(SUB_K == 64)
                start = (k // 64) * 128
            else:
                start = k // 8
            words = tl.load(w_ptr + row_words + (start + tl.arange(0, SUB_K // 8))[None, :], mask=n_mask[:, None])
            weight = decode_words(words, planes, x_ptr.dtype.element_ty)
            x_tile = x_ptr + offs_m[:, None] * stride_xm + (k + tl.arange(0, SUB_K))[None, :]
            x = tl.load(x_tile, mask=m_mask[:, None], other=0.0)
            scale = tl.sum(tl.where(offs_s[None, :] == sub, scales, 0.0), axis=1)
            if SCALE_WEIGHTS:
                weight = (weight.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty)
                acc = tl.dot(weight, tl.trans(x), acc)
            else:
                acc += tl.dot(weight, tl.trans(x)) * scale[:, None]
        stored = next_stored
        block = next_block
    tile = pid_n * tl.num_programs(1) + pid_m
    write_output(
        out_ptr, workspace_ptr, counter_ptr, tile, bias_ptr, tl.trans(acc), offs_m[:, None], offs_n[None, :], M, N,
        stride_om, SPLIT_K, HAS_BIAS,
    )  # fmt: skip
