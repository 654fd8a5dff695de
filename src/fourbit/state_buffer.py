"""A 4-bit QuantState's statistics in one float32 buffer, the state's tensors views of it.

Before each call of a compiled function, torch.compile checks guards on what the trace read from
Python objects: for every tensor its dtype, shape, strides and device, and every attribute's
value. A nested state has five tensors (absmax codes, code table, offset, nested absmax and
nested code table) and a dozen attributes a call reads. So a state with a buffer also keeps its
``traced_arguments``: the buffer, the code table and one tuple of plain values (blocks,
blocksizes, shape, layout). A compiled call reads those, slices the buffer inside the graph, and
dynamo checks the buffer and the tuple (and the code table in a call that may be differentiated:
``traced_op_arguments`` says why).

The views keep in-place changes visible to both. Replacing one of the state's tensors drops the
buffer, a nested state's tensors its parent's too (``drop_statistics_buffer``), and assigning any
public attribute of the state drops its traced arguments; a traced call then reads the state's
attributes and tensors one by one. Swapping a statistic's storage underneath it
(``tensor.data = ...``, ``tensor.set_(...)``) is not seen: compiled calls would keep reading the
buffer. Assign the attribute instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .formats import NESTED_BLOCKSIZE, QUANT_TYPES, num_blocks

__all__ = [
    "ALIGNMENT",
    "BUFFER_PARENT_ATTRIBUTE",
    "STATISTICS_BUFFER_ATTRIBUTE",
    "TRACED_ARGUMENTS_ATTRIBUTE",
    "build_statistics_buffer",
    "build_traced_arguments",
    "current_statistics_buffer",
    "drop_statistics_buffer",
    "relink_copied_buffer",
    "traced_arguments",
    "traced_op_arguments",
    "traced_shape",
    "weight_shape",
]

#: Where a QuantState keeps the buffer its statistics are views of.
STATISTICS_BUFFER_ATTRIBUTE = "_statistics_buffer"
#: Where a nested state whose tensors are views of its parent's buffer keeps a weak reference to
#: that parent (``drop_statistics_buffer``).
BUFFER_PARENT_ATTRIBUTE = "_buffer_parent"
#: Where a QuantState keeps what a traced call reads of it (``build_traced_arguments``).
TRACED_ARGUMENTS_ATTRIBUTE = "_traced_arguments"
#: Every view starts at a multiple of this many float32 elements (16 bytes), where kernels may
#: load vectors.
ALIGNMENT = 4
_CODE_SIZE, _NESTED_CODE_SIZE = 16, 256


def _aligned(count: int) -> int:
    return -(-count // ALIGNMENT) * ALIGNMENT


def _views(buffer: Tensor, blocks: int, nested_blocks: int | None) -> tuple[Tensor, ...]:
    """(absmax, code) or (absmax, code, offset, nested absmax, nested code) as views of ``buffer``,
    for ``blocks`` 4-bit blocks and (nested) ``nested_blocks`` blocks of their absmax. Float32
    elements: code table [0, 16), absmax from 16 (uint8 codes four to an element when nested),
    then, each aligned, the offset, the nested absmax and the nested code table."""
    code = buffer[:_CODE_SIZE]
    if nested_blocks is None:
        return buffer[_CODE_SIZE : _CODE_SIZE + blocks], code
    absmax_end = _CODE_SIZE + -(-blocks // 4)
    absmax = buffer[_CODE_SIZE:absmax_end].view(torch.uint8)[:blocks]
    offset_start = _aligned(absmax_end)
    nested_start = offset_start + ALIGNMENT
    nested_code_start = _aligned(nested_start + nested_blocks)
    nested_absmax = buffer[nested_start : nested_start + nested_blocks]
    nested_code = buffer[nested_code_start : nested_code_start + _NESTED_CODE_SIZE]
    return absmax, code, buffer[offset_start], nested_absmax, nested_code


def _size(blocks: int, nested_blocks: int | None) -> int:
    if nested_blocks is None:
        return _CODE_SIZE + blocks
    return _aligned(_aligned(_CODE_SIZE + -(-blocks // 4)) + ALIGNMENT + nested_blocks) + _NESTED_CODE_SIZE


def _block_counts(state: Any) -> tuple[int, int | None]:
    """The state's 4-bit blocks and, when nested, the blocks of their absmax."""
    blocks = num_blocks(int(torch.Size(state.shape).numel()), state.blocksize)
    return blocks, num_blocks(blocks, state.state2.blocksize) if state.state2 is not None else None


