"""33 and more rows ``A @ W.T`` in one kernel on Hopper's ``wgmma``: the 4-bit weight decoded and
scaled straight into the instruction's register operand, 64 to 256 input rows a program (more
rows in equal blocks of at most 256, a second grid dimension, each block's programs decoding their
weight rows again: ``row_tile``).

The few-row ``wgmma`` kernel (``wgmma``) scales each step's products by the rows' absmax, which
needs a second accumulator and a wait for every step's products; here the decoded weights are
scaled instead (rounded once to the 16-bit type, as the decode that feeds cuBLAS rounds them:
bf16 codes by the absmax's two bf16 parts, ``wgmma_ptx.wide_step_ptx``) and the instruction
accumulates across steps.
A step's ``wgmma`` runs while the next step is decoded: each step waits only for the one before
it (``wgmma_ptx.wide_step_ptx``; the accumulators stay in the same registers, tied in and out of each
step's inline PTX). A program is two warpgroups (128 weight rows) sharing one ring of staged
input steps (``wgmma.WgmmaInputs``), four slots, each copied two steps ahead, or one warpgroup
(64 weight rows: twice the programs) for weights of few rows; the warpgroups do not wait for
each other: every thread releases a slot on its "empty" barrier once the slot's products are
done, and thread 0 refills it once all have.

K is split only within a thread block cluster: the programs of a cluster of two to four take
parts of K of the same weight rows and add their partial sums through distributed shared
memory, in rank order (deterministic, no workspace, no atomics, no second kernel;
``wgmma_ptx.cluster_sum_ptx``), each program writing a part of the outputs (in clusters of
three the last program's part is the shorter). That fills the GPU
for weights of too few rows for a wave of programs. Splits across programs that meet in global
memory lost on an H200: by atomics 28672x8192 at 256 rows ran 1.7x slower; 4096-row weights split
four ways with ordered slices of partial sums still lost to the batch-wide tiles at 256 rows;
a stream-K form (persistent programs over K iterations, partial row groups added by a second
kernel) ran no faster. Weights of too few rows even in clusters keep the other paths
(``tuning``, ``dispatch.wide_programs``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fragment_arguments import codes_a_load
from .fragment_grid import aligned, fragments_take
from .fragment_statistics import _nested_of, _scales_from, _stored_group
from .fragments import _fill_table, _rows, _thread_index, _word_loads
from .launch import ProductLaunch
from .ptx import COMPACT_ROW_BYTES, SPREAD_ROW_BYTES, SPREAD_TABLE_OFFSET, nested_code_ptx, table_bytes, table_ptx
from .wgmma import WgmmaInputs, staged_columns, weight_tensors
from .wgmma_ptx import (
    cluster_sum_constraints,
    cluster_sum_ptx,
    wgmma_issue_ptx,
    wgmma_ring_ptx,
    wgmma_wait_ptx,
    wide_constraints,
    wide_drain_constraints,
    wide_release_ptx,
    wide_step_ptx,
)

__all__ = [
    "CLUSTERS",
    "PROGRAM_ROWS",
    "ROW_TILES",
    "SLOTS",
    "blocks",
    "cluster_fits",
    "ring_bytes",
    "row_tile",
    "wgmma_wide_launch",
]

#: The input rows of a program (the instruction's n) a launch may take: the fewest that hold the rows.
#: Smaller tiles lost to the few-row kernels on an H200: 28672x8192 at 16 / 32 rows 81.6 / 86.0
#: us against the fragment kernel's 60.6 and ``wgmma``'s 82.3 (CUDA graph replays).
ROW_TILES = (64, 96, 128, 192, 256)
#: Slots of the ring of staged steps; a step's copy is issued two steps ahead.
SLOTS = 4
#: Weight rows a program may take: two warpgroups of 64 sharing one ring (the default), or one
#: warpgroup, whose programs are twice as many: for weights of too few rows to fill the GPU.
PROGRAM_ROWS = (128, 64)
#: Registers a thread may use, by row tile, where the programs outnumber the multiprocessors:
#: two programs a multiprocessor then run in one wave. The 96-row tile takes 140-155 on its own
#: (Triton 3.6's ptxas); capped, 28672x8192 at 65-96 rows took 118-120 us against 162 on an
#: H200. The 128-row tile spills at 128 registers and runs faster one program a multiprocessor
#: (150 against 196 us).
TWO_PROGRAM_REGISTERS: dict[int, int] = {96: 128}
#: Row tiles whose programs take the spread shared table (``ptx.table_ptx``: a lookup's offset
#: by one byte permute, 65 KiB): the tiles that run one program a multiprocessor, where its loop
#: is 665 instructions against 730; on an H200 the 128- and 256-row tiles ran 1-3% faster
#: (28672x8192 at 256 rows 194.2 against 198.6 us), the 192-row one within the noise. Two 64-row
#: programs a multiprocessor gained 2% on 28672x8192 and lost 6% on 14336x4096 (not profiled);
#: two 96-row ones do not fit.
SPREAD_TABLE_TILES = frozenset({128, 192, 256})
#: Programs a thread block cluster may hold, each taking a part of K of the same weight rows
#: (their partial sums meet in distributed shared memory, ``wgmma_ptx.cluster_sum_ptx``): for
#: weights of too few rows to fill the GPU with programs.
CLUSTERS = (1, 2, 3, 4)


def cluster_fits(k: int, cluster: int) -> bool:
    """Whether programs in clusters of ``cluster`` take a K of ``k`` (a multiple of 64): every
    part one or more iterations of four steps (the last part's last one short where ``k`` is not
    a multiple of 256; parts of an uneven count differ by one iteration)."""
    return cluster in CLUSTERS and k % 64 == 0 and staged_columns(k) >= 256 * cluster


def blocks(rows: int) -> int:
    """Blocks that ``rows`` input rows take, each of at most the largest row tile's rows (one for a
    row tile's rows): the launch's second grid dimension."""
    return max(1, triton.cdiv(rows, ROW_TILES[-1]))


def row_tile(rows: int) -> int:
    """The row tile of each of the ``blocks(rows)`` blocks: the smallest that holds an equal share
    of the rows (300 rows: two of 192, not of 256), so that the last block is not mostly padding."""
    share = triton.cdiv(rows, blocks(rows))
    return next(tile for tile in ROW_TILES if share <= tile)


def threads(program_rows: int) -> int:
    """Threads of a program of ``program_rows`` weight rows (a warpgroup a 64), each of which
    releases every ring slot it read."""
    return 2 * program_rows


def ring_bytes(rows: int) -> int:
    """Dynamic shared memory the ring of ``rows`` (a ``ROW_TILES`` entry) takes: the slots and
    their two barriers each. In clusters the slots then hold the partial sums: ``rows / 2``
    float32 a thread."""
    return SLOTS * (rows * 128 + 16)


def dynamic_bytes(rows: int) -> int:
    """Dynamic shared memory a program of the ``rows`` tile needs, Triton's own included (at most
    ``SPREAD_TABLE_OFFSET`` of it with a spread table): its ring at the end, after a spread table."""
    if table_row_bytes(rows) == COMPACT_ROW_BYTES:
        return ring_bytes(rows)
    return SPREAD_TABLE_OFFSET + table_bytes(SPREAD_ROW_BYTES) + ring_bytes(rows)


def table_row_bytes(rows: int) -> int:
    """Bytes between the shared table's rows of code pairs in the programs of the ``rows`` tile."""
    return SPREAD_ROW_BYTES if rows in SPREAD_TABLE_TILES else COMPACT_ROW_BYTES


