"""Triton 4-bit and 8-bit blockwise quantize, bit-identical with ``fourbit.kernels.reference``
(dequantize: ``dequantize.py``).

Exactness rests on the same float32 operations in the same order: ``x * (1 / absmax)`` with a
correctly rounded division (``div_rn``), a plain divide for a short last block, float32
comparisons with the midpoints for bucketize (one per value, found through the cell table,
see ``_quantizer_tables``), and nested statistics from ``code * scale + offset`` without a
fused multiply-add, hence ``enable_fp_fusion=False`` at launch.

The 4-bit quantizer is bound by integer instructions, not memory (H100 profile in
``docs/performance.md``): its programs are persistent, so that each fills its shared copy of
the cell table once, and they load the next tile while coding one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import num_blocks, packed_nbytes
from .. import reference
from ..derived import derived
from ..reference import BLOCKWISE_GRID_STEPS, blockwise_lookup, sorted_code
from . import tuning
from .common import COMPILE_OPTIONS, INTERPRETED
from .ptx import lane_table_entry_ptx, lane_table_fill_ptx
from .tuning import QuantizeConfig

#: The quantizer looks each scaled value up in a table of cells of magnitudes: float32 bit
#: patterns sharing the exponent and the top ``CELL_MANTISSA_BITS`` of the mantissa, so a cell
#: spans a factor of at most 1.25 and holds at most one NF4 or FP4 midpoint. ``CELLS_PER_SIGN``
#: cells per sign end at [1, 1.25); the first also takes every smaller magnitude (below 2**-16),
#: the last every larger one and NaN. The 128-entry table is small enough for shared memory.
CELL_MANTISSA_BITS = 2
CELLS_PER_SIGN = 64
_CELL_SHIFT = 23 - CELL_MANTISSA_BITS
_LAST_CELL = (0x3F800000 >> _CELL_SHIFT) + 1  # magnitudes from 1.25 up, and NaN
_FIRST_CELL = _LAST_CELL - CELLS_PER_SIGN + 1


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


#: Columns of the shared cell table: entry ``e`` of lane ``l`` sits at ``16 * e + l % 16``. A warp
#: reads 64-bit entries a half-warp at a time, so its lookups never conflict on a bank, and the
#: table (16 KiB) leaves room for many programs per multiprocessor.
_COLUMNS = 16


#: reference.ABSMAX_FLOOR, as the kernels see it
ABSMAX_FLOOR = tl.constexpr(reference.ABSMAX_FLOOR)

_LANE_TABLE_FILL = tl.constexpr(lane_table_fill_ptx(2 * CELLS_PER_SIGN, _COLUMNS))
_LANE_TABLE_ENTRY = tl.constexpr(lane_table_entry_ptx(_COLUMNS))


@triton.jit
def _fill_lane_table(cells_ptr, THREADS: tl.constexpr):
    """Copy the cell table into this program's shared lane table (a barrier included).
    ``THREADS`` is the program's thread count: the PTX runs once per element of a tensor with one
    element per thread. It has side effects, so the lookups that follow stay after it."""
    address = (cells_ptr + tl.zeros((THREADS,), tl.int32)).to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise(_LANE_TABLE_FILL, "=r,l", [address], tl.int32, False, 1)


@triton.jit
def _cell_index(scaled, CELL_SHIFT: tl.constexpr, FIRST_CELL: tl.constexpr, CELLS_PER_SIGN: tl.constexpr):
    """The cell table entry of each value: its magnitude's cell, negative values in the second half."""
    bits = scaled.to(tl.int32, bitcast=True)
    cell = tl.minimum(tl.maximum((bits & 0x7FFFFFFF) >> CELL_SHIFT, FIRST_CELL), FIRST_CELL + CELLS_PER_SIGN - 1)
    return cell - FIRST_CELL + ((bits >> 31) & CELLS_PER_SIGN)


@triton.jit
def _code_from_entry(scaled, entry):
    """A cell's entry holds its midpoint (low word, float32) and the codes at or below it and above
    it (high word, two nibbles): one comparison picks the code, clamping and NaN included."""
    threshold = entry.to(tl.int32).to(tl.float32, bitcast=True)
    pair = (entry >> 32).to(tl.int32)
    return tl.where(scaled > threshold, pair >> 4, pair) & 15