def _packable(state: Any) -> bool:
    """Whether the state is valid and its tensors have the dtypes and shapes the buffer holds, on
    one real device."""
    absmax, code = state.absmax, state.code
    if state.quant_type not in QUANT_TYPES or not isinstance(absmax, Tensor) or not isinstance(code, Tensor):
        return False
    tensors = [absmax, code]
    if code.dtype != torch.float32 or code.shape != (_CODE_SIZE,) or absmax.dim() != 1:
        return False
    if state.state2 is None:
        if absmax.dtype != torch.float32:
            return False
    else:
        offset, inner = state.offset, state.state2
        tensors += [offset, inner.absmax, inner.code]
        if absmax.dtype != torch.uint8 or not all(isinstance(tensor, Tensor) for tensor in tensors[2:]):
            return False
        if offset.dtype != torch.float32 or offset.dim() != 0:
            return False
        if inner.absmax.dtype != torch.float32 or inner.absmax.dim() != 1:
            return False
        if inner.code.dtype != torch.float32 or inner.code.shape != (_NESTED_CODE_SIZE,):
            return False
    device = absmax.device
    if device.type == "meta" or any(tensor.device != device or tensor.requires_grad for tensor in tensors):
        return False
    try:
        state.validate()
    except (ValueError, TypeError):
        return False  # its operations raise the error where it is used
    return True


def build_statistics_buffer(state: Any) -> bool:
    """Copy a 4-bit ``state``'s statistics into one buffer and make its tensors views of it.

    Returns False, changing nothing, when the state is invalid, has no statistics or holds them in
    other dtypes, shapes or devices (its tensors are then read one by one).
    """
    if not _packable(state):
        return False
    blocks, nested_blocks = _block_counts(state)
    inner = state.state2
    sources = (state.absmax, state.code) if inner is None else (
        state.absmax, state.code, state.offset, inner.absmax, inner.code,
    )  # fmt: skip
    with torch.inference_mode(False):  # a normal tensor even when built in inference mode: it has a version
        buffer = torch.zeros(_size(blocks, nested_blocks), dtype=torch.float32, device=state.absmax.device)
        views = _views(buffer, blocks, nested_blocks)
        for view, source in zip(views, sources, strict=True):
            view.copy_(source)
    state.absmax, state.code = views[:2]  # each drops any older buffer (QuantState.__setattr__)
    if inner is not None:
        state.offset = views[2]
        inner.absmax, inner.code = views[3:]
        inner.__dict__[BUFFER_PARENT_ATTRIBUTE] = weakref.ref(state)
    state.__dict__[STATISTICS_BUFFER_ATTRIBUTE] = buffer
    build_traced_arguments(state)
    return True


def build_traced_arguments(state: Any) -> None:
    """Keep on ``state`` what a traced call reads of it, ``(buffer, code, layout)``: its buffer,
    its code table and one tuple of plain values (blocks, nested blocks, blocksize, nested
    blocksize, out_features, in_features, tiled). Does nothing unless the state has a buffer."""
    buffer = current_statistics_buffer(state)
    if buffer is None:
        return
    blocks, nested_blocks = _block_counts(state)
    nested_blocksize = state.state2.blocksize if state.state2 is not None else NESTED_BLOCKSIZE
    out_features, in_features = state.shape
    layout = (blocks, nested_blocks, state.blocksize, nested_blocksize, out_features, in_features, bool(state.tiled))
    state.__dict__[TRACED_ARGUMENTS_ATTRIBUTE] = (buffer, state.code, layout)


