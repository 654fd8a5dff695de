"""A 4-bit weight's product prepared once: the op arguments of its state, checked, gathered and
handed to the device's prepared kernel (``ops.PreparedLinear``), with the key that says when it
must be rebuilt."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from . import ops
from .formats import NestedStatistics, get_4bit_type, nested_op_arguments
from .kernels.derived import prepare_product_tables, version
from .quant_state import QuantState, check_4bit_state

__all__ = [
    "cached_4bit_code",
    "op_arguments",
    "prepare_code_tables",
    "prepare_linear",
    "prepared_key",
    "weight_arguments",
]


@functools.cache
def cached_4bit_code(quant_type: str, device: torch.device) -> Tensor:
    """The 4-bit code table of ``quant_type`` on ``device``, made once per device."""
    return get_4bit_type(quant_type, device=device)


def prepare_code_tables(state: QuantState) -> None:
    """Build now the tables the kernels derive from ``state``'s code table (``kernels.derived``),
    so that no compiled call builds them inside a CUDA graph's memory pool. Nothing for a state
    without a plain float32 code tensor with data (meta, fake and other subclasses have none)."""
    code = state.code
    if type(code) is Tensor and code.device.type != "meta" and code.dtype == torch.float32:
        prepare_product_tables(code)


def weight_arguments(state: QuantState, device: torch.device) -> dict[str, Any]:
    """A (possibly nested) 4-bit state's tensors as the kernels' prepared weights take them:
    ``absmax``, ``code`` and ``nested`` (``formats.NestedStatistics`` or None)."""
    code = state.code if state.code is not None else cached_4bit_code(state.quant_type, device)
    nested = None
    if state.nested:
        nested = NestedStatistics(
            absmax=state.state2.absmax.reshape(-1).float(),
            code=state.state2.code.to(device=device, dtype=torch.float32),
            offset=state.offset.to(device=device, dtype=torch.float32),
            blocksize=state.state2.blocksize,
        )
    # flat and contiguous, whatever the state holds: the kernels read statistics as flat arrays
    return {"absmax": state.absmax.reshape(-1), "code": code.to(device=device, dtype=torch.float32), "nested": nested}


def op_arguments(state: QuantState, device: torch.device) -> dict[str, Any]:
    """The ``torch.ops.fourbit`` keyword arguments describing a (possibly nested) 4-bit state on
    ``device``: ``weight_arguments`` with the nested statistics spelled out as the schemas take them."""
    arguments = weight_arguments(state, device)
    nested = arguments.pop("nested")
    return {**arguments, **nested_op_arguments(nested)}


def prepare_linear(B: Tensor, state: QuantState) -> ops.PreparedLinear:
    """The product with the packed 4-bit weight ``B`` of ``state`` (N, K), checked and prepared once.

    Calling the result with ``(A, bias)`` computes what ``linear_4bit`` does, without checking
    the weight again; in eager inference it also skips the dispatcher (``ops.PreparedLinear``).
    It keeps ``state`` and reads its tensors as they are: build a new one when ``prepared_key``
    changes.
    """
    check_4bit_state(B, state)
    if len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {tuple(state.shape)}")
    packed = B.data if isinstance(B, torch.nn.Parameter) else B
    arguments = weight_arguments(state, B.device)
    prepared = ops.PreparedLinear(packed, blocksize=state.blocksize, shape=state.shape, tiled=state.tiled, **arguments)
    prepared.state = state  # keeps the ids in prepared_key from being reused
    return prepared


def prepared_key(B: Tensor, state: QuantState) -> tuple[int, ...]:
    """What a ``prepare_linear`` result depends on: where the packed bytes are, the state (its
    identity and how many times its attributes were assigned), the nested state's likewise, and
    the version of the code table (derived tables). In-place changes to the statistics need no
    new product: it reads the tensors themselves."""
    inner = state.state2
    with torch._C.DisableTorchFunctionSubclass():  # Params4bit's torch-function hook costs more than the read
        pointer = B.data_ptr()
    code = state.code
    return (
        pointer,
        id(state),
        state._generation,
        id(inner),
        inner._generation if inner is not None else 0,
        version(code) if code is not None else -1,
    )
