"""The absmax of the fragment kernels' row groups: the stored values (float32, or 8-bit codes
four a load), the nested statistics' absmax, and the float32 scales decoded from both through
the shared table (``ptx.nested_code_ptx``). Each returns one value per thread, in the 1-d layout
the fragment kernels keep (``fragments``)."""

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _stored_row(absmax_ptr, block, mask, k, k_stop, BLOCKSIZE: tl.constexpr, CODES: tl.constexpr):
    """The stored absmax (float32 or 8-bit code) of one row's four steps from column ``k``, whose
    block is ``block``: four values, one per step (nothing read for steps from ``k_stop`` on).
    CODES 8-bit codes are one load (``fragment_arguments.codes_a_load``): four in an int32, or
    two in an int16 (rows of an even count of blocks, whose K ends on an even step). Only 1-d
    tensors: a 2-d load could be laid out across threads, which the lane arithmetic does not
    allow."""
    if BLOCKSIZE == 64:  # one block per step
        if CODES == 4:
            words = absmax_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            word = tl.load(words + block // 4, mask=mask & (k < k_stop), other=0)
            s0, s1, s2, s3 = word & 255, (word >> 8) & 255, (word >> 16) & 255, (word >> 24) & 255
        elif CODES == 2:
            halves = absmax_ptr.to(tl.pointer_type(tl.int16), bitcast=True)
            low = tl.load(halves + block // 2, mask=mask & (k < k_stop), other=0).to(tl.int32)
            high = tl.load(halves + block // 2 + 1, mask=mask & (k + 128 < k_stop), other=0).to(tl.int32)
            s0, s1, s2, s3 = low & 255, (low >> 8) & 255, high & 255, (high >> 8) & 255
        else:
            s0 = tl.load(absmax_ptr + block, mask=mask & (k < k_stop), other=0)
            s1 = tl.load(absmax_ptr + block + 1, mask=mask & (k + 64 < k_stop), other=0)
            s2 = tl.load(absmax_ptr + block + 2, mask=mask & (k + 128 < k_stop), other=0)
            s3 = tl.load(absmax_ptr + block + 3, mask=mask & (k + 192 < k_stop), other=0)
    elif BLOCKSIZE == 128:  # two steps per block
        s0 = tl.load(absmax_ptr + block, mask=mask & (k < k_stop), other=0)
        s2 = tl.load(absmax_ptr + block + 1, mask=mask & (k + 128 < k_stop), other=0)
        s1, s3 = s0, s2
    else:  # the four steps share a block
        s0 = tl.load(absmax_ptr + block, mask=mask & (k < k_stop), other=0)
        s1, s2, s3 = s0, s0, s0
    return s0, s1, s2, s3


@triton.jit
def _stored_group(absmax_ptr, rows, k, k_stop, BLOCKSIZE: tl.constexpr, CODES: tl.constexpr):
    """The stored absmax of a row group's four steps from column ``k``: four per row."""
    _, _, blocks_g, blocks_h, mask_g, mask_h = rows
    g0, g1, g2, g3 = _stored_row(absmax_ptr, blocks_g + k // BLOCKSIZE, mask_g, k, k_stop, BLOCKSIZE, CODES)
    h0, h1, h2, h3 = _stored_row(absmax_ptr, blocks_h + k // BLOCKSIZE, mask_h, k, k_stop, BLOCKSIZE, CODES)
    return g0, g1, g2, g3, h0, h1, h2, h3


@triton.jit
def _scale(stored, nested_scale, offset, table, NESTED: tl.constexpr, NESTED_CODE_ASM: tl.constexpr):
    """A float32 absmax from what is stored: itself, or (nested) ``code[q] * scale + offset``,
    the code read from the shared table by ``NESTED_CODE_ASM`` (``ptx.nested_code_ptx``)."""
    if NESTED:
        code = tl.inline_asm_elementwise(NESTED_CODE_ASM, "=f,r,r", [stored.to(tl.int32), table], tl.float32, True, 1)
        return code * nested_scale + offset
    else:
        return stored


@triton.jit
def _nested_group(
    nested_absmax_ptr, rows, k, k_stop, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr
):
    """The nested absmax of a row group's four steps from column ``k`` (0.0 when not NESTED): one
    for row g, one for g + 8, as the four steps' blocks lie in one block of nested statistics
    (``aligned``). None is read from ``k_stop`` on (a warp whose part of K is empty would read
    past the last row's)."""
    _, _, blocks_g, blocks_h, mask_g, mask_h = rows
    nested_g = 0.0
    nested_h = 0.0
    if NESTED:
        live = k < k_stop
        nested_g = tl.load(
            nested_absmax_ptr + (blocks_g + k // BLOCKSIZE) // NESTED_BLOCKSIZE, mask=mask_g & live, other=0.0
        )
        nested_h = tl.load(
            nested_absmax_ptr + (blocks_h + k // BLOCKSIZE) // NESTED_BLOCKSIZE, mask=mask_h & live, other=0.0
        )
    return nested_g, nested_h


@triton.jit
def _step_scales(stored, nested, table, offset, NESTED: tl.constexpr, NESTED_CODE_ASM: tl.constexpr):
    """The absmax of a row group's four steps from their stored values and a nested absmax for
    each (``_stored_group``; eight of each: four for row g, four for g + 8)."""
    g0, g1, g2, g3, h0, h1, h2, h3 = stored
    n0, n1, n2, n3, m0, m1, m2, m3 = nested
    asm: tl.constexpr = NESTED_CODE_ASM
    return (
        _scale(g0, n0, offset, table, NESTED, asm), _scale(g1, n1, offset, table, NESTED, asm),
        _scale(g2, n2, offset, table, NESTED, asm), _scale(g3, n3, offset, table, NESTED, asm),
        _scale(h0, m0, offset, table, NESTED, asm), _scale(h1, m1, offset, table, NESTED, asm),
        _scale(h2, m2, offset, table, NESTED, asm), _scale(h3, m3, offset, table, NESTED, asm),
    )  # fmt: skip


@triton.jit
def _scales_of(stored, nested, table, offset, NESTED: tl.constexpr, NESTED_CODE_ASM: tl.constexpr):
    """The absmax of a row group's four steps from their stored values and ``_nested_group``'s
    nested absmax (one for row g, one for g + 8)."""
    g, h = nested
    return _step_scales(stored, (g, g, g, g, h, h, h, h), table, offset, NESTED, NESTED_CODE_ASM)


@triton.jit
def _nested_steps(
    nested_absmax_ptr, row_block, mask, k, k_stop, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr
):
    """The nested absmax of one row's four steps from column ``k`` (``row_block``: the row's first
    absmax block) where they may lie in two blocks of nested statistics (K not a multiple of 256,
    ``fragment_grid.aligned``): that of the first step's block and that of the last live step's,
    each step taking the one its block lies in."""
    first_block = row_block + k // BLOCKSIZE
    last_block = row_block + tl.minimum(k + 255, k_stop - 1) // BLOCKSIZE
    live = mask & (k < k_stop)
    first = tl.load(nested_absmax_ptr + first_block // NESTED_BLOCKSIZE, mask=live, other=0.0)
    last = tl.load(nested_absmax_ptr + last_block // NESTED_BLOCKSIZE, mask=live, other=0.0)
    within = first_block % NESTED_BLOCKSIZE  # a step's block lies in the first's up to NESTED_BLOCKSIZE
    n1 = tl.where(within < NESTED_BLOCKSIZE - 64 // BLOCKSIZE, first, last)
    n2 = tl.where(within < NESTED_BLOCKSIZE - 128 // BLOCKSIZE, first, last)
    n3 = tl.where(within < NESTED_BLOCKSIZE - 192 // BLOCKSIZE, first, last)
    return first, n1, n2, n3


@triton.jit
def _nested_of(
    nested_absmax_ptr, rows, k, k_stop, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, STRADDLING: tl.constexpr,
):  # fmt: skip
    """The nested absmax of a row group's four steps from column ``k``: ``_nested_group``'s two,
    or with ``STRADDLING`` (the steps' blocks may lie in two blocks of nested statistics) and
    NESTED, eight (``_nested_steps``: four for row g, four for g + 8)."""
    if NESTED and STRADDLING:
        _, _, blocks_g, blocks_h, mask_g, mask_h = rows
        n0, n1, n2, n3 = _nested_steps(nested_absmax_ptr, blocks_g, mask_g, k, k_stop, BLOCKSIZE, NESTED_BLOCKSIZE)
        m0, m1, m2, m3 = _nested_steps(nested_absmax_ptr, blocks_h, mask_h, k, k_stop, BLOCKSIZE, NESTED_BLOCKSIZE)
        nested = (n0, n1, n2, n3, m0, m1, m2, m3)
    else:
        nested = _nested_group(nested_absmax_ptr, rows, k, k_stop, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
    return nested


@triton.jit
def _scales_from(
    stored, nested, table, offset, NESTED: tl.constexpr, NESTED_CODE_ASM: tl.constexpr, STRADDLING: tl.constexpr
):
    """The absmax of a row group's four steps from their stored values and ``_nested_of``'s
    nested absmax (its eight with ``STRADDLING``: ``_step_scales``; else ``_scales_of``)."""
    if NESTED and STRADDLING:
        scales = _step_scales(stored, nested, table, offset, True, NESTED_CODE_ASM)
    else:
        scales = _scales_of(stored, nested, table, offset, NESTED, NESTED_CODE_ASM)
    return scales


@triton.jit
def _group_scales(
    stored, rows, k, k_stop, table, nested_absmax_ptr, offset, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, NESTED_CODE_ASM: tl.constexpr, STRADDLING: tl.constexpr,
):  # fmt: skip
    """The absmax of a row group's four steps from column ``k``, the nested absmax read here;
    ``STRADDLING``: the steps' blocks may lie in two blocks of nested statistics."""
    nested = _nested_of(nested_absmax_ptr, rows, k, k_stop, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, STRADDLING)
    return _scales_from(stored, nested, table, offset, NESTED, NESTED_CODE_ASM, STRADDLING)
