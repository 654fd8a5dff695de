"""The CPU fast path: the reference's arithmetic, compiled by torch.compile (inductor's C++/OpenMP).

Written with element-wise selects instead of gathers so that inductor vectorizes the loops; the
results are bit-identical with ``reference`` (tested). Each function is compiled once per
dtype and blocksize, with the number of blocks dynamic, so new shapes and batch sizes reuse the
compiled code. Used for tensors of at least ``MIN_NUMEL`` elements whose count is a multiple of
the blocksize (weights, in practice); anything else, and every call once compilation has failed
(no C++ compiler, say) or with ``FOURBIT_CPU_COMPILE=0``, runs the reference.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from math import prod

import torch

from ...formats import NESTED_BLOCKSIZE, NestedStatistics
from .. import reference

__all__ = ["MIN_NUMEL", "SUPPORTED", "compile_enabled", "dequantize_4bit", "linear_4bit", "quantize_4bit"]

#: Smaller tensors take the reference path: compiling would cost more than it saves.
MIN_NUMEL = 1 << 20

_compiled: dict[str, Callable] = {}
_failed = False
_succeeded: set[str] = set()  # names whose compiled function has run
_warned: set[str] = set()  # names whose later failure was reported


#: inductor before torch 2.6 compiles these functions to other bits than the reference's (all-zero
#: and special-valued blocks quantized differently, seen with torch 2.5.1), so older torch runs the
#: reference instead.
SUPPORTED = torch.__version__ >= "2.6"


def compile_enabled() -> bool:
    """Whether the compiled path may run (torch 2.6 or newer, FOURBIT_CPU_COMPILE unset or 1, and no
    earlier failure)."""
    return SUPPORTED and not _failed and os.environ.get("FOURBIT_CPU_COMPILE", "1") not in ("0", "")


def _quantize_sorted(x: torch.Tensor, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_quantize_blocks`` for a sorted table (NF4): positions are code indices."""
    return _quantize_blocks(x, midpoints, None)


def _quantize_ordered(
    x: torch.Tensor, midpoints: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_quantize_blocks`` for a table that is not sorted (FP4). A function of its own, so that
    torch.compile keeps its graphs apart from the sorted variant's (the recompile limit counts
    per function)."""
    return _quantize_blocks(x, midpoints, order)


def _quantize_blocks(
    x: torch.Tensor, midpoints: torch.Tensor, order: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks ``x`` (blocks, blocksize) -> (packed bytes, absmax), as ``reference.quantize_4bit``.

    The even and odd elements of each pair are coded separately and packed in the same pass, so
    no per-element index tensor is written out. ``order`` maps sorted positions to code indices
    (None when the table is sorted already, as NF4 is).
    """
    x = x.float()
    absmax = x.abs().amax(1, keepdim=True)  # NaN propagates, as in the reference
    reciprocal = reference.absmax_reciprocal(absmax)
    pairs = x.view(x.shape[0], -1, 2)
    high = _code_index(pairs[..., 0] * reciprocal, midpoints, order)
    low = _code_index(pairs[..., 1] * reciprocal, midpoints, order)
    return ((high << 4) | low).to(torch.uint8).view(-1), absmax.view(-1)


def _code_index(scaled: torch.Tensor, midpoints: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Bucketize ``scaled`` against the 15 midpoints (NaN last) and map the position to a code index."""
    bounded = scaled.clamp(-1, 1)
    position = torch.zeros_like(bounded, dtype=torch.int32)
    for j in range(15):
        position = position + (bounded > midpoints[j]).to(torch.int32)
    position = torch.where(scaled.isnan(), 15, position)
    if order is None:
        return position
    codes = torch.zeros_like(position)
    for j in range(16):
        codes = torch.where(position == j, order[j], codes)
    return codes


def _decode_blocks(packed: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed bytes (blocks, blocksize / 2) and float32 ``scale`` per block -> values of ``dtype``."""
    indices = torch.stack([packed >> 4, packed & 15], -1).view(packed.shape[0], -1).to(torch.int32)
    values = torch.zeros_like(indices, dtype=torch.float32)
    for j in range(16):
        values = torch.where(indices == j, table[j], values)
    return (values * scale.view(-1, 1)).to(dtype)


def _compiled_function(name: str, function: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=True, fullgraph=True)
    return _compiled[name]


def _run_compiled(name: str, function: Callable, *args: object) -> object | None:
    """The compiled function's result, or None (the caller runs the reference) when it fails.

    A failure before the function ever ran (no C++ compiler, say) turns the path off for the
    process; a later one (a new variant that cannot be compiled, or torch.compile's limit on
    graphs per function) sends only that call to the reference, with one warning per function.
    Runs without gradient tracking (nothing here is differentiated), so that training and
    inference share graphs.
    """
    global _failed
    try:
        with torch.no_grad():
            result = _compiled_function(name, function)(*args)
    except Exception as error:  # inductor raises many kinds (no compiler, codegen errors, limits)
        if name not in _succeeded:
            _failed = True
            consequence = (
                "using the slower reference kernels from now on (set FOURBIT_CPU_COMPILE=0 to skip the attempt)"
            )
        elif name in _warned:
            return None
        else:
            consequence = "such calls use the slower reference kernels"
        _warned.add(name)
        warnings.warn(
            f"fourbit: the compiled CPU path failed for {name} ({type(error).__name__}: {error}); {consequence}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _succeeded.add(name)
    return result


def _fast(numel: int, blocksize: int) -> bool:
    """Whether to take the compiled path: whole blocks, at least two of them (a dimension of size
    one would be compiled apart, and the graphs per function are limited), and enough data."""
    return numel >= max(MIN_NUMEL, 2 * blocksize) and numel % blocksize == 0 and compile_enabled()


def quantize_4bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.quantize_4bit``."""
    if _fast(A.numel(), blocksize):
        midpoints, order = reference.sorted_code(code.float())
        blocks = A.detach().reshape(-1, blocksize)
        if torch.equal(order, torch.arange(16)):
            result = _run_compiled("quantize_4bit", _quantize_sorted, blocks, midpoints)
        else:
            result = _run_compiled("quantize_4bit_ordered", _quantize_ordered, blocks, midpoints, order.to(torch.int32))
        if result is not None:
            packed, absmax = result
            return packed.view(quant_storage).unsqueeze(1), absmax
    return reference.quantize_4bit(A, code, blocksize, quant_storage)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Same contract as ``reference.dequantize_4bit``."""
    numel = prod(shape)
    if _fast(numel, blocksize):
        nested = NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize)
        scale = reference.resolve_absmax(absmax, nested)
        table = reference.decode_table(code)
        data = packed.reshape(-1).view(torch.uint8)[: numel // 2].view(-1, blocksize // 2)
        values = _run_compiled(f"dequantize_4bit_{dtype}", _decode_blocks, data, scale, table, dtype)
        if values is not None:
            return values.view(tuple(shape))
    return reference.dequantize_4bit(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, nested_offset, nested_blocksize
    )


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
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Same contract as ``reference.linear_4bit``: the fast decode, then one matmul."""
    weight = dequantize_4bit(
        packed, absmax, code, blocksize, shape, A.dtype, nested_absmax, nested_code, nested_offset, nested_blocksize
    )
    return torch.nn.functional.linear(A, weight, bias)
