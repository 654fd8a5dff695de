"""Triton ``A @ W.T + bias`` for a packed 4-bit weight W.

Up to 16 rows of 16-bit input (blocksizes of 64 and more, K a multiple of 256) run
``fragments``: ``mma.sync`` with each lane's operand fragment decoded through a shared-memory
table of code pairs. Up to 64 rows otherwise run a tensor-core kernel that decodes each packed
word in registers with byte permutes (``byte_permute``), and up to 256 rows run it with
batch-wide tiles when the weight has rows enough to occupy the GPU; none writes the decoded
weight out. Other few-row inputs (float32, K not a multiple of the blocksize, the interpreter)
run a CUDA-core multiply-accumulate kernel with a table lookup. The remaining cases (prefill,
training, small weights under many rows) decode the weight in chunks of rows with the dequantize
kernel and hand each chunk to cuBLAS: the extra memory is one chunk, never the whole decoded
weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import fragments
from .byte_permute import decode_words, plane_words
from .common import (
    INTERPRETED,
    absmax_from_stored,
    block_scale,
    decode_weight_tile,
    lookup,
    store_output,
    stored_absmax,
    word_shifts,
)
from .derived import derived
from .quantize import dequantize_4bit


@triton.jit
def _gemv_words_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    bias_ptr,
    out_ptr,
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
    SELECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Rows of W start on word and block boundaries (K % 8 == 0, K % BLOCKSIZE == 0): a tile is
    ``[BLOCK_N, BLOCK_K // 8]`` int32 words; each block's partial sum is scaled once.

    With SPLIT_K > 1 the K range is shared by several programs that add float32 partial sums
    into ``out_ptr`` (a zeroed float32 buffer; the caller adds the bias and casts).
    """
    SUB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    SPAN: tl.constexpr = BLOCK_K // SUB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, ROWS)
    shifts = word_shifts()
    row_words = offs_n.to(tl.int64)[:, None] * (K // 8)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_mask = n_mask[:, None] & (offs_w[None, :] < K // 8)
        words = tl.load(w_ptr + row_words + offs_w[None, :], mask=w_mask, other=0)
        nibbles = (words[:, :, None] >> shifts[None, None, :]) & 15
        values = tl.reshape(lookup(code_ptr, nibbles, SELECT).to(tl.float32), (BLOCK_N, SUB, SPAN))
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
    store_output(out_ptr, bias_ptr, acc, offs_r[:, None], offs_n[None, :], M, N, stride_om, SPLIT_K, HAS_BIAS)


@triton.jit
def _gemv_any_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    bias_ptr,
    out_ptr,
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
    SELECT: tl.constexpr,
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
            BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, SELECT,
        )  # fmt: skip
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    store_output(out_ptr, bias_ptr, acc, offs_r[:, None], offs_n[None, :], M, N, stride_om, SPLIT_K, HAS_BIAS)