def tile_assembly(rows: int, float16: bool, cluster: int = 1, program_rows: int = PROGRAM_ROWS[0]) -> tuple:
    """The kernel's inline PTX for a row tile (its constexpr arguments): the table's fill and
    nested-code read, the step, the step's and the drain's constraints, the ring's set-up (for
    programs of ``program_rows`` weight rows) and a step's copy; then the cluster's size and (in
    clusters) the sums across it and their constraints."""
    element = "f16" if float16 else "bf16"
    row_bytes = table_row_bytes(rows)
    summed = cluster > 1
    return (
        table_ptx(row_bytes, dynamic_bytes(rows)),
        nested_code_ptx(row_bytes),
        wide_step_ptx(rows, element, row_bytes),
        wide_constraints(rows),
        wide_drain_constraints(rows),
        wgmma_ring_ptx(ring_bytes(rows), SLOTS, threads(program_rows), sync=False),
        wgmma_issue_ptx(rows * 128, 8 * SLOTS),
        cluster,
        cluster_sum_ptx(rows // 2, cluster) if summed else "",
        cluster_sum_constraints(rows // 2, cluster) if summed else "",
    )


_DRAIN = tl.constexpr("wgmma.wait_group.sync.aligned 0;")
_WAIT = tl.constexpr(wgmma_wait_ptx(sync=False))
_RELEASE = tl.constexpr(wide_release_ptx(8 * SLOTS))
_RING_SLOTS = tl.constexpr(SLOTS)


@triton.jit
def _ring(thread, lane, RING_ASM: tl.constexpr):
    """The shared address of the ring's first slot (its barriers set up); see ``wgmma._ring``."""
    anchor = tl.sum(lane, axis=0) + thread
    return tl.inline_asm_elementwise(RING_ASM, "=r,r", [anchor], tl.int32, False, 1)


@triton.jit
def _issue(x_address, step, slot, live, full, wait, parity, ROWS: tl.constexpr, ISSUE_ASM: tl.constexpr):
    """Copy staged step ``step`` into the ring slot at ``slot`` when ``live`` (thread 0 issues it),
    completing on the slot's barrier ``full``; first, when ``wait``, for phase ``parity`` of its
    "empty" barrier (every thread done reading the slot's last step)."""
    operands = [x_address, slot, live.to(tl.int32) + full * 0, full, step, wait.to(tl.int32) + full * 0, parity]
    tl.inline_asm_elementwise(ISSUE_ASM, "=r,l,r,r,r,r,r,r", operands, tl.int32, False, 1)


@triton.jit
def _step(acc, words, scale_g, scale_h, table, slot, ROWS: tl.constexpr, STEP_ASM: tl.constexpr,
          STEP_CONSTRAINTS: tl.constexpr):  # fmt: skip
    """``acc`` with one step's products issued into it (still running when this returns)."""
    w_g, w_h = words
    operands = acc + (w_g, w_h, scale_g, scale_h, table, slot)  # noqa: RUF005 (Triton takes no starred tuples)
    return tl.inline_asm_elementwise(STEP_ASM, STEP_CONSTRAINTS, operands, (tl.float32,) * (ROWS // 2), False, 1)


@triton.jit
def _drain(acc, ROWS: tl.constexpr, DRAIN_CONSTRAINTS: tl.constexpr):
    """``acc`` once every ``wgmma`` writing it has finished."""
    return tl.inline_asm_elementwise(_DRAIN, DRAIN_CONSTRAINTS, acc, (tl.float32,) * (ROWS // 2), False, 1)


@triton.jit
def _wide_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, bias_ptr, out_ptr,
    workspace_ptr, counter_ptr, M, N, K, stride_om, ROWS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, FLOAT16: tl.constexpr,
    HAS_BIAS: tl.constexpr, CODES: tl.constexpr, TILED: tl.constexpr, TABLE_ASM: tl.constexpr,
    NESTED_CODE_ASM: tl.constexpr, STEP_ASM: tl.constexpr,
    STEP_CONSTRAINTS: tl.constexpr, DRAIN_CONSTRAINTS: tl.constexpr, RING_ASM: tl.constexpr, ISSUE_ASM: tl.constexpr,
    CLUSTER: tl.constexpr, SUM_ASM: tl.constexpr, SUM_CONSTRAINTS: tl.constexpr, PROGRAM_ROWS: tl.constexpr,
    SHORT: tl.constexpr,
):  # fmt: skip
    """``out = x @ W.T + bias`` for up to ``ROWS`` input rows staged by ``WgmmaInputs`` at
    ``x_ptr``; a warpgroup for each 64 of the program's ``PROGRAM_ROWS`` weight rows
    (``wgmma._wgmma_kernel`` for the weight's layouts and statistics). Packed words are loaded
    two steps ahead, absmax and nested absmax one iteration ahead, the inputs two steps ahead
    into the ring. With ``CLUSTER`` > 1 the programs of a thread block cluster share their
    weight rows, each taking a part of K (whole iterations), and add their partial sums through
    distributed shared memory (``SUM_ASM``: ``wgmma_ptx.cluster_sum_ptx``), each writing a part of the rows'
    outputs. ``SHORT``: K is not a multiple of 256; the inputs are staged in whole iterations
    (zeros past K, ``wgmma.staged_columns``), the last part's last iteration multiplies those
    zeros by masked weights, and an iteration's steps may take two nested absmax."""
    threads: tl.constexpr = 2 * PROGRAM_ROWS
    # the second grid dimension: blocks of ``ROWS`` input rows, staged one after another; a
    # block's rows end at the next block (the last program of a cluster of three holds chunks past it)
    block = tl.program_id(1)
    out_ptr += block.to(tl.int64) * ROWS * stride_om
    M = tl.minimum(M - block * ROWS, ROWS)
    thread = _thread_index(tl.arange(0, threads))
    lane = thread % 32
    quad = lane % 4
    rank = tl.program_id(0) % CLUSTER
    first_row = (tl.program_id(0) // CLUSTER) * PROGRAM_ROWS + (thread // 32) * 16 + lane // 4
    staged = K  # columns of a staged input row: whole iterations
    if SHORT:
        staged = tl.cdiv(K, 256) * 256
    k_start = rank * K
    x_stop = k_start + staged  # the part's staged steps, the last iteration whole
    if CLUSTER > 1:  # each program's part: whole iterations, the parts differing by one at most
        iterations = staged // 256
        k_start = (iterations * rank // CLUSTER) * 256
        x_stop = (iterations * (rank + 1) // CLUSTER) * 256
    k_stop = x_stop  # the part's weight columns
    if SHORT:
        k_stop = tl.minimum(x_stop, K)
    rows = _rows(first_row, lane, N, K, BLOCKSIZE, TILED)
    first = _word_loads(w_ptr, rows, quad, k_start, k_stop, TILED)
    second = _word_loads(w_ptr, rows, quad, k_start + 64, k_stop, TILED)
    stored = _stored_group(absmax_ptr, rows, k_start, k_stop, BLOCKSIZE, CODES)
    nested = _nested_of(nested_absmax_ptr, rows, k_start, k_stop, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, SHORT)
    offset = 0.0
    if NESTED:
        offset = tl.load(nested_offset_ptr)
    # thread 0 sets up the ring's barriers and copies the first two steps at once; the table's
    # fill ends in the barrier that publishes the set-up to the other threads
    ring = _ring(thread, lane, RING_ASM)
    full = ring + _RING_SLOTS * ROWS * 128  # a barrier a slot (its step arrived), then the "empty" ones
    x_address = (x_ptr + thread * 0).to(tl.int64, bitcast=True) + block.to(tl.int64) * staged * (ROWS * 2)
    none = thread * 0
    first_step = none + k_start // 64
    _issue(x_address, first_step, ring, k_start < x_stop, full, none, none, ROWS, ISSUE_ASM)
    _issue(x_address, first_step + 1, ring + ROWS * 128, k_start + 64 < x_stop, full + 8, none, none, ROWS, ISSUE_ASM)
    table = _fill_table(code_ptr, nested_code_ptr, thread, FLOAT16, NESTED, threads, TABLE_ASM)
    zero = tl.zeros((threads,), dtype=tl.float32)
    acc = (zero,) * (ROWS // 2)
    for k in range(k_start, x_stop, 64 * 4):
        scales = _scales_from(stored, nested, table, offset, NESTED, NESTED_CODE_ASM, SHORT)
        stored = _stored_group(absmax_ptr, rows, k + 256, k_stop, BLOCKSIZE, CODES)
        nested = _nested_of(nested_absmax_ptr, rows, k + 256, k_stop, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, SHORT)
        use = (k - k_start) // 256  # each slot's uses so far: one an iteration
        for step in tl.static_range(4):
            column = k + 64 * step
            slot = tl.inline_asm_elementwise(
                _WAIT, "=r,r,r,r", [full + 8 * step, use % 2 + none, ring + step * ROWS * 128], tl.int32, False, 1
            )
            # step s + 2 refills the slot of step s - 2, released at step s - 1 (its use before)
            ahead = (step + 2) % _RING_SLOTS
            refill = use + (step + 2) // _RING_SLOTS
            _issue(
                x_address, column // 64 + 2 + none, ring + ahead * ROWS * 128, column + 128 < x_stop,
                full + 8 * ahead, refill > 0, (refill - 1) % 2 + none, ROWS, ISSUE_ASM,
            )  # fmt: skip
            words = first
            first = second
            second = _word_loads(w_ptr, rows, quad, column + 128, k_stop, TILED)
            acc = _step(acc, words, scales[step], scales[4 + step], table, slot, ROWS, STEP_ASM, STEP_CONSTRAINTS)
            # the step before's products are done (``_step`` waited for them): its slot is free
            behind = (step + _RING_SLOTS - 1) % _RING_SLOTS
            tl.inline_asm_elementwise(
                _RELEASE, "=r,r,r", [full + 8 * behind, (column > k_start).to(tl.int32) + none], tl.int32, False, 1
            )
    acc = _drain(acc, ROWS, DRAIN_CONSTRAINTS)
    # a program's share of the output chunks (``wgmma_ptx.cluster_share``): the last one's short,
    # its outputs past the tile masked by M
    chunks: tl.constexpr = (ROWS // 8 + CLUSTER - 1) // CLUSTER
    if CLUSTER > 1:  # the ring's slots hold the partial sums
        operands = acc + (ring, rank + none)  # noqa: RUF005 (Triton takes no starred tuples)
        acc = tl.inline_asm_elementwise(SUM_ASM, SUM_CONSTRAINTS, operands, (tl.float32,) * (4 * chunks), False, 1)
    _store_tile(out_ptr, bias_ptr, acc, first_row, quad, rank * chunks, M, N, stride_om, chunks, HAS_BIAS)


@triton.jit
def _store_tile(
    out_ptr, bias_ptr, acc, first_row, quad, first_chunk, M, N, stride_om, CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """Write ``CHUNKS`` chunks of accumulators from chunk ``first_chunk`` on: accumulators 4c ..
    4c + 3 of chunk c are input rows 8c + 2 quad and the next, of weight rows g and g + 8."""
    live_g = first_row < N
    live_h = first_row + 8 < N
    bias_g = 0.0
    bias_h = 0.0
    if HAS_BIAS:
        bias_g = tl.load(bias_ptr + first_row, mask=live_g, other=0.0).to(tl.float32)
        bias_h = tl.load(bias_ptr + first_row + 8, mask=live_h, other=0.0).to(tl.float32)
    out_g = out_ptr + (2 * quad + 8 * first_chunk).to(tl.int64) * stride_om + first_row
    for chunk in tl.static_range(CHUNKS):
        batch = 8 * (first_chunk + chunk) + 2 * quad
        here = out_g + 8 * chunk * stride_om
        kind = out_ptr.dtype.element_ty
        tl.store(here, (acc[4 * chunk] + bias_g).to(kind), mask=live_g & (batch < M))
        tl.store(here + stride_om, (acc[4 * chunk + 1] + bias_g).to(kind), mask=live_g & (batch + 1 < M))
        tl.store(here + 8, (acc[4 * chunk + 2] + bias_h).to(kind), mask=live_h & (batch < M))
        tl.store(here + stride_om + 8, (acc[4 * chunk + 3] + bias_h).to(kind), mask=live_h & (batch + 1 < M))


def wgmma_wide_launch(
    weight, x: torch.Tensor, has_bias: bool, processors: int, cluster: int = 1, program_rows: int = PROGRAM_ROWS[0]
) -> ProductLaunch:
    """The launch of the wide ``wgmma`` kernel for ``weight`` (a ``linear.PreparedWeight``) and
    inputs like the 2-d ``x`` (``dispatch.wgmma_supported`` inputs) on a GPU
    of ``processors`` multiprocessors, in programs of ``program_rows`` weight rows (a
    ``PROGRAM_ROWS`` entry) and thread block clusters of ``cluster`` programs (``cluster_fits``)
    that split K."""
    k, n_out, blocksize = weight.k, weight.n_out, weight.blocksize
    if not fragments_take(k, blocksize):
        raise ValueError(f"the wgmma kernel needs K ({k}) a multiple of the blocksize ({blocksize} >= 64)")
    if not cluster_fits(k, cluster):
        raise ValueError(f"the wide wgmma kernel splits K ({k}) across clusters of {CLUSTERS}, in parts of one "
                         f"or more 256-column iterations, not {cluster}")  # fmt: skip
    if program_rows not in PROGRAM_ROWS:
        raise ValueError(f"the wide wgmma kernel's programs take {PROGRAM_ROWS} weight rows, not {program_rows}")
    m = x.shape[0]
    rows = row_tile(m)
    count = blocks(m)
    if count * rows * staged_columns(k) // 2 >= 2**31:
        raise ValueError(f"the wide wgmma kernel stages fewer than 2**31 words of input, not {m} rows of {k}")
    programs = triton.cdiv(n_out, program_rows)
    options = {"num_warps": program_rows // 16}
    if rows in TWO_PROGRAM_REGISTERS and program_rows == PROGRAM_ROWS[0] and programs * cluster > processors:
        options["maxnreg"] = TWO_PROGRAM_REGISTERS[rows]
    codes = codes_a_load(weight)
    float16 = x.dtype == torch.float16
    return ProductLaunch(
        _wide_kernel, (programs, count), options, weight, weight_tensors,
        (m, n_out, k, n_out, rows, blocksize, weight.nested, weight.nested_blocksize, float16, has_bias, codes,
         weight.tiled, *tile_assembly(rows, float16, cluster, program_rows), program_rows, not aligned(k, blocksize)),
        m, n_out, x.dtype, x.device, 0, WgmmaInputs(rows, k, x.device, count), extra_shared=dynamic_bytes(rows),
        head_shared=SPREAD_TABLE_OFFSET if table_row_bytes(rows) == SPREAD_ROW_BYTES else 0, cluster=cluster,
    )  # fmt: skip
