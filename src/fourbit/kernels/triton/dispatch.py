"""Which Triton product runs: the kernel and tile configuration for an input and weight shape
(``choose_config``, from the device's ``tuning`` tables) and the K splits that fill the GPU."""

from __future__ import annotations

import torch
import triton

from . import fragments, tuning
from .common import INTERPRETED


def choose_config(
    x: torch.Tensor, n_out: int, k: int, blocksize: int, packed: torch.Tensor | None = None
) -> tuple | str:
    """The kernel and tile configuration for input rows ``x`` (2-d) against an ``n_out x k``
    weight (packed in ``packed``, when given), from the device's ``tuning.KernelTables``: a
    ``fragments``, ``fused`` or ``gemv`` entry, the ``wide`` configuration, or ``"chunked"``."""
    rows = x.shape[0]
    tables = tuning.for_device(x.device)
    if not INTERPRETED and fragments.supported(x, k, blocksize, packed):
        entry = next((entry for entry in tables.fragments if rows <= entry[0]), None)
        if entry:
            return ("fragments", *entry[1:])
    if fused_supported(x, k, blocksize):
        entry = next((entry for entry in tables.fused if rows <= entry[0]), None)
        if entry:
            return ("fused", *entry[1:])
        wide = tables.wide
        wide_programs = triton.cdiv(n_out, wide.block_n) * triton.cdiv(rows, wide.block_m)
        if rows <= tables.wide_rows and wide_programs >= tables.wide_min_coverage * processors(x.device):
            return wide
        return "chunked"
    return next((entry[1:] for entry in tables.gemv if rows <= entry[0]), "chunked")


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


def covering_splits(programs: int, device: torch.device) -> int:
    """The power of two of K splits nearest below what covers the multiprocessors twice with
    ``programs`` programs per split (on an H100, 9 splits measured 18-47% slower than 8, and 3 at
    64 rows 23% slower than 2)."""
    return 1 << (triton.cdiv(2 * processors(device), programs).bit_length() - 1)
