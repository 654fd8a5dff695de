"""17-64 rows ``A @ W.T`` on Hopper's ``wgmma``: the 4-bit weight decoded straight into the
instruction's register operand, the inputs read from shared memory once per warpgroup.

The fragment kernel (``fragments``) hands each ``mma.sync`` its input operand from registers, so
every warp loads every input row: past 16 rows those loads would swamp the L1 data path. Here a
warpgroup (4 warps, 64 weight rows) decodes its weight rows as the fragment kernel does (the
register operand of ``wgmma.m64nNk16`` is, warp by warp, ``mma.sync.m16n8k16``'s) and multiplies
them with up to 64 input rows that one bulk copy a step brought into shared memory. The copy
reads a staged form of the inputs (``WgmmaInputs``, one small kernel a call): per 64-column
step, the columns permuted as the lanes hold the weight's and laid out as the instruction's
core matrices, so that a step is one contiguous run. A ring of two slots with a barrier each
keeps the next step's copy in flight while the current one is multiplied.

Each step's products are waited for and scaled by the rows' absmax in float32 (as the fragment
kernel scales its steps); scaling the decoded weights instead, to keep the instruction running
across steps, measured slower and less accurate (the tensor core's long sums lose bits). The
ring lies at the end of the dynamic shared memory, which the launch enlarges
(``KernelLaunch``'s ``extra_shared``); the PTX traps when it was not.

``wgmma`` needs compute capability 9.0 exactly (``sm_90a``, what Triton compiles for it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import finish_split, last_of_split, store_output
from .fragment_arguments import codes_a_load
from .fragment_grid import aligned, fragments_take
from .fragment_statistics import _group_scales, _stored_group
from .fragments import _NESTED_CODE, _TABLE, _fill_table, _rows, _thread_index, _word_loads
from .launch import KernelLaunch, ProductLaunch
from .wgmma_ptx import wgmma_constraints, wgmma_issue_ptx, wgmma_ring_ptx, wgmma_step_ptx, wgmma_wait_ptx

__all__ = ["ROW_TILES", "SLOTS", "WgmmaInputs", "staged_columns", "wgmma_launch"]

#: The input row counts of the instruction (its n) a launch may take: the fewest that hold the rows.
ROW_TILES = (32, 64)
#: Slots of the ring of staged steps; a step's copy is issued one step ahead.
SLOTS = 2
#: Registers a thread may use: four programs (16 warps) a multiprocessor. On an H200 this beat
#: ptxas's own 146 (three programs) by 1.5x at 28672x8192 and 64 rows.
REGISTERS = 128

_STEP_32_BF16 = tl.constexpr(wgmma_step_ptx(32, "bf16"))
_STEP_32_F16 = tl.constexpr(wgmma_step_ptx(32, "f16"))
_STEP_64_BF16 = tl.constexpr(wgmma_step_ptx(64, "bf16"))
_STEP_64_F16 = tl.constexpr(wgmma_step_ptx(64, "f16"))
_CONSTRAINTS_32 = tl.constexpr(wgmma_constraints(32))
_CONSTRAINTS_64 = tl.constexpr(wgmma_constraints(64))
_RING_32 = tl.constexpr(wgmma_ring_ptx(SLOTS * (32 * 128 + 8), SLOTS))
_RING_64 = tl.constexpr(wgmma_ring_ptx(SLOTS * (64 * 128 + 8), SLOTS))
_ISSUE_32 = tl.constexpr(wgmma_issue_ptx(32 * 128))
_ISSUE_64 = tl.constexpr(wgmma_issue_ptx(64 * 128))
_WAIT = tl.constexpr(wgmma_wait_ptx())
_PAIR = tl.constexpr("mov.b64 {$0, $1}, $2;")
_RING_SLOTS = tl.constexpr(SLOTS)


def staged_columns(k: int) -> int:
    """Columns of a staged input row: K completed to whole 256-column iterations, which the
    kernels' rings copy step by step."""
    return triton.cdiv(k, 256) * 256


def ring_bytes(rows: int) -> int:
    """Dynamic shared memory the ring of ``rows`` (a ``ROW_TILES`` entry) takes: the slots and their barriers."""
    return SLOTS * (rows * 128 + 8)