@triton.jit
def _decode_dot_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
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
):
    """``out.T = W @ x.T`` on the tensor cores, W decoded in registers by byte permutes.

    The weight is the dot's left operand, so its rows fill the instruction's 64-row side even
    for one input row. A K tile is ``SUB`` dots of ``SUB_K`` columns, each inside one absmax
    block; a dot's product is scaled per weight row (few input rows), or (``SCALE_WEIGHTS``, many
    rows) the decoded weights are scaled and the dot accumulates in place. The stored absmax of
    the next tile is loaded one iteration ahead. Rows start on words (``stride_wn`` words).
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
    row_words = offs_n.to(tl.int64)[:, None] * stride_wn
    row_blocks = offs_n.to(tl.int64)[:, None] * (K // BLOCKSIZE)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    planes = plane_words(code_ptr, x_ptr.dtype.element_ty)
    block = row_blocks + ((k_start + offs_s * SUB_K) // BLOCKSIZE)[None, :]
    stored = stored_absmax(absmax_ptr, block, n_mask[:, None], NESTED)
    for k0 in range(k_start, k_stop, BLOCK_K):
        next_block = row_blocks + ((k0 + BLOCK_K + offs_s * SUB_K) // BLOCKSIZE)[None, :]
        next_stored = stored_absmax(absmax_ptr, next_block, n_mask[:, None] & (k0 + BLOCK_K < k_stop), NESTED)
        scales = absmax_from_stored(
            stored, block, n_mask[:, None], nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED,
            NESTED_BLOCKSIZE,
        )  # fmt: skip
        for sub in tl.static_range(SUB):
            k = k0 + sub * SUB_K
            words = tl.load(w_ptr + row_words + (k // 8 + tl.arange(0, SUB_K // 8))[None, :], mask=n_mask[:, None])
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
    store_output(out_ptr, bias_ptr, tl.trans(acc), offs_m[:, None], offs_n[None, :], M, N, stride_om, SPLIT_K, HAS_BIAS)


#: Few-row configurations of the CUDA-core kernels, for inputs the tensor-core kernel does not
#: take (float32, K not a multiple of the blocksize, the interpreter): (max rows, ROWS, BLOCK_N,
#: BLOCK_K, SPLIT_K, num_warps, lookup); the first entry whose max rows covers M is used; SPLIT_K 0
#: means "enough K splits to give every multiprocessor work"; lookup is "gather" (float32 table),
#: "half" (float16 table: one memory sector, codes rounded to 11 bits) or "select" (no memory
#: access). Rows beyond the last entry decode in chunks and use cuBLAS.
#: Measured with benchmarks/tune_triton.py on an H100 (2026-11-22).
GEMV_TABLE: tuple[tuple[int, int, int, int, int, int, str], ...] = (
    (1, 1, 16, 1024, 0, 4, "half"),
    (2, 2, 16, 512, 0, 4, "half"),
    (4, 4, 16, 512, 0, 4, "half"),
)

#: Tensor-core kernel configurations for 16-bit inputs: (max rows, BLOCK_N, BLOCK_M, BLOCK_K,
#: SPLIT_K, num_warps, num_stages, SCALE_WEIGHTS); SPLIT_K is the fewest K splits (more are added
#: until the programs cover the multiprocessors twice, ``_covering_splits``). Rows beyond the last
#: entry run WIDE_CONFIG or decode in chunks and use cuBLAS.
#: Measured with benchmarks/tune_triton.py on an H100 (2026-11-22, session 3).
FUSED_TABLE: tuple[tuple[int, int, int, int, int, int, int, bool], ...] = (
    (16, 128, 16, 64, 4, 4, 4, False),
    (32, 128, 32, 64, 4, 4, 4, False),
    (64, 128, 64, 64, 1, 4, 4, False),
)

#: The tensor-core kernel with batch-wide tiles, for rows beyond FUSED_TABLE up to WIDE_ROWS:
#: ("wide", BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages); one program per BLOCK_N weight
#: rows and BLOCK_M input rows, no K split, weights scaled before the dot. Each packed byte is
#: decoded once per BLOCK_M input rows, but one program fills a multiprocessor, so the path pays
#: only for weights with enough rows: its programs must number at least WIDE_MIN_COVERAGE of
#: the multiprocessors (on an H100 it beat decode + cuBLAS 1.2-2x from 8192 weight rows up and
#: lost at 4096), otherwise "chunked" runs. Measured with benchmarks/tune_triton.py on an H100
#: (2026-11-23, session 7).
WIDE_CONFIG: tuple[str, int, int, int, int, int] = ("wide", 128, 256, 64, 8, 3)
WIDE_ROWS = 256
WIDE_MIN_COVERAGE = 0.4

#: Register-fragment kernel configurations (``fragments``) for 16-bit inputs, blocksizes of 64 and
#: more: (max rows, num_warps, SPLIT_K); SPLIT_K 0 means enough K splits for two programs per
#: multiprocessor. Measured with benchmarks/tune_triton.py on an H100 (2026-11-23, session 5).
FRAGMENT_TABLE: tuple[tuple[int, int, int], ...] = ((16, 4, 0),)

#: Bytes of decoded weight per chunk on the many-rows path.
CHUNK_BYTES = 64 << 20


def choose_config(
    x: torch.Tensor, n_out: int, k: int, blocksize: int, packed: torch.Tensor | None = None
) -> tuple | str:
    """The kernel and tile configuration for input rows ``x`` (2-d) against an ``n_out x k``
    weight (packed in ``packed``, when given): a ``FRAGMENT_TABLE``, ``FUSED_TABLE`` or
    ``GEMV_TABLE`` entry, ``WIDE_CONFIG``, or ``"chunked"``."""
    rows = x.shape[0]
    if not INTERPRETED and fragments.supported(x, k, blocksize, packed):
        entry = next((entry for entry in FRAGMENT_TABLE if rows <= entry[0]), None)
        if entry:
            return ("fragments", *entry[1:])
    if fused_supported(x, k, blocksize):
        entry = next((entry for entry in FUSED_TABLE if rows <= entry[0]), None)
        if entry:
            return ("fused", *entry[1:])
        wide_programs = triton.cdiv(n_out, WIDE_CONFIG[1]) * triton.cdiv(rows, WIDE_CONFIG[2])
        if rows <= WIDE_ROWS and wide_programs >= WIDE_MIN_COVERAGE * _processors(x.device):
            return WIDE_CONFIG
        return "chunked"
    return next((entry[1:] for entry in GEMV_TABLE if rows <= entry[0]), "chunked")


def fused_supported(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """Whether the tensor-core kernel takes this product: 16-bit inputs on a GPU (its PTX does not
    run under the Triton interpreter) and rows that start on absmax blocks of a power-of-two size."""
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cuda"
        and k % blocksize == 0
        and blocksize & (blocksize - 1) == 0
        and blocksize >= 16
        and not INTERPRETED
    )


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split_k(n_out: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits so that the programs cover the multiprocessors at least twice."""
    programs = triton.cdiv(n_out, block_n)
    return max(1, min(triton.cdiv(2 * _processors(device), programs), triton.cdiv(k, block_k)))