def drop_statistics_buffer(state: Any) -> None:
    """Forget the buffer ``state``'s statistics were views of, and its traced arguments: one of
    its statistics is being replaced. For a nested state, its parent's buffer no longer holds all
    of the parent's statistics either, so the parent's are forgotten too."""
    state.__dict__.pop(STATISTICS_BUFFER_ATTRIBUTE, None)
    state.__dict__.pop(TRACED_ARGUMENTS_ATTRIBUTE, None)
    parent = state.__dict__.pop(BUFFER_PARENT_ATTRIBUTE, None)
    parent = parent() if parent is not None else None
    if parent is not None:
        parent.__dict__.pop(STATISTICS_BUFFER_ATTRIBUTE, None)
        parent.__dict__.pop(TRACED_ARGUMENTS_ATTRIBUTE, None)


def relink_copied_buffer(original: Any, clone: Any, deep: bool) -> None:
    """Keep a copy of ``original`` within the rules above. A shallow copy of a nested state shares
    its nested state, whose replaced statistics would drop only the original's buffer: the copy
    forgets its buffer and reads its tensors one by one. A deep copy's nested state, whose tensors
    are views of the copy's buffer, points at the copy."""
    inner = clone.__dict__.get("state2")
    if inner is None:
        return
    if not deep:
        clone.__dict__.pop(STATISTICS_BUFFER_ATTRIBUTE, None)
        clone.__dict__.pop(TRACED_ARGUMENTS_ATTRIBUTE, None)
        return
    parent = inner.__dict__.get(BUFFER_PARENT_ATTRIBUTE)
    if parent is not None and parent() is original:
        inner.__dict__[BUFFER_PARENT_ATTRIBUTE] = weakref.ref(clone)


def current_statistics_buffer(state: Any) -> Tensor | None:
    """The state's buffer while its tensors are still the buffer's views, else None. Reads no
    tensor of the state, so a traced call that uses the buffer guards on it alone."""
    return getattr(state, STATISTICS_BUFFER_ATTRIBUTE, None)


def traced_arguments(state: Any) -> tuple[Tensor, Tensor, tuple] | None:
    """The state's ``(buffer, code, layout)`` (``build_traced_arguments``) while they still
    describe it, else None. Reads one attribute of the state."""
    return getattr(state, TRACED_ARGUMENTS_ATTRIBUTE, None)


def traced_shape(traced: tuple[Tensor, Tensor, tuple]) -> tuple[int, int]:
    """The (out_features, in_features) of a state's ``traced_arguments``."""
    return traced[2][4], traced[2][5]


def weight_shape(state: Any) -> Sequence[int]:
    """The shape of ``state``'s weight; inside a trace, from its traced arguments when it keeps
    them, which compiled calls check with one guard rather than three."""
    traced = traced_arguments(state) if torch.compiler.is_compiling() else None
    return traced_shape(traced) if traced is not None else state.shape


def traced_op_arguments(traced: tuple[Tensor, Tensor, tuple], own_code: bool) -> dict[str, Any]:
    """The ``torch.ops.fourbit`` keyword arguments (all but the input, the packed weight and the
    bias) from a state's ``traced_arguments``: its statistics sliced from the buffer in the graph.
    With ``own_code`` (a call that may be differentiated) the code table is the state's own view,
    a graph input marked static: a slice made in the graph would reach a compiled backward as an
    ordinary input, which CUDA graph trees copy into their memory pool, and the kernels' tables
    derived from that copy (``kernels.derived``) would be built there and outlive the graph."""
    buffer, code, layout = traced
    blocks, nested_blocks, blocksize, nested_blocksize, out_features, in_features, tiled = layout
    views = _views(buffer, blocks, nested_blocks)
    arguments = {
        "absmax": views[0],
        "code": code if own_code else views[1],
        "blocksize": blocksize,
        "shape": [out_features, in_features],
        "nested_blocksize": nested_blocksize,
        "tiled": tiled,
    }
    if nested_blocks is None:
        return {**arguments, "nested_absmax": None, "nested_code": None, "nested_offset": None}
    return {**arguments, "nested_absmax": views[3], "nested_code": views[4], "nested_offset": views[2]}