@triton.jit
def _ring(thread, lane, ROWS: tl.constexpr):
    """The shared address of the ring's first slot (its barriers set up). The reduction makes
    Triton declare its dynamic shared memory, at whose end the ring lies."""
    anchor = tl.sum(lane, axis=0) + thread
    if ROWS == 32:
        return tl.inline_asm_elementwise(_RING_32, "=r,r", [anchor], tl.int32, False, 1)
    else:
        return tl.inline_asm_elementwise(_RING_64, "=r,r", [anchor], tl.int32, False, 1)


@triton.jit
def _issue(x_address, step, slot, live, barrier, ROWS: tl.constexpr):
    """Copy staged step ``step`` into the ring slot at ``slot`` when ``live`` (thread 0 issues it)."""
    flag = live.to(tl.int32) + barrier * 0
    if ROWS == 32:
        tl.inline_asm_elementwise(_ISSUE_32, "=r,l,r,r,r,r", [x_address, slot, flag, barrier, step], tl.int32, False, 1)
    else:
        tl.inline_asm_elementwise(_ISSUE_64, "=r,l,r,r,r,r", [x_address, slot, flag, barrier, step], tl.int32, False, 1)


@triton.jit
def _step(acc, words, scale_g, scale_h, table, slot, ROWS: tl.constexpr, FLOAT16: tl.constexpr):
    """``acc`` (16 pairs of float32 accumulators; the last 8 stay zero at 32 rows) plus one
    step's scaled products. Not pure: it waits for the ``wgmma``, whose slot the next copy reuses."""
    w_g, w_h = words
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = acc
    if ROWS == 32:
        args = [w_g, w_h, scale_g, scale_h, table, slot, p0, p1, p2, p3, p4, p5, p6, p7]
        if FLOAT16:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _STEP_32_F16, _CONSTRAINTS_32, args, (tl.int64,) * 8, False, 1
            )
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                _STEP_32_BF16, _CONSTRAINTS_32, args, (tl.int64,) * 8, False, 1
            )
    else:
        args = [w_g, w_h, scale_g, scale_h, table, slot, p0, p1, p2, p3, p4, p5, p6, p7]
        args += [p8, p9, p10, p11, p12, p13, p14, p15]
        if FLOAT16:
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = tl.inline_asm_elementwise(
                _STEP_64_F16, _CONSTRAINTS_64, args, (tl.int64,) * 16, False, 1
            )
        else:
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = tl.inline_asm_elementwise(
                _STEP_64_BF16, _CONSTRAINTS_64, args, (tl.int64,) * 16, False, 1
            )
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15


