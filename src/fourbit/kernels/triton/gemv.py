"""CUDA-core 4-bit products for few rows: a multiply-accumulate over weights decoded by table lookup
(a gather from the code table: float16 for 16-bit inputs, float32 for float32 ones).

These take what the tensor-core kernels do not: float32 inputs, K that is not a multiple of the
blocksize, and runs under the Triton interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import block_scale, column_words, decode_weight_tile, tile_row_words, word_shifts, write_output


@triton.jit
def gemv_words_kernel(
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TILED: tl.constexpr,
):
    """Rows of W start on word and block boundaries (K % 8 == 0, K % BLOCKSIZE == 0): a tile is
    ``[BLOCK_N, BLOCK_K // 8]`` int32 words (in rows, or ``TILED``: ``tile_row_words``); each
    block's partial sum is scaled once.

    With SPLIT_K > 1 the K range is shared by several programs (``write_output``).
    """
    SUB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    SPAN: tl.constexpr = BLOCK_K // SUB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, ROWS)
    shifts = word_shifts()
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_mask = n_mask[:, None] & (offs_w[None, :] < K // 8)
        offsets = tile_row_words(offs_n, K, TILED)[:, None] + column_words(8 * offs_w, TILED)[None, :]
        words = tl.load(w_ptr + offsets, mask=w_mask, other=0)
        nibbles = (words[:, :, None] >> shifts[None, None, :]) & 15
        values = tl.reshape(tl.load(code_ptr + nibbles).to(tl.float32), (BLOCK_N, SUB, SPAN))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_r[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_r[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        block = offs_n.to(tl.int64)[:, None] * (K // BLOCKSIZE) + (k0 // BLOCKSIZE + tl.arange(0, SUB))[None, :]
        b_mask = n_mask[:, None] & ((k0 + tl.arange(0, SUB) * SPAN) < K)[None, :]
        scale = block_scale(
            absmax_ptr, block, b_mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED, NESTED_BLOCKSIZE
        )
        if ROWS == 1:
            partial = tl.sum(values * tl.reshape(x, (1, SUB, SPAN)), axis=2)
            acc += tl.sum(partial * scale, axis=1)[None, :]
        else:
            partial = tl.sum(values[None, :, :, :] * tl.reshape(x, (ROWS, 1, SUB, SPAN)), axis=3)
            acc += tl.sum(partial * scale[None, :, :], axis=2)
    write_output(
        out_ptr, workspace_ptr, counter_ptr, pid_n, bias_ptr, acc, offs_r[:, None], offs_n[None, :], M, N, stride_om,
        SPLIT_K, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def gemv_any_kernel(
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Any K (odd, not a multiple of the blocksize): every element finds its own byte and block."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_r[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_r[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        w = decode_weight_tile(
            w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, offs_n, k0, N, K,
            BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
        )  # fmt: skip
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    write_output(
        out_ptr, workspace_ptr, counter_ptr, pid_n, bias_ptr, acc, offs_r[:, None], offs_n[None, :], M, N, stride_om,
        SPLIT_K, HAS_BIAS,
    )  # fmt: skip
