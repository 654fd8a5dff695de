"""How the fragment kernel's work is laid over a GPU: its step geometry, which K it takes, and how
many warps and programs share each group of 16 weight rows (``fragments`` launches it)."""

from __future__ import annotations

import triton

__all__ = [
    "GROUP_STEPS",
    "REGISTERS",
    "RESIDENT_PROGRAMS",
    "STEP",
    "aligned",
    "fragment_parts",
    "fragment_plan",
    "fragment_splits",
    "fragments_take",
]

#: Columns of K one step of the kernel covers (four lanes of 16 columns), and steps per loop
#: iteration (the absmax of an iteration's steps is read at once).
STEP = 64
GROUP_STEPS = 4


def aligned(k: int, blocksize: int) -> bool:
    """Whether K is a multiple of the blocksize and of an iteration's 256 columns. Then every
    iteration's absmax blocks lie in one block of nested statistics (whose size is a multiple of
    4), which the kernels read once per iteration; other K read a nested absmax a step."""
    return k % max(blocksize, GROUP_STEPS * STEP) == 0


def fragments_take(k: int, blocksize: int) -> bool:
    """Whether the fragment kernel takes K: a multiple of the blocksize (64 or more) and so of a
    step's 64 columns. Its last iteration may end early (its steps past K are masked), and where
    K is not ``aligned`` its iterations read a nested absmax a step (Qwen2.5-72B's MLP, K 29568)."""
    return blocksize >= STEP and k % blocksize == 0


#: Registers a thread of the fragment kernel is allowed. ptxas from CUDA 12 takes 124-128 on its
#: own; the one from CUDA 13 takes 80 unless told (``launch.needs_register_budget``), and the
#: kernel, which keeps its next words in registers, is then up to twice as slow.
REGISTERS = 128

#: Programs of the fragment kernel that one multiprocessor holds at once: 4 warps of up to
#: ``REGISTERS`` registers a thread and 34 KiB of shared memory each (measured with Nsight
#: Compute on an H200). Capping registers to fit 5 or 6 was slower.
RESIDENT_PROGRAMS = 4

#: Warps of the fragment kernel one multiprocessor holds at once, and so the most one program takes.
RESIDENT_WARPS = 4 * RESIDENT_PROGRAMS


def fragment_splits(programs: int, processors: int) -> int:
    """The K splits of ``programs`` row programs: enough for two programs on each multiprocessor
    when they leave some idle; two when they cover each three times or more but all fit at once
    (``RESIDENT_PROGRAMS``), as then some multiprocessors hold one program more than others and
    finish last, while twice as many programs are spread by the scheduler as others finish (an
    H200 ran 28672x8192, 448 programs on 132 multiprocessors, 4% faster at 1 row and 28% at 16);
    else none, as partial sums cost more than the split gains (14336x4096, 224 programs, ran
    10-15% faster unsplit)."""
    if programs < processors:
        return triton.cdiv(2 * processors, programs)
    return 2 if 3 * processors <= programs <= RESIDENT_PROGRAMS * processors else 1


def fragment_parts(
    row_groups: int, k: int, warps: int, processors: int, k_warps: int = 0, across_programs: bool = True
) -> tuple[int, int]:
    """(K warps, K splits) for ``row_groups`` groups of 16 weight rows: the parts of K that a
    program's warps share (summed in the program, through shared memory), and the programs each
    row group is split over (summed across programs: atomics, a counter and the last program's
    write-out, three round trips to L2 that cost a small product more than the split gains).

    Where ``fragment_splits`` would split K three ways or more, the program's warps take a row
    group together; where it would split less (the row programs cover the multiprocessors), two
    warps share each. Only when those programs still leave multiprocessors idle and each warp
    would take more than four iterations (few rows, long K) is K split across programs instead.
    An H200 at one row took 4096x4096 from 8.0 to 5.5 us and 28672x8192 from 46.9 to 44.8, and
    1024x14336 at 9.6 us shared against 8.1 split (docs/performance.md). ``k_warps`` (non-zero)
    is kept, unsplit; without ``across_programs`` K is never split across programs (a fixed order
    of sums)."""
    if k_warps:
        return k_warps, 1
    splits = fragment_splits(triton.cdiv(row_groups, warps), processors)
    k_warps = warps if splits >= 3 else max(1, warps // 2)
    iteration = GROUP_STEPS * STEP
    while k_warps > 1 and k < k_warps * iteration:  # each warp takes whole iterations
        k_warps //= 2
    if across_programs and triton.cdiv(row_groups * k_warps, warps) < processors and k > k_warps * 4 * iteration:
        return 1, splits
    return k_warps, 1


def fragment_plan(
    row_groups: int, k: int, tiles: int, warps: int, processors: int, k_warps: int = 0, across_programs: bool = True
) -> tuple[int, int, int]:
    """(warps, K warps, K splits) of the fragment programs for ``row_groups`` groups of 16 weight
    rows and ``tiles`` 8-row input tiles: ``fragment_parts`` for programs of ``warps`` warps,
    unless programs of more warps sharing each row group's K (``wide_k_warps``) fill the warp
    slots the table's programs leave empty. At 9-16 rows a program of that many warps takes one
    row group; at 1-8 rows a program of ``RESIDENT_WARPS`` takes as many as it holds, where the
    table's programs would split K across programs or each warp keeps four iterations (with
    fewer, a warp's table and sums cost more than the latency they hide). On an H200, weights
    read from memory: 4096x14336 27.2 -> 21.2 us at 16 rows and 16.3 -> 15.0 at 1, 2048x8192 13.6
    -> 10.4 and 9.7 -> 7.1, 4096x4096 at 16 rows 10.1 -> 8.9 (docs/performance.md)."""
    if k_warps:
        return (warps, *fragment_parts(row_groups, k, warps, processors, k_warps, across_programs))
    parts = fragment_parts(row_groups, k, warps, processors, 0, across_programs)
    wide = wide_k_warps(row_groups, k, processors)
    if wide <= parts[0]:
        return (warps, *parts)
    if tiles > 1:
        return wide, wide, 1
    split = fragment_parts(row_groups, k, warps, processors)[1] > 1
    if split or k >= wide * 4 * GROUP_STEPS * STEP:
        return RESIDENT_WARPS, wide, 1
    return (warps, *parts)


def wide_k_warps(row_groups: int, k: int, processors: int) -> int:
    """The most warps (16 or 8) that can share each of ``row_groups``' K with every warp resident
    at once (``RESIDENT_WARPS`` a multiprocessor) and taking two iterations or more; 0 if none."""
    for wide in (RESIDENT_WARPS, RESIDENT_WARPS // 2):
        if row_groups * wide <= RESIDENT_WARPS * processors and k >= 2 * wide * GROUP_STEPS * STEP:
            return wide
    return 0