@triton.jit
def _codes_by_cells(scaled, cells_ptr, CELL_SHIFT: tl.constexpr, FIRST_CELL: tl.constexpr,
                    CELLS_PER_SIGN: tl.constexpr, LANE_TABLE: tl.constexpr):  # fmt: skip
    """Code indices of ``scaled`` through the cell table: from the program's shared lane table
    (``LANE_TABLE``, filled by ``_fill_lane_table``), else gathered from a copy in registers
    (the Triton interpreter runs no PTX)."""
    index = _cell_index(scaled, CELL_SHIFT, FIRST_CELL, CELLS_PER_SIGN)
    if LANE_TABLE:
        entry = tl.inline_asm_elementwise(_LANE_TABLE_ENTRY, "=l,r", [index], tl.int64, True, 1)
    else:
        table = tl.load(cells_ptr + tl.arange(0, 2 * CELLS_PER_SIGN))
        entry = tl.reshape(tl.gather(table, tl.reshape(index, (index.numel,)), 0), scaled.shape)
    return _code_from_entry(scaled, entry)


@triton.jit
def _codes_by_comparisons(scaled, midpoints_ptr, order_ptr):
    """Code indices of ``scaled`` by counting the midpoints below it (any code table)."""
    bounded = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    index = tl.zeros(scaled.shape, tl.int32)
    for j in tl.static_range(15):  # bucketize: the number of midpoints strictly below the value
        index += (bounded > tl.load(midpoints_ptr + j)).to(tl.int32)
    index = tl.where(scaled != scaled, 15, index)  # bucketize puts NaN last
    # sorted position -> code index through two registers of 8 nibbles each: no per-element gather
    order_low = tl.load(order_ptr)
    order_high = tl.load(order_ptr + 1)
    return (tl.where(index < 8, order_low, order_high) >> (4 * (index & 7))) & 15