def _covering_splits(programs: int, device: torch.device) -> int:
    """The power of two of K splits nearest below what covers the multiprocessors twice with
    ``programs`` programs per split (on an H100, 9 splits measured 18-47% slower than 8, and 3 at
    64 rows 23% slower than 2)."""
    return 1 << (triton.cdiv(2 * _processors(device), programs).bit_length() - 1)


def linear_4bit(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    bias: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    config: Sequence | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.linear_4bit``.

    ``config`` overrides ``choose_config`` (tuning): a ``("fragments", num_warps, SPLIT_K)`` tuple
    forces the register-fragment kernel (``fragments.supported`` inputs only), a ``("fused", BLOCK_N, BLOCK_M, BLOCK_K,
    SPLIT_K, num_warps, num_stages, SCALE_WEIGHTS)`` tuple forces the tensor-core kernel (16-bit
    inputs on a GPU only), a ``("wide", BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages)`` tuple
    the same kernel without K splits (``WIDE_CONFIG``), a ``(ROWS, BLOCK_N, BLOCK_K, SPLIT_K,
    num_warps, lookup)`` tuple the CUDA-core multiply-accumulate kernel, ``"chunked"`` the decode +
    cuBLAS path.
    """
    n_out, k = shape
    x = A.reshape(-1, k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if not (m and n_out):
        return torch.empty((*A.shape[:-1], n_out), dtype=A.dtype, device=A.device)
    nested = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=nested_offset)
    if config is None:
        config = choose_config(x, n_out, k, blocksize, packed)
    if isinstance(config, tuple) and config[0] == "fragments":
        statistics = (nested_absmax, nested_code, nested_offset) if nested_absmax is not None else None
        out = fragments.fragment_linear(
            x, packed, absmax, code, blocksize, n_out, k, bias, statistics, nested_blocksize, config[1:],
            _processors(x.device),
        )  # fmt: skip
    elif isinstance(config, tuple) and config[0] == "fused":
        out = _fused(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize, config[1:])
    elif isinstance(config, tuple) and config[0] == "wide":
        block_n, block_m, block_k, warps, stages = config[1:]
        wide = (block_n, block_m, block_k, 1, warps, stages, True)
        out = _fused(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize, wide, cover=False)
    elif config == "chunked":
        out = _chunked(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize)
    else:
        out = _gemv(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize, config)
    return out.view(*A.shape[:-1], n_out)


def _gemv(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize, config) -> torch.Tensor:
    m = x.shape[0]
    rows, block_n, block_k, split_k, num_warps, lookup_mode = config
    words = k % 8 == 0 and k % blocksize == 0
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    if words:
        block_k = max(block_k, 8)
        weight = packed.reshape(-1).view(torch.uint8).view(torch.int32)
        kernel = _gemv_words_kernel
    else:
        weight = packed.reshape(-1).view(torch.uint8)
        kernel = _gemv_any_kernel
    split_k = split_k or _split_k(n_out, k, block_n, block_k, x.device)
    if split_k > 1:
        out = torch.zeros((m, n_out), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    statistics = (
        (nested["nested_absmax"], nested["nested_code"], nested["nested_offset"])
        if nested["nested_absmax"] is not None
        else (absmax, absmax, absmax)  # never read
    )
    # float32 inputs keep float32 codes: their products promise float32 accuracy
    half = lookup_mode == "half" and x.dtype != torch.float32
    table = derived(code, "float16", torch.Tensor.half) if half else code.float()
    grid = (triton.cdiv(n_out, block_n), split_k)
    kernel[grid](
        x, weight, absmax, table, *statistics, bias if bias is not None else out, out, m, n_out, k,
        x.stride(0), out.stride(0), rows, block_n, block_k, split_k, blocksize, nested["nested_absmax"] is not None,
        nested_blocksize, lookup_mode == "select", bias is not None, num_warps=num_warps,
    )  # fmt: skip
    if split_k == 1:
        return out
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _fused(
    x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize, config, cover=True
) -> torch.Tensor:
    """The tensor-core kernel; with ``cover``, K splits are added (``_covering_splits``) beyond
    the configured ones until the programs cover the multiprocessors twice."""
    block_n, block_m, block_k, split_k, num_warps, num_stages, scale_weights = config
    m = x.shape[0]
    block_k = min(block_k, k & -k)  # a power of two dividing K
    block_m = max(16, min(block_m, triton.next_power_of_2(m)))
    programs = triton.cdiv(n_out, block_n) * triton.cdiv(m, block_m)
    if cover:
        split_k = max(split_k, _covering_splits(programs, x.device))
    split_k = max(1, min(split_k, k // (8 * block_k)))  # at least 8 K tiles per split
    if split_k > 1:
        out = torch.zeros((m, n_out), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    statistics = (
        (nested["nested_absmax"], nested["nested_code"], nested["nested_offset"])
        if nested["nested_absmax"] is not None
        else (absmax, absmax, absmax)  # never read
    )
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(m, block_m), split_k)
    _decode_dot_kernel[grid](
        x, packed.reshape(-1).view(torch.uint8).view(torch.int32), absmax, code.float(), *statistics,
        bias if bias is not None else out, out, m, n_out, k, x.stride(0), k // 8, out.stride(0),
        block_n, block_m, block_k, split_k, blocksize, nested["nested_absmax"] is not None, nested_blocksize,
        scale_weights, bias is not None, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split_k == 1:
        return out
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _chunked(x, packed, absmax, code, blocksize, n_out, k, bias, nested, nested_blocksize) -> torch.Tensor:
    """Decode CHUNK_BYTES of weight rows at a time; cuBLAS writes each product into its columns."""
    is_nested = nested["nested_absmax"] is not None
    # a chunk must start on a packed byte, an absmax block and (nested) a group of absmax codes
    unit = blocksize * (nested_blocksize if is_nested else 1)
    step = unit // math.gcd(k, unit)
    rows_per_chunk = max(step, CHUNK_BYTES // (k * x.element_size()) // step * step)
    out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    data = packed.reshape(-1).view(torch.uint8)
    for start in range(0, n_out, rows_per_chunk):
        stop = min(n_out, start + rows_per_chunk)
        first, last = start * k, stop * k  # element range of the chunk
        chunk_nested = dict(nested)
        if is_nested:
            chunk_nested["nested_absmax"] = nested["nested_absmax"][first // unit :]
        weight = dequantize_4bit(
            data[first // 2 : -(-last // 2)], absmax[first // blocksize : -(-last // blocksize)], code, blocksize,
            (stop - start, k), x.dtype, **chunk_nested, nested_blocksize=nested_blocksize,
        )  # fmt: skip
        columns = out[:, start:stop]
        if bias is not None:
            torch.addmm(bias[start:stop], x, weight.t(), out=columns)
        else:
            torch.mm(x, weight.t(), out=columns)
    return out