@triton.jit
def _write_pair(
    out_ptr, workspace_ptr, bias_ptr, pair, index: tl.constexpr, first_row, quad, M, N, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Store (or, split, add to the workspace) accumulator pair ``index``: input rows ``8 (index
    // 2) + 2 quad`` and the next, weight row g (index even) or g + 8."""
    low, high = tl.inline_asm_elementwise(_PAIR, "=f,=f,l", [pair], (tl.float32, tl.float32), True, 1)
    batch = 8 * (index // 2) + 2 * quad
    row = first_row + 8 * (index % 2)
    if SPLIT_K == 1:
        store_output(out_ptr, bias_ptr, low, batch, row, M, N, stride_om, 1, HAS_BIAS)
        store_output(out_ptr, bias_ptr, high, batch + 1, row, M, N, stride_om, 1, HAS_BIAS)
    else:
        store_output(workspace_ptr, bias_ptr, low, batch, row, M, N, stride_om, SPLIT_K, HAS_BIAS)
        store_output(workspace_ptr, bias_ptr, high, batch + 1, row, M, N, stride_om, SPLIT_K, HAS_BIAS)


@triton.jit
def _finish_pair(
    out_ptr, workspace_ptr, bias_ptr, index: tl.constexpr, first_row, quad, M, N, stride_om, HAS_BIAS: tl.constexpr
):
    """The last program of a split row group: pair ``index``'s sums from the workspace to the output."""
    batch = 8 * (index // 2) + 2 * quad
    row = first_row + 8 * (index % 2)
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch, row, M, N, stride_om, HAS_BIAS)
    finish_split(out_ptr, workspace_ptr, bias_ptr, batch + 1, row, M, N, stride_om, HAS_BIAS)


@triton.jit
def _wgmma_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, bias_ptr, out_ptr,
    workspace_ptr, counter_ptr, M, N, K, stride_om, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, FLOAT16: tl.constexpr,
    HAS_BIAS: tl.constexpr, CODES: tl.constexpr, TILED: tl.constexpr, SHORT: tl.constexpr,
):  # fmt: skip
    """``out = x @ W.T + bias`` for up to ``ROWS`` input rows, staged by ``WgmmaInputs`` at ``x_ptr``;
    one warpgroup a program, 64 weight rows (``fragments._fragment_mma_kernel`` for the weight's
    layouts and statistics; K a multiple of the blocksize). Each iteration takes four steps;
    packed words are loaded two steps ahead, absmax one iteration ahead, the inputs one step
    ahead into the ring. ``SHORT``: K is not a multiple of 256, so the last iteration's steps
    past it multiply the staging's zeros (every step's copy is waited for) by masked weights, and
    an iteration's steps may take two nested absmax (``fragment_statistics._nested_of``)."""
    thread = _thread_index(tl.arange(0, 128))
    lane = thread % 32
    quad = lane % 4
    first_row = tl.program_id(0) * 64 + (thread // 32) * 16 + lane // 4
    rows = _rows(first_row, lane, N, K, BLOCKSIZE, TILED)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), 256) * 256
    k_start = tl.program_id(1) * k_chunk
    k_stop = tl.minimum(K, k_start + k_chunk)
    x_stop = k_stop  # the staged inputs' steps: whole iterations
    if SHORT:
        x_stop = tl.minimum(tl.cdiv(K, 256) * 256, k_start + k_chunk)
    first = _word_loads(w_ptr, rows, quad, k_start, k_stop, TILED)
    second = _word_loads(w_ptr, rows, quad, k_start + 64, k_stop, TILED)
    stored = _stored_group(absmax_ptr, rows, k_start, k_stop, BLOCKSIZE, CODES)
    offset = 0.0
    if NESTED:
        offset = tl.load(nested_offset_ptr)
    table = _fill_table(code_ptr, nested_code_ptr, thread, FLOAT16, NESTED, 128, _TABLE)
    ring = _ring(thread, lane, ROWS)
    barriers = ring + _RING_SLOTS * ROWS * 128
    x_address = (x_ptr + thread * 0).to(tl.int64, bitcast=True)
    _issue(x_address, k_start // 64 + thread * 0, ring, k_start < x_stop, barriers, ROWS)
    zero = tl.zeros((128,), dtype=tl.int64)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)
    for k in range(k_start, k_stop, 64 * 4):
        scales = _group_scales(
            stored, rows, k, k_stop, table, nested_absmax_ptr, offset, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
            _NESTED_CODE, SHORT,
        )  # fmt: skip
        stored = _stored_group(absmax_ptr, rows, k + 256, k_stop, BLOCKSIZE, CODES)
        for step in tl.static_range(4):
            column = k + 64 * step
            current = step % _RING_SLOTS
            following = (step + 1) % _RING_SLOTS
            # the slot's uses so far: two an iteration
            phase = ((k - k_start) // 256 * (4 // _RING_SLOTS) + step // _RING_SLOTS) % 2 + thread * 0
            slot = tl.inline_asm_elementwise(
                _WAIT, "=r,r,r,r", [barriers + 8 * current, phase, ring + current * ROWS * 128], tl.int32, False, 1
            )
            _issue(
                x_address, column // 64 + 1 + thread * 0, ring + following * ROWS * 128, column + 64 < x_stop,
                barriers + 8 * following, ROWS,
            )  # fmt: skip
            words = first
            first = second
            second = _word_loads(w_ptr, rows, quad, column + 128, k_stop, TILED)
            acc = _step(acc, words, scales[step], scales[4 + step], table, slot, ROWS, FLOAT16)
    for index in tl.static_range(ROWS // 4):  # pairs 8-15 hold nothing at 32 rows
        pair = acc[index]
        _write_pair(out_ptr, workspace_ptr, bias_ptr, pair, index, first_row, quad, M, N, stride_om, SPLIT_K, HAS_BIAS)
    # a test of a constant, then of a tensor (nested: Triton folds only the first)
    if SPLIT_K > 1:  # noqa: SIM102
        if last_of_split(counter_ptr, tl.program_id(0), SPLIT_K):
            for index in tl.static_range(ROWS // 4):
                _finish_pair(out_ptr, workspace_ptr, bias_ptr, index, first_row, quad, M, N, stride_om, HAS_BIAS)


@triton.jit
def _stage_kernel(x_ptr, out_ptr, M, stride_xm, row_words, total, steps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The inputs (int32 words of two 16-bit values) staged for ``_wgmma_kernel``: per 64-column
    step ``s``, instruction ``j`` (16 columns), core matrix ``b`` (8 rows), half ``h`` of the
    instruction's columns, row ``r`` and lane quad ``t``, word ``32 s + 8 t + 2 j + h`` of row
    ``8 b + r`` (the columns a lane's weight word holds, ``fragments``); zeros from row M and
    from word ``row_words`` of a row on (the steps that complete K's last iteration).
    Inputs of more than ``ROWS`` rows are staged as blocks of ``ROWS`` rows, one after another,
    each of ``steps`` steps."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    quad = index % 4
    row = (index // 4) % 8
    half = (index // 32) % 2
    matrix = (index // 64) % (ROWS // 8)
    instruction = (index // (8 * ROWS)) % 4
    step = (index // (32 * ROWS)) % steps
    source_row = (index // (32 * ROWS * steps)) * ROWS + matrix * 8 + row
    column = step * 32 + quad * 8 + instruction * 2 + half
    live = (index < total) & (source_row < M) & (column < row_words)
    value = tl.load(x_ptr + source_row.to(tl.int64) * stride_xm + column, mask=live, other=0)
    tl.store(out_ptr + index, value, mask=index < total)


#: Words of the staged inputs that one program of ``_stage_kernel`` writes.
_STAGE_BLOCK = 1024


class WgmmaInputs:
    """``_wgmma_kernel``'s ``prepare_input``: 2-d 16-bit inputs of at most ``blocks`` times
    ``rows`` rows (a ``ROW_TILES`` entry) and ``k`` columns (a multiple of 64) staged by one
    direct launch, in ``blocks`` blocks of ``rows`` rows, each of whole 256-column iterations
    (``staged_columns``; zeros past ``k``)."""

    __slots__ = ("k", "launch", "rows", "steps", "total")

    def __init__(self, rows: int, k: int, device: torch.device, blocks: int = 1) -> None:
        self.rows = rows
        self.k = k
        self.steps = staged_columns(k) // 64
        self.total = blocks * self.steps * rows * 32
        grid = (triton.cdiv(self.total, _STAGE_BLOCK),)
        self.launch = KernelLaunch(_stage_kernel, grid, {"num_warps": 4}, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:  # int32 words of whole rows
            x = x.contiguous()
        out = torch.empty(self.total, dtype=torch.int32, device=x.device)
        arguments = (x.shape[0], x.stride(0) // 2, self.k // 2, self.total, self.steps, self.rows, _STAGE_BLOCK)
        if self.launch.direct():  # the pointer: no int32 view to make
            self.launch.run(x.data_ptr(), out.data_ptr(), *arguments)
        else:
            self.launch(x.view(torch.int32), out, *arguments)
        return out


def wgmma_launch(weight, x: torch.Tensor, has_bias: bool, split_k: int = 1) -> ProductLaunch:
    """The launch of the ``wgmma`` kernel for ``weight`` (a ``linear.PreparedWeight``) and inputs
    like the 2-d ``x`` (``dispatch.wgmma_supported``), K split ``split_k`` times across programs."""
    k, n_out, blocksize = weight.k, weight.n_out, weight.blocksize
    if not fragments_take(k, blocksize):
        raise ValueError(f"the wgmma kernel needs K ({k}) a multiple of the blocksize ({blocksize} >= 64)")
    m = x.shape[0]
    rows = next((tile for tile in ROW_TILES if m <= tile), None)
    if rows is None:
        raise ValueError(f"the wgmma kernel takes at most {ROW_TILES[-1]} input rows, got {m}")
    split_k = max(1, min(split_k, triton.cdiv(k, 256)))
    programs = triton.cdiv(n_out, 64)
    codes = codes_a_load(weight)
    return ProductLaunch(
        _wgmma_kernel, (programs, split_k), {"num_warps": 4, "maxnreg": REGISTERS}, weight, weight_tensors,
        (m, n_out, k, n_out, rows, split_k, blocksize, weight.nested, weight.nested_blocksize,
         x.dtype == torch.float16, has_bias, codes, weight.tiled, not aligned(k, blocksize)),
        m, n_out, x.dtype, x.device, programs if split_k > 1 else 0, WgmmaInputs(rows, k, x.device),
        extra_shared=ring_bytes(rows),
    )  # fmt: skip


def weight_tensors(weight) -> tuple:
    """The kernel's weight arguments: packed 8-byte words, absmax, code, nested statistics."""
    return (weight.bytes.view(torch.int64), weight.absmax, weight.code, *weight.statistics)
