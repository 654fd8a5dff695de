"""Triton 4-bit quantize and dequantize, bit-identical with ``fourbit.kernels.reference``.

Exactness rests on the same float32 operations in the same order: ``x * (1 / absmax)`` with a
correctly rounded division (``div_rn``), a plain divide for a short last block, comparisons
against the midpoints for bucketize, and ``code * scale`` (nested: ``code * scale + offset``
without a fused multiply-add, hence ``enable_fp_fusion=False`` at launch).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import triton
import triton.language as tl

from ...formats import num_blocks, packed_nbytes
from ..reference import sorted_code
from .common import block_scale, word_shifts

_ABSMAX_FLOOR = 1e-38


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,
    midpoints_ptr,
    order_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    pairs = tl.arange(0, BLOCKSIZE // 2)
    even = blocks[:, None] * BLOCKSIZE + 2 * pairs[None, :]
    odd = even + 1
    x_even = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)

    has_nan = tl.max(((x_even != x_even) | (x_odd != x_odd)).to(tl.int32), axis=1) > 0
    absmax = tl.max(tl.maximum(tl.abs(x_even), tl.abs(x_odd)), axis=1)
    absmax = tl.where(has_nan, float("nan"), absmax)
    clamped = tl.where(absmax < 1e-38, 1e-38, absmax)  # keeps NaN, like torch.clamp
    short = (blocks + 1) * BLOCKSIZE > n  # the last block, when n is not a multiple of the blocksize
    reciprocal = tl.math.div_rn(tl.full(clamped.shape, 1.0, tl.float32), clamped)

    scaled_even = tl.where(short[:, None], tl.math.div_rn(x_even, clamped[:, None]), x_even * reciprocal[:, None])
    scaled_odd = tl.where(short[:, None], tl.math.div_rn(x_odd, clamped[:, None]), x_odd * reciprocal[:, None])
    scaled_odd = tl.where(odd < n, scaled_odd, 0.0)  # the padding value of an odd count

    bounded_even = tl.minimum(tl.maximum(scaled_even, -1.0), 1.0)
    bounded_odd = tl.minimum(tl.maximum(scaled_odd, -1.0), 1.0)
    index_even = tl.zeros(scaled_even.shape, tl.int32)
    index_odd = tl.zeros(scaled_odd.shape, tl.int32)
    for j in tl.static_range(15):  # bucketize: the number of midpoints strictly below the value
        midpoint = tl.load(midpoints_ptr + j)
        index_even += (bounded_even > midpoint).to(tl.int32)
        index_odd += (bounded_odd > midpoint).to(tl.int32)
    index_even = tl.where(scaled_even != scaled_even, 15, index_even)  # bucketize puts NaN last
    index_odd = tl.where(scaled_odd != scaled_odd, 15, index_odd)
    code_even = tl.load(order_ptr + index_even)
    code_odd = tl.load(order_ptr + index_odd)
    packed = ((code_even << 4) | code_odd).to(tl.uint8)
    byte = even // 2
    tl.store(packed_ptr + byte, packed, mask=byte < (n + 1) // 2)
    stored = tl.where(short, clamped, absmax)
    tl.store(absmax_ptr + blocks, stored, mask=blocks * BLOCKSIZE < n)


def quantize_4bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.quantize_4bit``."""
    flat = A.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    if n:
        midpoints, order = sorted_code(code.float())
        blocks_per_program = max(1, 2048 // blocksize)
        grid = (triton.cdiv(num_blocks(n, blocksize), blocks_per_program),)
        _quantize_4bit_kernel[grid](
            flat, midpoints, order.to(torch.int32), packed, absmax, n, blocksize, blocks_per_program
        )
    return packed.view(quant_storage).unsqueeze(1), absmax


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BYTES_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
    in_range = byte < (n + 1) // 2
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4))
    low = tl.load(code_ptr + (packed & 15))
    # a zero code decodes to +0.0
    high = tl.where(high == 0, 0.0, high)
    low = tl.where(low == 0, 0.0, low)
    scale = block_scale(
        absmax_ptr, (2 * byte) // BLOCKSIZE, in_range, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
        NESTED, NESTED_BLOCKSIZE,
    )  # fmt: skip
    values = tl.interleave(high * scale, low * scale).to(out_ptr.dtype.element_ty)
    element = pid.to(tl.int64) * 2 * BYTES_PER_PROGRAM + tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + element, values, mask=element < n)


@triton.jit
def _dequantize_words_kernel(
    words_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    out_ptr,
    n_words,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    WORDS_PER_PROGRAM: tl.constexpr,
):
    """8 elements per int32 word, written as 8 consecutive outputs (element count a multiple of 8)."""
    pid = tl.program_id(0)
    word = pid.to(tl.int64) * WORDS_PER_PROGRAM + tl.arange(0, WORDS_PER_PROGRAM)
    in_range = word < n_words
    words = tl.load(words_ptr + word, mask=in_range, other=0)
    values = tl.load(code_ptr + ((words[:, None] >> word_shifts()[None, :]) & 15))
    values = tl.where(values == 0, 0.0, values)  # a zero code decodes to +0.0
    scale = block_scale(
        absmax_ptr, (8 * word) // BLOCKSIZE, in_range, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
        NESTED, NESTED_BLOCKSIZE,
    )  # fmt: skip
    out = (values * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + 8 * word[:, None] + tl.arange(0, 8)[None, :], out, mask=in_range[:, None])


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Same contract as ``reference.dequantize_4bit``."""
    n = prod(shape)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if n:
        nested = nested_absmax is not None
        data = packed.reshape(-1).view(torch.uint8)
        statistics = (nested_absmax, nested_code, nested_offset) if nested else (absmax, absmax, absmax)
        if n % 8 == 0 and data.storage_offset() % 4 == 0:
            words_per_program = 256
            grid = (triton.cdiv(n // 8, words_per_program),)
            _dequantize_words_kernel[grid](
                data.view(torch.int32), absmax, code.float(), *statistics, out, n // 8, blocksize, nested,
                nested_blocksize, words_per_program, enable_fp_fusion=False,
            )  # fmt: skip
        else:
            bytes_per_program = 1024
            grid = (triton.cdiv(packed_nbytes(n), bytes_per_program),)
            _dequantize_4bit_kernel[grid](
                data, absmax, code.float(), *statistics, out, n, blocksize, nested, nested_blocksize,
                bytes_per_program, enable_fp_fusion=False,
            )  # fmt: skip
    return out
