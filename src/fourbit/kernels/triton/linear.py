"""Triton ``A @ W.T + bias`` for a packed 4-bit weight W: decoding fused into the product.

The weight is decoded tile by tile in registers and never written out. A decoded tile is used
by a tensor-core ``tl.dot`` against BLOCK_M input rows; the tile configuration comes from a
small table keyed by the number of input rows (few rows: narrow tiles over many programs, since
reading the weight is the cost; many rows: GEMM-shaped tiles).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .common import decode_weight_tile

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _linear_4bit_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    SELECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    programs_m = tl.cdiv(M, BLOCK_M)
    programs_n = tl.cdiv(N, BLOCK_N)
    # grouped order: consecutive programs share weight tiles in L2
    group = pid // (GROUP_M * programs_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(programs_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * programs_n)) % group_size
    pid_n = (pid % (GROUP_M * programs_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        even_k = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        x_even = tl.load(rows + even_k[None, :], mask=(offs_m[:, None] < M) & (even_k[None, :] < K), other=0.0)
        x_odd = tl.load(rows + even_k[None, :] + 1, mask=(offs_m[:, None] < M) & (even_k[None, :] + 1 < K), other=0.0)
        w_even, w_odd = decode_weight_tile(
            w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, offs_n, k0, N, K,
            BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, SELECT,
        )  # fmt: skip
        if UPCAST:  # the interpreter's half-precision dot is wrong; compute it in float32 there
            acc = tl.dot(x_even.to(tl.float32), tl.trans(w_even), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_odd.to(tl.float32), tl.trans(w_odd), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemv_4bit_kernel(
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
    ALIGNED: tl.constexpr,
    SELECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Few input rows: multiply-accumulate on the CUDA cores, each weight byte read once.

    With SPLIT_K > 1 the K range is shared by several programs that add float32 partial sums
    into ``out_ptr`` (a zeroed float32 buffer; the caller adds the bias and casts).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    for k0 in range(k_start, k_stop, BLOCK_K):
        even_k = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        rows = x_ptr + offs_r[:, None] * stride_xm + even_k[None, :]
        x_even = tl.load(rows, mask=(offs_r[:, None] < M) & (even_k[None, :] < K), other=0.0).to(tl.float32)
        x_odd = tl.load(rows + 1, mask=(offs_r[:, None] < M) & (even_k[None, :] + 1 < K), other=0.0).to(tl.float32)
        w_even, w_odd = decode_weight_tile(
            w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, offs_n, k0, N, K,
            BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, ALIGNED, SELECT,
        )  # fmt: skip
        if ROWS == 1:
            acc += tl.sum(x_even * w_even + x_odd * w_odd, axis=1)[None, :]
        else:
            acc += tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
    out = out_ptr + offs_r[:, None] * stride_om + offs_n[None, :]
    mask = (offs_r[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


#: Few-row configurations: (max rows, ROWS, BLOCK_N, BLOCK_K, SPLIT_K, num_warps); SPLIT_K 0 means
#: "enough K splits to give every multiprocessor work". Measured with benchmarks/tune_triton.py.
GEMV_TABLE: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 1, 32, 256, 0, 4),
    (2, 2, 32, 256, 0, 4),
    (4, 4, 16, 256, 0, 4),
)


#: Tensor-core configurations: (max rows, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the
#: first entry whose max rows covers M is used. Measured with benchmarks/tune_triton.py.
TILE_TABLE: tuple[tuple[int, int, int, int, int, int], ...] = (
    (16, 16, 64, 128, 4, 4),
    (64, 64, 64, 128, 4, 4),
    (256, 128, 128, 64, 8, 3),
    (1 << 62, 128, 256, 64, 8, 3),
)


def tile_config(rows: int) -> tuple:
    """The tensor-core kernel's ("dot", BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for ``rows`` rows."""
    return ("dot", *next(row[1:] for row in TILE_TABLE if rows <= row[0]))


def _split_k(n_out: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits so that the programs cover the multiprocessors at least twice."""
    programs = triton.cdiv(n_out, block_n)
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * processors, programs), triton.cdiv(k, block_k)))


def _k_tile(k: int, blocksize: int, block_k: int) -> tuple[int, bool]:
    """The K tile to use and whether the fast aligned path applies: when K is a multiple of the
    blocksize, tiles are capped at the blocksize so that each lies inside one block per row."""
    block_k = max(32, min(block_k, triton.next_power_of_2(k)))
    if k % blocksize == 0:
        return min(block_k, blocksize), True
    return block_k, False


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
    config: Sequence[int] | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.linear_4bit``.

    Few rows go to the multiply-accumulate kernel, more to the tensor-core one. ``config``
    overrides the table: a 5-tuple ``(ROWS, BLOCK_N, BLOCK_K, SPLIT_K, num_warps)`` selects the
    former, ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` with a leading "dot" the latter
    (used by benchmarks/tune_triton.py).
    """
    n_out, k = shape
    x = A.reshape(-1, k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if not (m and n_out):
        return torch.empty((*A.shape[:-1], n_out), dtype=A.dtype, device=A.device)
    nested = nested_absmax is not None
    weight = (packed.reshape(-1).view(torch.uint8), absmax, code.float())
    # unused pointer arguments get a tensor that is never read
    statistics = (nested_absmax, nested_code, nested_offset) if nested else (absmax, absmax, absmax)
    if config is None:
        config = tile_config(m) if m > GEMV_TABLE[-1][0] else next(row[1:] for row in GEMV_TABLE if m <= row[0])
    if config[0] == "dot":
        out = _dot(x, weight, statistics, nested, nested_blocksize, blocksize, n_out, k, bias, config[1:])
    else:
        out = _gemv(x, weight, statistics, nested, nested_blocksize, blocksize, n_out, k, bias, config)
    return out.view(*A.shape[:-1], n_out)


def _gemv(x, weight, statistics, nested, nested_blocksize, blocksize, n_out, k, bias, config) -> torch.Tensor:
    m = x.shape[0]
    rows, block_n, block_k, split_k, num_warps, *select = config
    block_k, aligned = _k_tile(k, blocksize, block_k)
    split_k = split_k or _split_k(n_out, k, block_n, block_k, x.device)
    if split_k > 1:
        out = torch.zeros((m, n_out), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_out, block_n), split_k)
    _gemv_4bit_kernel[grid](
        x, *weight, *statistics, bias if bias is not None else out, out, m, n_out, k, x.stride(0), out.stride(0),
        rows, block_n, block_k, split_k, blocksize, nested, nested_blocksize, aligned, bool(select and select[0]),
        bias is not None, num_warps=num_warps,
    )  # fmt: skip
    if split_k == 1:
        return out
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _dot(x, weight, statistics, nested, nested_blocksize, blocksize, n_out, k, bias, config) -> torch.Tensor:
    m = x.shape[0]
    block_m, block_n, block_k, num_warps, num_stages, *select = config
    block_k, aligned = _k_tile(k, blocksize, block_k)
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n_out, block_n),)
    _linear_4bit_kernel[grid](
        x, *weight, *statistics, bias if bias is not None else out, out, m, n_out, k, x.stride(0), out.stride(0),
        block_m, block_n, block_k, 8, blocksize, nested, nested_blocksize, aligned, bool(select and select[0]),
        bias is not None, "ieee" if x.dtype == torch.float32 else "tf32", INTERPRETING,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
