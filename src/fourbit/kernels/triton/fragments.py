"""Few-row ``A @ W.T`` on ``mma.sync``, the 4-bit weight decoded straight into register fragments.

An ``m16n8k16`` tensor-core instruction takes, in each lane of a warp, four 32-bit registers of
its 16 x 16 left operand: row ``g = lane // 4`` and row ``g + 8``, columns ``2t, 2t + 1, 2t + 8,
2t + 9`` (``t = lane % 4``). The product over K does not change when the columns of W and of A
are permuted alike, so each lane loads two packed int32 words (16 consecutive columns) of its two
weight rows, decodes them and hands them to the instruction as columns in the order it expects;
the input rows are loaded in the same order as the right operand (columns ``n`` of the
instruction are input rows, up to 8 per tile). Each packed byte is read once.

Decoding is a shared-memory lookup per packed byte: a table of the two 16-bit codes of each of
the 256 byte values, one column per lane so that a warp's 32 lookups never share a bank (32 KiB
per program, filled once by byte permutes, ``byte_permute``, and 16-byte stores). Byte permutes alone (2.75 integer
instructions per weight) left the integer pipe the limit. A 64-column step of a row lies in one
absmax block (blocksizes of 64 and more), so its products are scaled once per row; the absmax of
four steps is read at once and nested statistics are decoded through the same shared memory.

A program's warps take 16 weight rows each, or (``K_WARPS``) share row groups, each warp taking a
part of K; Triton's reduction sums the parts through shared memory before the store. K may also
be split across programs, whose partial sums meet in a float32 workspace. How many warps a
program has, how many share a row group and whether K is split: ``fragment_grid.fragment_plan``.

Each program works on 1-d tiles of ``32 * num_warps`` elements, one per thread (Triton's layout
for such a tile); lane and row indices come from the thread index the hardware reports. Every
load must keep that layout: a 2-d load that Triton spreads across threads makes it recompute the
index arithmetic in a replicated layout, which gives wrong products
(``fragment_statistics._stored_row``). The PTX runs only on NVIDIA GPUs (compute capability 8.0
and newer); under the interpreter, callers use other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .byte_permute import plane_words
from .common import finish_split, last_of_split, store_output
from .fragment_arguments import INPUT_DTYPE, checked_config, codes_a_load, fragment_tensors, input_layout
from .fragment_grid import GROUP_STEPS, REGISTERS, STEP, aligned, fragment_plan
from .fragment_inputs import permuted_inputs, row_inputs
from .fragment_statistics import _group_scales, _stored_group
from .launch import ProductLaunch, dependent_launches
from .ptx import nested_code_ptx, step_constraints, step_ptx, table_ptx

_TABLE = tl.constexpr(table_ptx())
_STEP_1_BF16 = tl.constexpr(step_ptx(1, "bf16"))
_STEP_1_F16 = tl.constexpr(step_ptx(1, "f16"))
_STEP_2_BF16 = tl.constexpr(step_ptx(2, "bf16"))
_STEP_2_F16 = tl.constexpr(step_ptx(2, "f16"))
_STEP_CONSTRAINTS_1 = tl.constexpr(step_constraints(1))
_STEP_CONSTRAINTS_2 = tl.constexpr(step_constraints(2))
_NESTED_CODE = tl.constexpr(nested_code_ptx())


@triton.jit
def _thread_index(like):
    """The index of the thread that holds each element of ``like``. Reading it from the hardware
    (not deriving it from the element's position) keeps the lane arithmetic right whatever
    element order Triton picks, and hides it from Triton's contiguity analysis, which therefore
    keeps one element per thread."""
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], tl.int32, True, 1)


@triton.jit
def _fill_table(
    code_ptr, nested_code_ptr, thread, FLOAT16: tl.constexpr, NESTED: tl.constexpr, THREADS: tl.constexpr,
    TABLE_ASM: tl.constexpr,
):  # fmt: skip
    """Fill the program's shared table by ``TABLE_ASM`` (``ptx.table_ptx``); returns each lane's
    address in it, or in a spread table its offset in a row."""
    p0, p1, p2, p3, p4, p5, p6, p7 = plane_words(code_ptr, tl.float16 if FLOAT16 else tl.bfloat16)
    c0 = tl.zeros_like(thread).to(tl.float32)
    c1, c2, c3 = c0, c0, c0
    if NESTED:
        c0 = tl.load(nested_code_ptr + thread, mask=thread < 256, other=0.0)
        c1 = tl.load(nested_code_ptr + thread + THREADS, mask=thread + THREADS < 256, other=0.0)
        c2 = tl.load(nested_code_ptr + thread + 2 * THREADS, mask=thread + 2 * THREADS < 256, other=0.0)
        c3 = tl.load(nested_code_ptr + thread + 3 * THREADS, mask=thread + 3 * THREADS < 256, other=0.0)
    return tl.inline_asm_elementwise(
        TABLE_ASM, "=r," + "r," * 8 + "f,f,f,f",
        [p0 + thread * 0, p1, p2, p3, p4, p5, p6, p7, c0, c1, c2, c3], tl.int32, False, 1,
    )  # fmt: skip


@triton.jit
def _rows(first_row, lane, N, K, BLOCKSIZE: tl.constexpr, TILED: tl.constexpr):
    """Where the data of one 16-row group lives for this lane: (word index, absmax block index,
    in-range mask) of its rows g and g + 8, at column 0. In rows, a lane's word of a step lies
    at ``k // 16 + quad`` past its row's start; tiled (``fourbit.layout``), the group's 64 words
    of a step are contiguous, lane by lane, so they lie at ``k + quad`` past the group's start."""
    row_g = first_row
    row_h = first_row + 8
    if TILED:
        start = (first_row // 16) * (K // 16) * 16 + (lane // 4) * 4
        return (start, start + 32, row_g * (K // BLOCKSIZE), row_h * (K // BLOCKSIZE), row_g < N, row_h < N)
    return (
        row_g * (K // 16),
        row_h * (K // 16),
        row_g * (K // BLOCKSIZE),
        row_h * (K // BLOCKSIZE),
        row_g < N,
        row_h < N,
    )


@triton.jit
def _word_loads(w_ptr, rows, quad, k, k_stop, TILED: tl.constexpr):
    """This lane's two packed int32 words of each of a row group's two rows at column ``k``
    (zeros from ``k_stop`` on)."""
    words_g, words_h, _, _, mask_g, mask_h = rows
    live = k < k_stop
    step = k if TILED else k // 16  # see _rows
    return (
        tl.load(w_ptr + words_g + step + quad, mask=mask_g & live, other=0),
        tl.load(w_ptr + words_h + step + quad, mask=mask_h & live, other=0),
    )


@triton.jit
def _step(acc, words, inputs, scale_g, scale_h, table, TILES: tl.constexpr, FLOAT16: tl.constexpr):
    """``acc`` plus one step's scaled products of a row group (eight accumulators; the last four
    stay zero when TILES == 1)."""
    w_g, w_h = words
    x0, x1, x2, x3, x4, x5, x6, x7 = inputs
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    if TILES == 1:
        args = [w_g, w_h, x0, x1, x2, x3, a0, a1, a2, a3, scale_g, scale_h, table]
        if FLOAT16:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                _STEP_1_F16, _STEP_CONSTRAINTS_1, args, (tl.float32,) * 4, True, 1
            )
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                _STEP_1_BF16, _STEP_CONSTRAINTS_1, args, (tl.float32,) * 4, True, 1
            )
    else:
        args = [w_g, w_h, x0, x1, x2, x3, x4, x5, x6, x7, a0, a1, a2, a3, a4, a5, a6, a7, scale_g, scale_h, table]
        if FLOAT16:
            a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(
                _STEP_2_F16, _STEP_CONSTRAINTS_2, args, (tl.float32,) * 8, True, 1
            )
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = tl.inline_asm_elementwise(
                _STEP_2_BF16, _STEP_CONSTRAINTS_2, args, (tl.float32,) * 8, True, 1
            )
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store_group(
    out_ptr, bias_ptr, acc, first_row, quad, M, N, stride_om, TILES: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Write a row group's accumulators (or, split, add them to the workspace ``out_ptr``):
    accumulator c of tile i belongs to weight row g (c < 2) or g + 8 and input row 8i + 2t + c % 2."""
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    batch = 2 * quad
    store_output(out_ptr, bias_ptr, a0, batch, first_row, M, N, stride_om, SPLIT_K, HAS_BIAS)
    store_output(out_ptr, bias_ptr, a1, batch + 1, first_row, M, N, stride_om, SPLIT_K, HAS_BIAS)
    store_output(out_ptr, bias_ptr, a2, batch, first_row + 8, M, N, stride_om, SPLIT_K, HAS_BIAS)
    store_output(out_ptr, bias_ptr, a3, batch + 1, first_row + 8, M, N, stride_om, SPLIT_K, HAS_BIAS)
    if TILES == 2:
        store_output(out_ptr, bias_ptr, a4, batch + 8, first_row, M, N, stride_om, SPLIT_K, HAS_BIAS)
        store_output(out_ptr, bias_ptr, a5, batch + 9, first_row, M, N, stride_om, SPLIT_K, HAS_BIAS)
        store_output(out_ptr, bias_ptr, a6, batch + 8, first_row + 8, M, N, stride_om, SPLIT_K, HAS_BIAS)
        store_output(out_ptr, bias_ptr, a7, batch + 9, first_row + 8, M, N, stride_om, SPLIT_K, HAS_BIAS)


@triton.jit
def _finish_group(
    out_ptr, workspace_ptr, bias_ptr, first_row, quad, M, N, stride_om, TILES: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """The last program of a split row group: move the group's sums from the workspace to the
    output, at the places ``_store_group`` added them."""
    batch = 2 * quad
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch, first_row, M, N, stride_om, HAS_BIAS)
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 1, first_row, M, N, stride_om, HAS_BIAS)
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch, first_row + 8, M, N, stride_om, HAS_BIAS)
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 1, first_row + 8, M, N, stride_om, HAS_BIAS)
    if TILES == 2:
        finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 8, first_row, M, N, stride_om, HAS_BIAS)
        finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 9, first_row, M, N, stride_om, HAS_BIAS)
        finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 8, first_row + 8, M, N, stride_om, HAS_BIAS)
        finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 9, first_row + 8, M, N, stride_om, HAS_BIAS)


@triton.jit
def _sum_warps(value, ROW_GROUPS: tl.constexpr, K_WARPS: tl.constexpr):
    """The sums over the K parts of one accumulator: element i of ``value`` is thread i's, and
    thread i's warp takes part ``i // (32 * ROW_GROUPS)`` of the columns."""
    return tl.sum(tl.reshape(value, (K_WARPS, 32 * ROW_GROUPS)), axis=0)


@triton.jit
def _sum_k_warps(acc, program_row, ROW_GROUPS: tl.constexpr, K_WARPS: tl.constexpr, TILES: tl.constexpr):
    """The accumulators summed over the warps that split the program's columns, with each sum's
    first row and quad (as ``_store_group`` takes them, for element j of the sums: row group
    ``j // 32``, lane ``j % 32``)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    j = tl.arange(0, 32 * ROW_GROUPS)
    lane = j % 32
    a0 = _sum_warps(a0, ROW_GROUPS, K_WARPS)
    a1 = _sum_warps(a1, ROW_GROUPS, K_WARPS)
    a2 = _sum_warps(a2, ROW_GROUPS, K_WARPS)
    a3 = _sum_warps(a3, ROW_GROUPS, K_WARPS)
    if TILES == 2:
        a4 = _sum_warps(a4, ROW_GROUPS, K_WARPS)
        a5 = _sum_warps(a5, ROW_GROUPS, K_WARPS)
        a6 = _sum_warps(a6, ROW_GROUPS, K_WARPS)
        a7 = _sum_warps(a7, ROW_GROUPS, K_WARPS)
    else:  # never stored (_store_group)
        a4, a5, a6, a7 = a0, a1, a2, a3
    return (a0, a1, a2, a3, a4, a5, a6, a7), program_row + (j // 32) * 16 + lane // 4, lane % 4


@triton.jit
def fragment_product(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, bias_ptr, out_ptr,
    workspace_ptr, counter_ptr, program, M, N, K, stride_xm, stride_om, TILES: tl.constexpr, WARPS: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    FLOAT16: tl.constexpr, HAS_BIAS: tl.constexpr, CODES: tl.constexpr, TILED: tl.constexpr, K_WARPS: tl.constexpr,
    PERMUTED: tl.constexpr, DEPENDENT: tl.constexpr, STRADDLING: tl.constexpr,
):  # fmt: skip
    """What ``_fragment_mma_kernel`` computes, for its weight rows from ``16 * program`` row
    groups on (``program``: the program's index among those of this weight; split programs
    count arrivals by the grid's own index). Kernels over several weights call it with each
    weight's tensors and row count."""
    ROW_GROUPS: tl.constexpr = WARPS // K_WARPS
    thread = _thread_index(tl.arange(0, 32 * WARPS))
    lane = thread % 32
    group = lane // 4
    quad = lane % 4
    warp = thread // 32
    first_row = program * (16 * ROW_GROUPS) + (warp % ROW_GROUPS) * 16 + group
    rows = _rows(first_row, lane, N, K, BLOCKSIZE, TILED)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), 256) * 256
    program_start = tl.program_id(1) * k_chunk
    program_stop = tl.minimum(K, program_start + k_chunk)
    if K_WARPS == 1:
        k_start = program_start
        k_stop = program_stop
        k_count = k_stop - k_start
    else:  # the program's warps share its columns: warp // ROW_GROUPS takes the part of that index
        k_count = tl.cdiv(tl.cdiv(k_chunk, K_WARPS), 256) * 256
        k_start = program_start + (warp // ROW_GROUPS) * k_count
        k_stop = tl.minimum(program_stop, k_start + k_count)
    if DEPENDENT:  # nothing the kernel before wrote is read before it completes (``launch.dependent_launches``)
        tl.extra.cuda.gdc_wait()
    # the first packed words and statistics are asked for before the table is filled, so that
    # their memory latency overlaps the fill (whose barrier would otherwise come first)
    first = _word_loads(w_ptr, rows, quad, k_start, k_stop, TILED)
    second = _word_loads(w_ptr, rows, quad, k_start + 64, k_stop, TILED)
    stored = _stored_group(absmax_ptr, rows, k_start, k_stop, BLOCKSIZE, CODES)
    offset = 0.0
    if NESTED:
        offset = tl.load(nested_offset_ptr)
    table = _fill_table(code_ptr, nested_code_ptr, thread, FLOAT16, NESTED, 32 * WARPS, _TABLE)
    zero = tl.zeros((32 * WARPS,), dtype=tl.float32)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero)
    for k_offset in range(0, k_count, 64 * 4):
        k = k_start + k_offset
        scales = _group_scales(
            stored, rows, k, k_stop, table, nested_absmax_ptr, offset, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
            _NESTED_CODE, STRADDLING,
        )  # fmt: skip
        stored = _stored_group(absmax_ptr, rows, k + 256, k_stop, BLOCKSIZE, CODES)
        for step in tl.static_range(4):
            column = k + 64 * step
            if PERMUTED:
                inputs = permuted_inputs(x_ptr, lane, column // 64, column < k_stop, TILES)
            else:
                inputs = row_inputs(x_ptr, group, M, stride_xm, column // 4 + quad * 4, column < k_stop, TILES)
            words = first
            first = second
            second = _word_loads(w_ptr, rows, quad, column + 128, k_stop, TILED)
            acc = _step(acc, words, inputs, scales[step], scales[4 + step], table, TILES, FLOAT16)
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()
    if K_WARPS > 1:
        acc, first_row, quad = _sum_k_warps(acc, program * (16 * ROW_GROUPS), ROW_GROUPS, K_WARPS, TILES)
    if SPLIT_K == 1:
        _store_group(out_ptr, bias_ptr, acc, first_row, quad, M, N, stride_om, TILES, 1, HAS_BIAS)
    else:
        _store_group(workspace_ptr, bias_ptr, acc, first_row, quad, M, N, stride_om, TILES, SPLIT_K, HAS_BIAS)
        if last_of_split(counter_ptr, tl.program_id(0), SPLIT_K):
            _finish_group(out_ptr, workspace_ptr, bias_ptr, first_row, quad, M, N, stride_om, TILES, HAS_BIAS)


@triton.jit
def _fragment_mma_kernel(
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
    TILES: tl.constexpr,
    WARPS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    FLOAT16: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CODES: tl.constexpr,
    TILED: tl.constexpr,
    K_WARPS: tl.constexpr,
    PERMUTED: tl.constexpr,
    DEPENDENT: tl.constexpr,
    STRADDLING: tl.constexpr,
):
    """``out = x @ W.T + bias`` for up to ``8 * TILES`` rows of x; each warp takes 16 weight rows
    (in rows, or ``TILED`` in ``fourbit.layout``'s tiles, which a warp reads as one run), and
    ``K_WARPS`` warps take the same rows, each a part of the program's columns. ``PERMUTED``: x
    is ``fragment_inputs.InputPermute``'s copy, not the rows.

    ``x_ptr`` and ``w_ptr`` are int64 views (four 16-bit inputs, sixteen 4-bit weights per
    element; ``stride_xm`` in int64 elements); K is a multiple of 64 and of the blocksize (the
    last iteration's steps past it are masked); CODES is how many 8-bit absmax codes one load
    reads (4, 2 or 1: ``fragment_statistics._stored_row``); STRADDLING, that an iteration's absmax
    blocks may lie in two blocks of nested statistics (K not ``fragment_grid.aligned``). Each
    iteration takes four steps; words are loaded two steps ahead, absmax one iteration ahead.
    Indices are int32 (``dispatch.fragments_supported`` bounds the weight's size). ``DEPENDENT``:
    launched as a programmatic dependent (``launch.dependent_launches``).
    """
    fragment_product(
        x_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, bias_ptr, out_ptr,
        workspace_ptr, counter_ptr, tl.program_id(0), M, N, K, stride_xm, stride_om, TILES, WARPS, SPLIT_K, BLOCKSIZE,
        NESTED, NESTED_BLOCKSIZE, FLOAT16, HAS_BIAS, CODES, TILED, K_WARPS, PERMUTED, DEPENDENT, STRADDLING,
    )  # fmt: skip


#: The fragment kernel for more than one row: M not specialized, so one compile serves every row
#: count of a tile count (Triton would compile 16 rows, divisible by 16, apart). One row keeps
#: ``_fragment_mma_kernel``, specialized on M == 1: on an H200 it is 2% faster on two of three
#: decode shapes, 3% slower on the third (docs/performance.md), and decoding is its main use.
_fragment_mma_kernel_rows = triton.jit(_fragment_mma_kernel.fn, do_not_specialize=["M"])


def fragment_launch(
    weight, x: torch.Tensor, has_bias: bool, config: tuple[int, ...], processors: int, deterministic: bool = False
):
    """The launch of the fragment kernel for ``weight`` (a ``linear.PreparedWeight``) and inputs
    like the 2-d ``x`` (``dispatch.fragments_supported``); ``config`` is (num_warps, SPLIT_K),
    (num_warps, SPLIT_K, K_WARPS) or (num_warps, SPLIT_K, K_WARPS, PERMUTED). SPLIT_K 0 lets
    ``fragment_plan`` choose both and the warps (K_WARPS, when non-zero, is kept; with
    ``deterministic`` it splits K only among a program's warps); otherwise K_WARPS defaults to 1. PERMUTED (0 or 1)
    reads the inputs from a copy in fragment order (``fragment_inputs``)."""
    warps, split_k, k_warps, permuted = checked_config(config, weight.k, weight.blocksize)
    k, n_out, blocksize = weight.k, weight.n_out, weight.blocksize
    m = x.shape[0]
    stride_xm, tiles, prepare_input = input_layout(x, k, permuted)
    if not split_k:
        warps, k_warps, split_k = fragment_plan(
            triton.cdiv(n_out, 16), k, tiles, warps, processors, k_warps, not deterministic
        )
    k_warps = k_warps or 1
    programs = triton.cdiv(n_out, 16 * (warps // k_warps))
    split_k = max(1, min(split_k, k // (GROUP_STEPS * STEP)))
    codes = codes_a_load(weight)
    dependent = dependent_launches(x.device)
    return ProductLaunch(
        _fragment_mma_kernel if m == 1 else _fragment_mma_kernel_rows, (programs, split_k),
        {"num_warps": warps, "launch_pdl": dependent},
        weight, fragment_tensors,
        (m, n_out, k, stride_xm, n_out, tiles, warps, split_k, blocksize, weight.nested, weight.nested_blocksize,
         x.dtype == torch.float16, has_bias, codes, weight.tiled, k_warps, permuted, dependent,
         not aligned(k, blocksize)),
        m, n_out, x.dtype, x.device, programs if split_k > 1 else 0, prepare_input, registers=REGISTERS,
        input_dtype=INPUT_DTYPE,
    )  # fmt: skip
