"""Triton building blocks shared by the 4-bit kernels: block scales and weight-tile decoding.

Index arithmetic is done in int64 so that tensors of more than 2**31 elements work.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    if NESTED:
        codes = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        decoded = tl.load(nested_code_ptr + codes) * tl.load(
            nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0
        )
        return decoded + tl.load(nested_offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


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
    ALIGNED: tl.constexpr,
    K_TAIL: tl.constexpr,
):
    """Float32 values of the weight tile rows ``offs_n``, columns ``k0 .. k0 + BLOCK_K``.

    ``ALIGNED`` (K a multiple of the blocksize, so rows start on byte and block boundaries) reads
    the tile as bytes and one scale per (row, block); otherwise every element finds its own byte,
    nibble and block. Out-of-range elements are 0 (``K_TAIL``: K is not a multiple of BLOCK_K).
    """
    n_mask = offs_n < N
    if ALIGNED:
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        row_bytes = offs_n.to(tl.int64)[:, None] * (K // 2)
        mask = n_mask[:, None] & (offs_j[None, :] < K // 2)
        packed = tl.load(w_ptr + row_bytes + offs_j[None, :], mask=mask, other=0).to(tl.int32)
        high = tl.load(code_ptr + (packed >> 4))
        low = tl.load(code_ptr + (packed & 15))
        values = tl.reshape(tl.interleave(high, low), (BLOCK_N, BLOCK_K))
        blocks_per_row = K // BLOCKSIZE
        if BLOCK_K <= BLOCKSIZE:
            block = offs_n.to(tl.int64) * blocks_per_row + k0 // BLOCKSIZE
            scale = block_scale(
                absmax_ptr, block, n_mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                NESTED, NESTED_BLOCKSIZE,
            )  # fmt: skip
            values = values * scale[:, None]
        else:
            SUB: tl.constexpr = BLOCK_K // BLOCKSIZE
            offs_b = k0 // BLOCKSIZE + tl.arange(0, SUB)
            block = offs_n.to(tl.int64)[:, None] * blocks_per_row + offs_b[None, :]
            b_mask = n_mask[:, None] & (offs_b[None, :] < blocks_per_row)
            scale = block_scale(
                absmax_ptr, block, b_mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                NESTED, NESTED_BLOCKSIZE,
            )  # fmt: skip
            values = tl.reshape(tl.reshape(values, (BLOCK_N, SUB, BLOCKSIZE)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
        if K_TAIL:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            values = tl.where(n_mask[:, None] & (offs_k[None, :] < K), values, 0.0)
        return values
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        element = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        packed = tl.load(w_ptr + element // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(element % 2 == 0, packed >> 4, packed & 15)
        scale = block_scale(
            absmax_ptr, element // BLOCKSIZE, mask, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
            NESTED, NESTED_BLOCKSIZE,
        )  # fmt: skip
        return tl.where(mask, tl.load(code_ptr + nibble) * scale, 0.0)
