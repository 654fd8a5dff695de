"""The fragment kernels' host-side arguments (``fragments``, ``fragment_groups``): a checked
configuration, how the kernel reads the caller's input rows, and a weight's tensors as it takes them."""

from __future__ import annotations

import torch
import triton

from .fragment_grid import STEP, fragments_take
from .fragment_inputs import InputPermute

__all__ = [
    "INPUT_DTYPE",
    "MAX_TILES",
    "TILE_ROWS",
    "checked_config",
    "codes_a_load",
    "fragment_tensors",
    "input_layout",
]

#: Input rows of one instruction tile (its ``n`` side); a program takes up to ``MAX_TILES``.
TILE_ROWS = 8
MAX_TILES = 2


def checked_config(config: tuple[int, ...], k: int, blocksize: int) -> tuple[int, int, int, bool]:
    """(num_warps, SPLIT_K, K_WARPS, PERMUTED) of a fragment ``config`` (see ``fragment_launch``),
    after checking it and the weight's K and blocksize."""
    warps, split_k, *rest = config
    k_warps = rest[0] if rest else 0
    permuted = bool(rest[1]) if len(rest) > 1 else False
    if k_warps < 0 or (k_warps and warps % k_warps):
        raise ValueError(f"the fragment kernel's K warps ({k_warps}) must divide its warps ({warps})")
    if warps < 2:  # each thread stores four of the 256 nested codes into the table
        raise ValueError(f"the fragment kernel needs at least 2 warps a program, got {warps}")
    if not fragments_take(k, blocksize):
        raise ValueError(f"the fragment kernel needs K ({k}) a multiple of the blocksize ({blocksize} >= 64)")
    return warps, split_k, k_warps, permuted


#: The dtype the fragment kernels read their inputs as (four 16-bit values an element):
#: ``ProductLaunch``'s ``input_dtype``.
INPUT_DTYPE = torch.int64


def input_layout(x: torch.Tensor, k: int, permuted: bool) -> tuple[int, int, object]:
    """How the kernel reads inputs like the 2-d ``x``: (stride between rows in int64 elements,
    8-row tiles, the conversion of the caller's rows into the kernel's ``x``, None when the
    kernel reads them where they are)."""
    # rows start on 128 bytes, so that Triton can prove the input loads 16-byte aligned and keeps
    # them in one thread each (see fragment_statistics._stored_row)
    rows_aligned = x.stride(0) % 64 == 0 and x.data_ptr() % 16 == 0
    tiles = triton.cdiv(x.shape[0], TILE_ROWS)
    prepare = InputPermute(tiles, k, x.device) if permuted else None if rows_aligned else _aligned_rows
    return (x.stride(0) if rows_aligned else k) // 4, tiles, prepare


def codes_a_load(weight) -> int:
    """How many of ``weight``'s 8-bit absmax codes the kernels read in one load
    (``fragment_statistics._stored_row``): 4 where each row's blocks (blocksize 64) start on 4
    bytes, 2 where they start on 2 (an even count a row: K 896, 29568), else 1."""
    if not (weight.nested and weight.blocksize == STEP):
        return 1
    blocks, address = weight.k // STEP, weight.absmax.data_ptr()
    return next(codes for codes in (4, 2, 1) if blocks % codes == 0 and address % codes == 0)


def fragment_tensors(weight) -> tuple:
    """The fragment kernel's weight arguments: packed 8-byte words, absmax, code, nested statistics."""
    return (weight.bytes.view(torch.int64), weight.absmax, weight.code, *weight.statistics)


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)