@triton.jit
def _load_tile(x_ptr, first_block, tile, block_limit, n, BLOCKSIZE: tl.constexpr,
               BLOCKS_PER_TILE: tl.constexpr, SHORT: tl.constexpr):  # fmt: skip
    """The input of tile ``tile`` as ``[BLOCKS_PER_TILE, BLOCKSIZE]`` (zeros past the end, so
    past the last tile too)."""
    blocks = first_block + tl.cast(tile, tl.int64) * BLOCKS_PER_TILE + tl.arange(0, BLOCKS_PER_TILE)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    inside = (blocks < block_limit)[:, None]
    if SHORT:
        inside = inside & (offsets < n)  # whole blocks end before n
    return tl.load(x_ptr + offsets, mask=inside, other=0.0)  # contiguous: vectorized loads


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,
    cells_ptr,
    cells_exact_ptr,
    midpoints_ptr,
    order_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    first_block,
    block_limit,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr,
    SHORT: tl.constexpr,
    CELL_SHIFT: tl.constexpr,
    FIRST_CELL: tl.constexpr,
    CELLS_PER_SIGN: tl.constexpr,
    LANE_TABLE: tl.constexpr,
    THREADS: tl.constexpr,
):
    """Quantize whole blocks ``[first_block, block_limit)`` in tiles of ``BLOCKS_PER_TILE`` blocks,
    each program taking every ``num_programs``-th tile (so that the shared lane table is filled
    once per program); ``SHORT``: the one partial last block, which the reference divides by its
    clamped absmax instead of multiplying by the reciprocal. Codes come from the cell table, or,
    for a code table whose midpoints the cells cannot separate (``cells_exact`` is 0), from
    comparisons with every midpoint."""
    exact = tl.load(cells_exact_ptr) != 0
    if LANE_TABLE:
        _fill_lane_table(cells_ptr, THREADS)
    tiles = tl.cdiv(block_limit - first_block, BLOCKS_PER_TILE)
    step = tl.num_programs(0)
    columns = tl.arange(0, BLOCKSIZE)
    raw = _load_tile(x_ptr, first_block, tl.program_id(0), block_limit, n, BLOCKSIZE, BLOCKS_PER_TILE, SHORT)
    for tile in range(tl.program_id(0), tiles, step):
        blocks = first_block + tl.cast(tile, tl.int64) * BLOCKS_PER_TILE + tl.arange(0, BLOCKS_PER_TILE)
        live = blocks < block_limit
        offsets = blocks[:, None] * BLOCKSIZE + columns[None, :]
        inside = live[:, None] & (offsets < n) if SHORT else live[:, None]  # whole blocks end before n
        x = raw.to(tl.float32)
        # the next tile's load is in flight while this one is coded
        raw = _load_tile(x_ptr, first_block, tile + step, block_limit, n, BLOCKSIZE, BLOCKS_PER_TILE, SHORT)

        absmax = tl.reduce(tl.abs(x), 1, _max_with_nan)  # NaN if the block has one, like torch.amax
        clamped = tl.where(absmax < ABSMAX_FLOOR, ABSMAX_FLOOR, absmax)  # keeps NaN, like torch.clamp
        if SHORT:
            scaled = tl.math.div_rn(x, clamped[:, None])
            scaled = tl.where(inside, scaled, 0.0)  # the padding value of an odd count
        else:
            reciprocal = tl.math.div_rn(tl.full(clamped.shape, 1.0, tl.float32), clamped)
            scaled = x * reciprocal[:, None]

        if exact:
            codes = _codes_by_cells(scaled, cells_ptr, CELL_SHIFT, FIRST_CELL, CELLS_PER_SIGN, LANE_TABLE)
        else:
            codes = _codes_by_comparisons(scaled, midpoints_ptr, order_ptr)
        high, low = tl.split(tl.reshape(codes, (BLOCKS_PER_TILE, BLOCKSIZE // 2, 2)))
        packed = ((high << 4) | low).to(tl.uint8)
        byte = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + byte, packed, mask=live[:, None] & (byte < (n + 1) // 2) if SHORT else live[:, None])
        tl.store(absmax_ptr + blocks, clamped if SHORT else absmax, mask=live)


def _nibble_words(order: torch.Tensor) -> torch.Tensor:
    """The 16 entries of ``order`` (each < 16) as two int32 words of eight 4-bit fields, computed on
    the device (no host sync, so quantization can be captured in a CUDA graph)."""
    shifts = 4 * torch.arange(8, device=order.device, dtype=torch.int64)
    words = (order.to(torch.int64).view(2, 8) << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def cell_bounds(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest float32 value of every cell, in table order (positive cells, then
    negative ones); the last cell of each sign is NaN at its open end. Made on ``device``: no
    host-to-device copy, so tables can be derived inside a CUDA graph capture."""
    cell = torch.arange(_FIRST_CELL, _LAST_CELL + 1, dtype=torch.int32, device=device)
    smallest = torch.where(cell == _FIRST_CELL, 0, cell << _CELL_SHIFT)
    largest = torch.where(cell == _LAST_CELL, 0x7FFFFFFF, ((cell + 1) << _CELL_SHIFT) - 1)
    smallest, largest = smallest.view(torch.float32), largest.view(torch.float32)
    return torch.cat([smallest, -largest]), torch.cat([largest, -smallest])


def _quantizer_tables(code: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Everything the 4-bit quantizer needs from ``code``, built on the device without a host sync
    (so it can happen inside a CUDA graph capture): the cell table (int64 per cell), whether it
    is exact for this code (int32 scalar), the float32 midpoints and the sort order as nibble words.

    The reference codes ``v`` as ``order[#{midpoints m : clamp(v, -1, 1) > m}]``. A midpoint at or
    above 1 is never below a clamped value and one below -1 always is, so the count equals
    ``#{m' < v}`` with those midpoints moved to +-inf. Inside a cell ``[lower, upper]`` the count
    changes only at the midpoints in ``[lower, upper)``; when those are all one value ``t`` it is
    ``count(lower)`` up to ``t`` and ``count(upper)`` above, which the entry stores as ``t`` and
    the two resulting codes. The last cell of each sign holds the code of NaN, ``order[15]``: a
    scaled value is at most 1 (and one rounding) in magnitude, or NaN.
    """
    midpoints, order = sorted_code(code.float())
    shifted = torch.where(midpoints >= 1, torch.inf, torch.where(midpoints < -1, -torch.inf, midpoints))
    lower, upper = (bound[:, None] for bound in cell_bounds(code.device))
    is_nan = (lower.isnan() | upper.isnan()).view(-1)
    switching = (shifted >= lower) & (shifted < upper)
    threshold = torch.where(switching, shifted, torch.inf).amin(1)
    exact = ((shifted == threshold[:, None]) | ~switching | is_nan[:, None]).all()
    below = torch.where(is_nan, order[15], order[(shifted < lower).sum(1)])
    above = torch.where(is_nan, order[15], order[(shifted < upper).sum(1)])
    threshold_bits = threshold.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    cells = threshold_bits | (below.to(torch.int64) | above.to(torch.int64) << 4) << 32
    return cells, exact.to(torch.int32).view(1), midpoints, _nibble_words(order)


def program_limit(device: torch.device, config: QuantizeConfig) -> int:
    """Programs of a persistent launch: ``config.programs_per_sm`` per multiprocessor. The
    interpreter (CPU tensors) counts as one multiprocessor, so that CI runs programs of many tiles."""
    if device.type != "cuda":
        return config.programs_per_sm
    return config.programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def quantize_4bit(
    A: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    quant_storage: torch.dtype,
    config: QuantizeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.quantize_4bit``; ``config`` overrides the device's
    ``tuning.KernelTables.quantize`` (tuning)."""
    if config is None:
        config = tuning.for_device(A.device).quantize
    flat = A.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty(packed_nbytes(n), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    if n:
        cells, exact, midpoints, order_words = derived(code, "quantizer", _quantizer_tables)
        arguments = (flat, cells, exact, midpoints, order_words, packed, absmax, n)
        cell_layout = (_CELL_SHIFT, _FIRST_CELL, CELLS_PER_SIGN, not INTERPRETED)
        whole = n // blocksize
        if whole:
            per_tile = max(1, config.tile_elements // blocksize)
            grid = (min(triton.cdiv(whole, per_tile), program_limit(A.device, config)),)
            _quantize_4bit_kernel[grid](
                *arguments, 0, whole, blocksize, per_tile, False, *cell_layout, 32 * config.warps,
                num_warps=config.warps, **COMPILE_OPTIONS,
            )  # fmt: skip
        if whole * blocksize < n:
            _quantize_4bit_kernel[(1,)](
                *arguments, whole, whole + 1, blocksize, 1, True, *cell_layout, 128, num_warps=4, **COMPILE_OPTIONS
            )  # fmt: skip
    return packed.view(quant_storage).unsqueeze(1), absmax


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr, offset_ptr, lookup_ptr, out_ptr, absmax_ptr, n,
    BLOCKSIZE: tl.constexpr, GRID_STEPS: tl.constexpr, HAS_OFFSET: tl.constexpr,
):  # fmt: skip
    """8-bit blockwise quantization of one block, as the reference does it: ``x - offset``, absmax
    ignoring NaN, ``x * (1 / absmax)`` clamped to [-1, 1], its position on the uint16 grid, the
    grid's code."""
    block = tl.program_id(0).to(tl.int64)
    offsets = block * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        x = tl.where(inside, x - tl.load(offset_ptr), 0.0)
    magnitude = tl.abs(x)
    absmax = tl.max(tl.where(magnitude != magnitude, 0.0, magnitude), axis=0)
    scaled = x * tl.math.div_rn(1.0, absmax)
    normed = tl.where(scaled != scaled, scaled, tl.minimum(tl.maximum(scaled, -1.0), 1.0))
    position = tl.math.floor((normed + 1.0) * 0.5 * GRID_STEPS + 0.5)
    position = tl.where(position != position, 0.0, position)  # NaN takes grid point 0, as nan_to_num
    codes = tl.load(lookup_ptr + position.to(tl.int32))
    codes = tl.where(absmax == 0, 0, codes)
    tl.store(out_ptr + offsets, codes, mask=inside)
    tl.store(absmax_ptr + block, absmax)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.quantize_blockwise``; block sizes that are not a power of two
    up to 4096 (accepted for bitsandbytes' CPU behaviour) run the reference."""
    if blocksize & (blocksize - 1) or blocksize > 4096:
        return reference.quantize_blockwise(A, code, blocksize, offset)
    flat = A.reshape(-1).contiguous()
    n = flat.numel()
    out = torch.empty(n, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    if n:
        lookup = derived(code, "blockwise", lambda table: blockwise_lookup(table.float()))
        centre = flat if offset is None else offset.float().reshape(1)
        _quantize_blockwise_kernel[(absmax.numel(),)](
            flat, centre, lookup, out, absmax, n, blocksize, BLOCKWISE_GRID_STEPS, offset is not None,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(A.shape), absmax
