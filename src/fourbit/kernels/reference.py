"""Every operation in plain PyTorch: the definition of correct, and the path for any device.

The arithmetic follows bitsandbytes 0.50.2 on the CPU step by step, so that packed bytes,
absmax and dequantized values are bit-identical with it:

* 4-bit quantize: full blocks are scaled by ``x * (1 / max(absmax, 1e-38))``; a short last
  block by ``x / max(absmax, 1e-38)`` (and its stored absmax is the clamped one); an all-zero
  block is scaled to zeros also where denormals are flushed (``absmax_reciprocal``); the nearest
  code is found by bucketizing against the float32 midpoints of the sorted table (a value on a
  midpoint takes the lower code).
* 8-bit blockwise quantize (used for nested statistics): bitsandbytes' CPU library maps
  ``x * (1 / absmax)`` onto a 65536-step grid of [-1, 1] and looks the grid point's nearest
  code up in a table; NaN inputs are ignored by the absmax and encode as 0, and an all-zero
  block encodes as 0.
* dequantize: ``code[q] * absmax`` in float32, then cast (round to nearest even). A zero code
  decodes to +0.0 (FP4's "-0" entry too), as bitsandbytes' native dequantize does.

Inputs are assumed valid: argument checking happens once, in ``fourbit.functional``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F

from ..formats import NESTED_BLOCKSIZE, NestedStatistics, num_blocks

#: Grid resolution of bitsandbytes' CPU 8-bit quantizer (a uint16 index over [-1, 1]).
BLOCKWISE_GRID_STEPS = 65535
#: Smallest absmax divided by; keeps all-zero blocks finite (they quantize to the code of 0.0).
ABSMAX_FLOOR = 1e-38


def absmax_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """``1 / max(absmax, ABSMAX_FLOOR)`` (NaN kept), and 0 for an all-zero block: the floor is a
    denormal, which a flush-to-zero environment (``torch.set_flush_denormal(True)``) reads as 0,
    and a zero block must still code to zero there."""
    return torch.where(absmax == 0, 0.0, 1.0 / absmax.clamp(min=ABSMAX_FLOOR))


def decode_table(code: torch.Tensor) -> torch.Tensor:
    """``code`` as the float32 table kernels decode with: every zero entry +0.0 (FP4's "-0" too)."""
    return code.float().masked_fill(code == 0, 0.0)


def sorted_code(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring sorted code values, and the sort order (index in ``code``).

    A stable sort fixes the order of equal entries (FP4's +0 and -0) on every device.
    """
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    return midpoints, order


def _scale_by_block(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply each element of the flat ``values`` by the float32 absmax of its block."""
    n = values.numel()
    blocks = absmax.numel()
    padded = F.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * absmax.reshape(-1, 1)).reshape(-1)[:n]


def quantize_4bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` blockwise to 4-bit indices into ``code``; return (packed, absmax).

    ``packed`` has shape ``(bytes // itemsize, 1)`` of ``quant_storage``; ``absmax`` is float32
    with one entry per block.
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    whole = flat[:full].view(-1, blocksize)
    absmax = whole.abs().amax(dim=1)
    scaled = torch.clamp(whole * absmax_reciprocal(absmax).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        # (divided, as bitsandbytes divides a short block; all zero where the floor reads as 0)
        tail_scaled = torch.where(tail_absmax == 0, 0.0, tail / tail_absmax)
        scaled = torch.cat([scaled, torch.clamp(tail_scaled, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    midpoints, order = sorted_code(code)
    indices = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    packed = (indices[0::2] << 4) | indices[1::2]
    return packed.view(quant_storage).unsqueeze(1), absmax


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` 4-bit values of ``packed`` (any storage dtype), as int64 indices."""
    data = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)
    return nibbles[:numel].long()


def resolve_absmax(absmax: torch.Tensor, nested: NestedStatistics | None) -> torch.Tensor:
    """Float32 per-block absmax; with nested statistics, decode the uint8 codes and add the offset."""
    if nested is None:
        return absmax.float()
    return dequantize_blockwise(absmax, nested.absmax, nested.code, nested.blocksize, torch.float32) + nested.offset


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
    """Decode packed 4-bit data into a ``dtype`` tensor of ``shape``."""
    n = prod(shape)
    scale = resolve_absmax(absmax, NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize))
    values = decode_table(code)[unpack_4bit(packed, n)]
    return _scale_by_block(values, scale, blocksize).to(dtype).view(tuple(shape))


def blockwise_lookup(code: torch.Tensor) -> torch.Tensor:
    """For each point of the [-1, 1] grid, the index of the nearest entry of the sorted ``code``."""
    steps = torch.arange(BLOCKWISE_GRID_STEPS + 1, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * steps) / BLOCKWISE_GRID_STEPS
    midpoints = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of ``A`` (in float32, minus the scalar ``offset`` when given)
    against a sorted 256-entry ``code``; return (uint8 codes, absmax)."""
    flat = A.reshape(-1).float()
    if offset is not None:
        flat = flat - offset.float()
    n = flat.numel()
    blocks = num_blocks(n, blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    magnitude = padded.abs()
    absmax = torch.where(magnitude.isnan(), 0.0, magnitude).amax(dim=1)
    normed = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1, 1)
    position = ((normed + 1.0) * 0.5 * BLOCKWISE_GRID_STEPS + 0.5).floor().nan_to_num(nan=0.0)
    quantized = blockwise_lookup(code.float())[position.long()]
    quantized = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(quantized), quantized)
    return quantized.reshape(-1)[:n].view(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Decode 8-bit blockwise codes: ``code[A] * absmax`` in float32, cast to ``dtype``."""
    values = code.float()[A.reshape(-1).long()]
    return _scale_by_block(values, absmax.float(), blocksize).to(dtype).view(A.shape)


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
    """``A @ W.T + bias`` for the packed weight ``W`` of ``shape`` (N, K), in A's dtype."""
    weight = dequantize_4bit(
        packed, absmax, code, blocksize, shape, A.dtype, nested_absmax, nested_code, nested_offset, nested_blocksize
    )
    return F.linear(A, weight, bias)


def product_without_columns(A: torch.Tensor, n_out: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``A @ W.T + bias`` for a weight of ``n_out`` rows and no columns: the bias, or zeros, in A's
    dtype, as ``F.linear`` gives. Kernels that size their work by K take this instead."""
    out = A.new_zeros((*A.shape[:-1], n_out))
    return out if bias is None else out + bias.to(A.dtype)
