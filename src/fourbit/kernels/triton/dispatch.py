"""Which Triton product runs: the kernel and tile configuration for an input and weight shape
(``choose_config``, from the device's ``tuning`` tables) and the K splits that fill the GPU."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton

from . import fragment_arguments, fragment_grid, tuning, wgmma, wgmma_wide
from .common import INTERPRETED
from .launch import CLUSTER_LAUNCH, DIRECT

#: Weight rows a program of the tensor-core kernel where the tables' programs are too few
#: (``KernelTables.fused_narrow_fill``).
NARROW_FUSED_ROWS = 64


def choose_config(
    x: torch.Tensor,
    n_out: int,
    k: int,
    blocksize: int,
    packed: torch.Tensor | None = None,
    deterministic: bool = False,
    captured: bool = False,
) -> tuple | str:
    """The kernel and tile configuration for input rows ``x`` (2-d) against an ``n_out x k``
    weight (packed in ``packed``, when given), from the device's ``tuning.KernelTables`` (their
    ``captured`` tables for a product recorded into a CUDA graph): a ``fragments``, ``fused`` or
    ``gemv`` entry, a ``wgmma``, ``wgmma_wide`` (its cluster and program rows) or ``wide``
    configuration, or ``"chunked"``. With ``deterministic`` the batch-wide tiles never split K
    (``linear.PreparedWeight._prepare`` keeps the other kernels' automatic splits within their
    programs)."""
    rows = x.shape[0]
    tables = tuning.for_device(x.device)
    if captured and tables.captured is not None:
        tables = tables.captured
    if not INTERPRETED and fragments_supported(x, k, blocksize, packed):
        entry = next((entry for entry in tables.fragments if rows <= entry[0]), None)
        if entry:
            permuted = any(rows >= rule.min_rows and n_out * k >= rule.min_elements for rule in tables.fragment_permute)
            return ("fragments", entry.num_warps, entry.split_k, entry.k_warps, int(permuted))
    rule = tables.wgmma_wide
    if (
        rule
        and min_rows(rule, k) <= rows <= (most := wide_max_rows(rule, n_out, k))
        and wgmma_supported(x, k, blocksize, packed, most)
    ):
        wide = wide_programs(rule, rows, n_out, k, processors(x.device))
        if wide:
            return ("wgmma_wide", *wide)
    rule = tables.wgmma
    if (
        rule
        and min_rows(rule, k) <= rows <= rule.max_rows
        and wgmma_supported(x, k, blocksize, packed)
        and triton.cdiv(n_out, 64) >= rule.min_waves * processors(x.device)
    ):
        return ("wgmma", 1)
    if fused_supported(x, k, blocksize):
        entry = next((entry for entry in tables.fused if rows <= entry[0]), None)
        if entry:
            return ("fused", *fused_entry(tables, entry, rows, n_out, k, x.device)[1:])
        if rows <= tables.wide_rows:
            return wide_config(tables, rows, n_out, k, processors(x.device), deterministic)
        return "chunked"
    return next((entry[1:] for entry in tables.gemv if rows <= entry[0]), "chunked")


def min_rows(rule: tuning.WgmmaRule, k: int) -> int:
    """The fewest input rows a ``wgmma`` kernel's ``rule`` gives it against a K of ``k``:
    ``min_rows``, ``short_min_rows`` for K of part of an iteration, or (the wide kernel's)
    ``quarter_min_rows`` for clusters of four of one-iteration parts."""
    if rule.short_min_rows and k % (fragment_grid.STEP * fragment_grid.GROUP_STEPS):
        return max(rule.min_rows, rule.short_min_rows)
    if rule.quarter_min_rows and k // 1024 == 1:
        return min(rule.min_rows, rule.quarter_min_rows)
    return rule.min_rows


def wide_max_rows(rule: tuning.WgmmaRule, n_out: int, k: int) -> int:
    """The most input rows the wide ``wgmma`` kernel may take against an ``n_out x k`` weight:
    ``max_rows``, or for weights of at least ``large_min_elements`` elements ``large_max_rows``
    (their many programs keep the kernel ahead of decode + cuBLAS longer)."""
    if rule.large_max_rows and n_out * k >= rule.large_min_elements:
        return max(rule.max_rows, rule.large_max_rows)
    return rule.max_rows


def wide_programs(rule: tuning.WgmmaRule, rows: int, n_out: int, k: int, processors: int) -> tuple[int, int] | None:
    """The wide ``wgmma`` kernel's programs (as ``split_programs``), or, up to the smallest row
    tile, 64-row programs in clusters of four in place of those (or of any other kernel, with
    ``quarter_alone``) where they fill the share of the multiprocessors that ``quarter_fill``
    gives for their parts' iterations (``WgmmaRule``); below ``min_rows``, only those."""
    found = split_programs(rule, rows, n_out, k, processors) if rows >= rule.min_rows else None
    narrow = wgmma_wide.PROGRAM_ROWS[-1]
    # up to the smallest row tile, 64-row programs in clusters of two are ``narrow_small_waves``' choice
    if rows > wgmma_wide.ROW_TILES[0] or found == (2, narrow) or not (found or rule.quarter_alone):
        return found
    iterations = k // 1024  # a part's, of four
    if not (CLUSTER_LAUNCH and 1 <= iterations <= len(rule.quarter_fill) and wgmma_wide.cluster_fits(k, 4)):
        return found
    low, high = rule.quarter_fill[iterations - 1]
    return (4, narrow) if low * processors <= 4 * triton.cdiv(n_out, narrow) <= high * processors else found


def split_programs(rule: tuning.WgmmaRule, rows: int, n_out: int, k: int, processors: int) -> tuple[int, int] | None:
    """The wide ``wgmma`` kernel's programs for ``rows`` input rows against an ``n_out x k``
    weight on ``processors`` multiprocessors (``rule``: ``tables.wgmma_wide``), as (programs a
    cluster, weight rows a program), or None (another kernel): unsplit 128-row programs from
    ``min_waves`` of them; else, where this Triton launches clusters, clusters of two that split
    K whose programs fill ``cluster_fill`` of one wave and no more, of 128 weight rows, or of 64
    (one warpgroup) from ``narrow_min_rows`` input rows, each size also in clusters of three
    where K is long enough (``third_min_iterations``); before all of these, up to the smallest
    row tile, 64-row programs in clusters of two that fill ``narrow_small_fill`` of
    ``narrow_small_waves`` waves and no more, and no other clusters where K is in
    ``one_launch_k``; there too, in place of unsplit 128-row programs, clusters of two of them
    or unsplit 64-row programs (``small_pairs_waves``, ``small_narrow_waves``), and past it
    clusters of two of them for a wave or more (``pairs_past_a_wave``: ``WgmmaRule``).
    Past the largest row tile every program runs once for each block of its rows
    (``wgmma_wide.blocks``): the counts are the programs of all blocks."""
    wide, narrow = wgmma_wide.PROGRAM_ROWS
    blocks = wgmma_wide.blocks(rows)
    clusters = CLUSTER_LAUNCH and wgmma_wide.cluster_fits(k, 2)
    if clusters and rule.narrow_small_waves and rows <= wgmma_wide.ROW_TILES[0]:
        waves = rule.narrow_small_waves * processors
        if rule.narrow_small_fill * waves <= 2 * triton.cdiv(n_out, narrow) <= waves:
            return (2, narrow)
    programs = triton.cdiv(n_out, wide)
    if blocks * programs >= rule.min_waves * processors:
        if rows <= wgmma_wide.ROW_TILES[0]:
            if programs <= rule.small_pairs_waves * processors:
                return (2 if clusters else 1, wide)
            if programs <= rule.small_narrow_waves * processors:
                return (1, narrow)
        most_rows, waves = rule.pairs_past_a_wave
        if clusters and rows <= most_rows and processors < programs <= waves * processors:
            return (2, wide)
        return (1, wide)
    low_k, high_k = rule.one_launch_k
    if not (clusters and rule.cluster_fill) or (rows <= wgmma_wide.ROW_TILES[0] and low_k <= k < high_k):
        return None
    narrow_too = rule.narrow_min_rows and rows >= rule.narrow_min_rows
    thirds = narrow_too and rule.third_min_iterations and k // 256 >= 3 * rule.third_min_iterations
    for program_rows in (wide, narrow) if narrow_too else (wide,):
        for cluster in (2, 3) if thirds else (2,):
            if rule.cluster_fill * processors <= blocks * cluster * triton.cdiv(n_out, program_rows) <= processors:
                return (cluster, program_rows)
    return None


def wide_config(
    tables: tuning.KernelTables, rows: int, n_out: int, k: int, processors: int, deterministic: bool = False
) -> tuple | str:
    """The batch-wide tiles for ``rows`` input rows against an ``n_out x k`` weight. Too few
    programs for the ``processors`` split K as many times as one wave holds, when that fills
    ``wide_split_fill`` of it and each split keeps ``wide_split_columns`` columns (never when
    ``deterministic``); unsplit programs run when they cover ``wide_min_coverage``; otherwise
    ``"chunked"``."""
    wide = tables.wide
    programs = triton.cdiv(n_out, wide.block_n) * triton.cdiv(rows, wide.block_m)
    splits = processors // programs
    if (
        not deterministic
        and splits > 1
        and programs * splits >= tables.wide_split_fill * processors
        and k // splits >= tables.wide_split_columns
    ):
        return wide._replace(split_k=splits)
    if programs >= tables.wide_min_coverage * processors:
        return wide
    return "chunked"


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


def processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def split_k(n_out: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits so that the programs cover the multiprocessors at least twice."""
    programs = triton.cdiv(n_out, block_n)
    return max(1, min(triton.cdiv(2 * processors(device), programs), triton.cdiv(k, block_k)))


def fused_entry(
    tables: tuning.KernelTables,
    entry: tuning.FusedConfig,
    rows: int,
    n_out: int,
    k: int,
    device: torch.device,
) -> tuning.FusedConfig:
    """``entry``, or it with programs of ``NARROW_FUSED_ROWS`` weight rows where its own, K split
    as far as they may be, fill less than ``tables.fused_narrow_fill`` waves (judged on the
    automatic splits, also for deterministic products, which keep one)."""
    if not tables.fused_narrow_fill or entry.block_n <= NARROW_FUSED_ROWS:
        return entry
    tiles = (entry.block_n, entry.block_m, entry.block_k, entry.split_k)
    grid, _ = fused_grid(rows, n_out, k, tiles, device)
    if grid[0] * grid[1] * grid[2] >= tables.fused_narrow_fill * processors(device):
        return entry
    return entry._replace(block_n=NARROW_FUSED_ROWS)


def fused_grid(
    rows: int, n_out: int, k: int, tiles: Sequence[int], device: torch.device, cover: bool = True
) -> tuple[tuple[int, int, int], int]:
    """The tensor-core kernel's grid (weight-row programs, input-row programs, K splits) and input
    rows a program, for ``tiles`` (block_n, block_m, block_k as K allows it, split_k). With
    ``cover``, K splits are added (``covering_splits``) beyond the configured ones until the
    programs cover the multiprocessors twice; a split keeps at least 8 K tiles."""
    block_n, block_m, block_k, split_k = tiles
    block_m = max(16, min(block_m, triton.next_power_of_2(rows)))
    grid_n, grid_m = triton.cdiv(n_out, block_n), triton.cdiv(rows, block_m)
    if cover:
        split_k = max(split_k, covering_splits(grid_n * grid_m, device))
    return (grid_n, grid_m, max(1, min(split_k, k // (8 * block_k)))), block_m


def covering_splits(programs: int, device: torch.device) -> int:
    """The power of two of K splits nearest below what covers the multiprocessors twice with
    ``programs`` programs per split (on an H100, 9 splits measured 18-47% slower than 8, and 3 at
    64 rows 23% slower than 2)."""
    return 1 << (triton.cdiv(2 * processors(device), programs).bit_length() - 1)


def fragments_supported(x: torch.Tensor, k: int, blocksize: int, packed: torch.Tensor | None = None) -> bool:
    """Whether the fragment kernel takes this product: at most ``8 * MAX_TILES`` rows of 16-bit
    input on an NVIDIA GPU of compute capability 8.0 or newer, blocksizes of 64 and more, K a
    multiple of the blocksize (``fragment_grid.fragments_take``), and packed data (when given) that
    starts on 16 bytes and holds fewer than 2**35 weights (int32 indices)."""
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cuda"
        and x.shape[0] <= fragment_arguments.TILE_ROWS * fragment_arguments.MAX_TILES
        and fragment_grid.fragments_take(k, blocksize)
        and (packed is None or (packed.data_ptr() % 16 == 0 and packed.nbytes < 2**34))
        and torch.version.hip is None
        and _capability(x.device) >= (8, 0)
    )


def wgmma_supported(
    x: torch.Tensor, k: int, blocksize: int, packed: torch.Tensor | None = None, max_rows: int = wgmma.ROW_TILES[-1]
) -> bool:
    """Whether the ``wgmma`` kernels take this product: at most ``max_rows`` rows (the few-row
    kernel's; the wide one's rule's ``max_rows`` for it) of 16-bit input on a GPU of compute
    capability 9.0 (``wgmma`` is ``sm_90a``'s), what the fragment kernel asks of the weight
    (``fragments_supported``), and Triton 3.3 or newer, whose direct launch carries the kernel's
    own shared memory."""
    return (
        DIRECT
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cuda"
        and 0 < x.shape[0] <= max_rows
        and fragment_grid.fragments_take(k, blocksize)
        and (packed is None or (packed.data_ptr() % 16 == 0 and packed.nbytes < 2**34))
        and torch.version.hip is None
        and _capability(x.device) == (9, 0)
    )


def prefers_tiles(device: torch.device, shape: Sequence[int], blocksize: int) -> bool:
    """Whether a weight of ``shape`` (N, K) and ``blocksize`` is better kept in ``fourbit.layout``'s
    tiles on ``device``: the fragment kernel takes its few-row products there
    (``fragments_supported``) and reads tiles as one run per warp (an H200 read 28672x8192 in
    31 us so, against 48 us in rows). The other product kernels read tiles as fast as rows."""
    n, k = shape
    return (
        device.type == "cuda"
        and not INTERPRETED
        and fragment_grid.fragments_take(k, blocksize)
        and n * k // 2 < 2**34
        and torch.version.hip is None
        and _capability(device) >= (8, 0)
    )


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, read once (each read costs microseconds of host time)."""
    return torch.cuda.get_device_capability(device)
