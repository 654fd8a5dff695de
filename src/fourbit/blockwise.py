"""8-bit blockwise quantization (bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise``)
and the nested statistics of 4-bit states built on it. ``fourbit.functional`` exports the two
public functions."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import ops
from .formats import FLOAT_DTYPES, create_dynamic_map, num_blocks
from .quant_state import QuantState
from .validation import (
    check_blockwise_blocksize,
    check_blockwise_code,
    check_float_input,
    check_out,
    check_tensor,
    dtype_name,
    dtype_names,
)

__all__ = [
    "cached_dynamic_map",
    "dequantize_blockwise",
    "nested_statistics",
    "quantize_blockwise",
]


# --------------------------------------------------------------------------- code tables


@functools.cache
def cached_dynamic_map(device: torch.device) -> Tensor:
    """The default 8-bit code table (``create_dynamic_map()``) on ``device``, made once."""
    return create_dynamic_map().to(device)


# --------------------------------------------------------------------------- 8-bit blockwise


def quantize_blockwise(
    A: Tensor,
    code: Tensor | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[Tensor, QuantState]:
    """8-bit blockwise quantization: each block of ``blocksize`` values is scaled by its absmax and
    mapped to the nearest entry of the sorted 256-entry ``code`` (default: the signed dynamic map).

    Returns the uint8 codes (same shape as ``A``) and a QuantState. ``nested=True`` quantizes the
    centred absmax again. ``out`` and ``absmax``, when given, receive the results (bitsandbytes'
    legacy arguments).
    """
    check_float_input(A, what="8-bit blockwise quantization")
    check_blockwise_blocksize(blocksize)
    if code is None:
        code = cached_dynamic_map(A.device)
    else:
        check_blockwise_code(code, quantizing=True)
    code = code.to(device=A.device, dtype=torch.float32)
    check_out(out, A.shape, torch.uint8)
    check_out(absmax, (num_blocks(A.numel(), blocksize),), torch.uint8 if nested else torch.float32, "absmax")
    quantized, block_absmax = ops.run("quantize_blockwise", A.detach(), code, blocksize)
    if nested:
        qabsmax, offset, state2 = nested_statistics(block_absmax, blocksize)
        state = QuantState(
            absmax=qabsmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
        )
    else:
        state = QuantState(absmax=block_absmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        quantized = out.copy_(quantized)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return quantized, state


def nested_statistics(block_absmax: Tensor, blocksize: int) -> tuple[Tensor, Tensor, QuantState]:
    """Nested statistics of float32 ``block_absmax``: their 8-bit codes around their mean (the
    subtraction happens inside the quantizer, which saves a pass), the mean, and the state of
    the 8-bit quantization (signed dynamic map)."""
    offset = block_absmax.mean() if block_absmax.numel() else block_absmax.new_zeros(())
    code = cached_dynamic_map(block_absmax.device)
    codes, absmax = ops.run("quantize_blockwise", block_absmax, code, blocksize, offset)
    return codes, offset, QuantState(absmax=absmax, code=code.clone(), blocksize=blocksize, dtype=torch.float32)


def _decoded_nested_absmax(state: QuantState) -> Tensor:
    """Float32 absmax of a nested state: dequantized codes plus the offset."""
    return dequantize_blockwise(state.absmax, state.state2) + state.offset


def dequantize_blockwise(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    code: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Tensor:
    """Undo ``quantize_blockwise``: ``code[A] * absmax`` per block, in ``quant_state.dtype``
    (float32 when only ``absmax`` is given)."""
    check_tensor(A, "A")
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8 codes from quantize_blockwise, got {dtype_name(A.dtype)}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise requires either quant_state or absmax")
        if code is None:
            code = cached_dynamic_map(A.device)
        else:
            check_blockwise_code(code)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    check_blockwise_blocksize(quant_state.blocksize, "quant_state.blocksize")
    if quant_state.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"quant_state.dtype={quant_state.dtype} is not supported; allowed: {dtype_names(FLOAT_DTYPES)}"
        )
    scale = _decoded_nested_absmax(quant_state) if quant_state.nested else quant_state.absmax
    expected = num_blocks(A.numel(), quant_state.blocksize)
    if scale.numel() != expected:
        raise ValueError(
            f"absmax has {scale.numel()} entries but {A.numel()} codes in blocks of "
            f"{quant_state.blocksize} need {expected}"
        )
    check_out(out, A.shape, quant_state.dtype)
    entries = quant_state.code.numel()
    if entries < 256 and A.numel() and int(A.max()) >= entries:
        raise ValueError(f"A holds code {int(A.max())}, beyond the {entries}-entry code table")
    result = ops.run(
        "dequantize_blockwise",
        A,
        scale.float(),
        quant_state.code.to(device=A.device, dtype=torch.float32),
        quant_state.blocksize,
        quant_state.dtype,
    )
    return out.copy_(result) if out is not None else result
