"""Public 4-bit functions and ``QuantState``, with bitsandbytes' names, signatures and defaults.

This is the edge where arguments are checked: every function here raises ``ValueError`` or
``TypeError`` naming the bad argument and the allowed values before any kernel runs. The work
itself is done by the ``torch.ops.fourbit`` custom ops (``fourbit.ops``), which pick a kernel per
device. Nested statistics ("double quantization", ``compress_statistics=True``) are built here by
composing the 4-bit and the 8-bit ops, exactly as bitsandbytes does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import layout, ops
from .blockwise import dequantize_blockwise, nested_statistics, quantize_blockwise
from .formats import (
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    PRODUCT_DTYPES,
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    get_4bit_type,
    num_blocks,
    packed_nbytes,
)
from .prepared import cached_4bit_code, op_arguments, prepare_code_tables, prepare_linear, prepared_key
from .quant_state import (
    PREPARED_ATTRIBUTE,
    QuantState,
    check_4bit_state,
    pack_dict_to_tensor,
    unpack_tensor_to_dict,
)
from .state_buffer import traced_arguments, traced_op_arguments, traced_shape, weight_shape
from .validation import (
    check_blocksize,
    check_float_input,
    check_out,
    check_packed_size,
    check_quant_storage,
    check_quant_type,
    check_tensor,
    dtype_name,
    dtype_names,
)

__all__ = [
    "QuantState",
    "check_4bit_state",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_4bit_type",
    "op_arguments",
    "pack_dict_to_tensor",
    "packed_for_device",
    "packed_rows",
    "prepare_code_tables",
    "prepare_linear",
    "prepared_key",
    "prepared_product",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
    "unpack_tensor_to_dict",
]


# --------------------------------------------------------------------------- 4-bit


def quantize_4bit(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """Quantize ``A`` (fp16, bf16 or fp32, any shape) to 4-bit ``quant_type`` in blocks of ``blocksize``.

    Returns ``(packed, state)``: ``packed`` holds two values per byte (element 2i in the high
    nibble) with shape ``(bytes // itemsize, 1)`` of ``quant_storage``; ``state`` is what
    ``dequantize_4bit`` needs. ``compress_statistics=True`` stores absmax as 8-bit codes
    (blocksize 256) around their mean. ``A`` is never modified.
    """
    if blocksize is None:
        blocksize = DEFAULT_BLOCKSIZE
    check_float_input(A)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_quant_storage(quant_storage, A.numel())
    check_out(out, (packed_nbytes(A.numel()) // quant_storage.itemsize, 1), quant_storage)
    blocks = num_blocks(A.numel(), blocksize)
    check_out(absmax, (blocks,), torch.uint8 if compress_statistics else torch.float32, "absmax")
    # the kernels reuse what they derive from the shared table; each QuantState owns a copy
    # (safetensors refuses shared tensors)
    shared_code = cached_4bit_code(quant_type, A.device)
    packed, block_absmax = ops.run("quantize_4bit", A.detach(), shared_code, blocksize, quant_storage)
    code = shared_code.clone()
    if compress_statistics:
        qabsmax, offset, state2 = nested_statistics(block_absmax, NESTED_BLOCKSIZE)
        state = QuantState(
            absmax=qabsmax,
            shape=A.shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=block_absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
        )
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def quantize_fp4(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """``quantize_4bit`` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(
    A: Tensor,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """``quantize_4bit`` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_4bit(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> Tensor:
    """Undo ``quantize_4bit``: returns a ``quant_state.dtype`` tensor of ``quant_state.shape``.

    Without a ``quant_state``, ``absmax`` and ``out`` are required (``out`` gives shape and dtype).
    A packed tensor passed in bitsandbytes' transposed ``(1, bytes)`` form gives the transposed
    2-D result, as in bitsandbytes.
    """
    check_tensor(A, "A")
    if out is None and _decodes_prepared(A, quant_state):
        return prepared_product(A, quant_state).dequantize(quant_state.dtype)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit requires both absmax and out when quant_state is not provided")
        check_tensor(out, "out")
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=DEFAULT_BLOCKSIZE if blocksize is None else blocksize,
            quant_type=quant_type,
        )
    check_4bit_state(A, quant_state)
    check_out(out, quant_state.shape, quant_state.dtype)
    result = ops.run(
        "dequantize_4bit",
        A,
        blocksize=quant_state.blocksize,
        shape=list(quant_state.shape),
        dtype=quant_state.dtype,
        tiled=quant_state.tiled,
        **op_arguments(quant_state, A.device),
    )
    if out is not None:
        result = out.copy_(result)
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and result.dim() == 2:
        return result.t()
    return result


def _decodes_prepared(A: Tensor, state: QuantState | None) -> bool:
    """Whether ``dequantize_4bit`` may decode through the state's prepared product (its decode
    launch built once): eager, a 2-D weight of a float dtype, packed as a column of bytes."""
    return (
        isinstance(state, QuantState)
        and len(state.shape) == 2
        and state.dtype in FLOAT_DTYPES
        and A.dim() == 2
        and A.shape[1] == 1
        and not torch.compiler.is_compiling()
    )


def dequantize_fp4(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
) -> Tensor:
    """``dequantize_4bit`` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int | None = None,
) -> Tensor:
    """``dequantize_4bit`` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def packed_rows(A: Tensor, quant_state: QuantState) -> Tensor:
    """The packed bytes ``A`` of ``quant_state`` in bitsandbytes' rows: a converted copy when the
    state is tiled (``fourbit.layout``), else ``A`` itself. What checkpoints and pickles hold."""
    return layout.untile(A, quant_state.shape) if quant_state.tiled else A


def packed_for_device(A: Tensor, quant_state: QuantState) -> Tensor:
    """The packed bytes ``A`` (in rows) of ``quant_state`` in the layout its device's kernels read
    fastest: a tiled copy where ``ops.prefers_tiles`` (``quant_state.tiled`` is then set), else
    ``A`` itself. ``A`` is not modified."""
    if not quant_state.tiled and ops.prefers_tiles(A.device, quant_state.shape, quant_state.blocksize):
        A = layout.tile(A, quant_state.shape)
        quant_state.tiled = True
    return A


def check_linear_input(A: Any, state: QuantState, name: str = "A") -> None:
    """Raise a clear error unless ``A`` can be multiplied by the 4-bit weight of ``state`` (N, K)."""
    check_tensor(A, name)
    if A.dtype not in PRODUCT_DTYPES:
        raise ValueError(f"{name} has dtype {dtype_name(A.dtype)}; 4-bit matmul supports {dtype_names(PRODUCT_DTYPES)}")
    shape = weight_shape(state)
    if len(shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {tuple(shape)}")
    if A.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor; a product with the 4-bit weight {tuple(shape)} needs at least 1-D")
    if A.shape[-1] != shape[1]:
        raise ValueError(
            f"{name} has last dimension {A.shape[-1]} but the 4-bit weight {tuple(shape)} expects in_features="
            f"{shape[1]}; a weight quantized as (in, out) must be re-quantized from its transpose"
        )


def linear_4bit(A: Tensor, B: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """``A @ dequantize(B).T + bias`` through the ``fourbit::linear_4bit`` op, after checking arguments.

    ``bias`` is cast to A's dtype. A float64 ``A`` is multiplied by the weight decoded in the
    state's dtype and widened, as bitsandbytes does. Differentiable in ``A`` and ``bias``. Outside torch.compile the
    weight's product is prepared once and kept on ``state`` (``prepared_product``), as
    ``Linear4bit`` keeps its own: later calls check only ``A`` and ``bias``.
    """
    check_linear_input(A, state)
    if bias is not None:
        check_tensor(bias, "bias")
        out_features = weight_shape(state)[0]
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        bias = bias.to(A.dtype)
    if A.dtype == torch.float64:  # the kernels take 16- and 32-bit floats
        # (a column of bytes: a (1, bytes) B, as ``qB.t()`` passes it, would decode transposed)
        weight = dequantize_4bit(B.reshape(-1, 1), state)
        return torch.nn.functional.linear(A, weight.to(A.dtype), bias)
    if not torch.compiler.is_compiling():
        return prepared_product(B, state)(A, bias)
    differentiable = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    arguments = _traced_op_arguments(B, state, differentiable)
    # the op reads the bytes flat; a view, unlike the weight itself, is a plain tensor in the
    # compiled graph, so the call skips ``Params4bit.__torch_function__`` (6 us a call, torch 2.11)
    return torch.ops.fourbit.linear_4bit(A, B.reshape(-1), bias=bias, **arguments)


def _traced_op_arguments(B: Tensor, state: QuantState, differentiable: bool) -> dict[str, Any]:
    """The op's keyword arguments for ``state`` in a traced call, after checking ``B`` against it:
    from its traced arguments when it keeps them (``fourbit.state_buffer``), so that the trace
    reads one tuple of plain values and the buffer, else from its attributes one by one."""
    traced = traced_arguments(state)
    if traced is None:
        check_4bit_state(B, state)
        settings = {"blocksize": state.blocksize, "shape": list(state.shape), "tiled": state.tiled}
        return {**settings, **op_arguments(state, B.device)}
    check_packed_size(B, traced_shape(traced))
    if B.device != traced[0].device:
        raise ValueError(f"quant_state is on {traced[0].device} but the packed data is on {B.device}")
    return traced_op_arguments(traced, own_code=differentiable)


def prepared_product(B: Tensor, state: QuantState) -> ops.PreparedLinear:
    """The product with the packed weight ``B`` of ``state``, prepared once (``prepare_linear``)
    and kept on ``state``; rebuilt when ``B``'s bytes (not its view: ``matmul_4bit`` takes the
    transpose that ``dequantize_4bit`` does not) or ``prepared_key`` change, and checked whenever
    it is (re)built."""
    try:
        size = B.numel() * B.element_size()
        key = (*prepared_key(B, state), size)
    except AttributeError:
        check_4bit_state(B, state)  # names what is wrong with the arguments
        raise
    cached = state.__dict__.get(PREPARED_ATTRIBUTE)
    if cached is not None and cached[0] == key:
        return cached[1]
    prepared = prepare_linear(B, state)
    state.__dict__[PREPARED_ATTRIBUTE] = (key, prepared)
    return prepared


def gemv_4bit(
    A: Tensor,
    B: Tensor,
    out: Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> Tensor:
    """``A @ dequantize(B).T`` in A's dtype for the packed weight ``B`` (passed as given, e.g. ``qB.t()``).

    Meant for one input row (the decoding case), but correct for any number of rows.
    ``transposed_A``/``transposed_B`` are accepted for bitsandbytes compatibility and ignored,
    as there.
    """
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    if out is not None:
        check_linear_input(A, state)
        check_out(out, (*A.shape[:-1], state.shape[0]), A.dtype)
    result = linear_4bit(A, B, state)
    return out.copy_(result) if out is not None else result
