"""Tables derived from a code tensor (the decode table, sorted midpoints, nibble maps, lookup
grids), built on the device once per code tensor and reused: eager calls then run only their
kernels.

Entries are keyed by the code's memory (address, dtype, shape, strides), so that another view of
the same values finds them: a compiled backward receives a code table saved by its forward as a
new view in every call. Each entry holds a weak reference to the tensor that owns the memory (a
view's base), and the version counter views share, so a table freed and another allocated at its
address, or a table changed in place, is rebuilt. Nothing is cached while a CUDA graph is being
captured: a tensor made there holds its values only once the graph is replayed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_entries: dict[tuple[object, ...], tuple[weakref.ref, int, int, object]] = {}


def version(tensor: torch.Tensor) -> int:
    """The tensor's version counter; 0 for an inference tensor, which has none (it can change in
    place only inside inference mode)."""
    return 0 if tensor.is_inference() else tensor._version


def derived(code: torch.Tensor, name: str, build: Callable[[torch.Tensor], T]) -> T:
    """``build(code)``, computed once per code memory, version and ``name``."""
    # the memory: address and layout, and the device index (-1 on the CPU), as CUDA addresses
    # are unique across devices
    key = (code.data_ptr(), code.get_device(), code.dtype, code.shape, code.stride(), name)
    entry = _entries.get(key)
    if entry is not None:
        owner = entry[0]()
        # the owner alive and still over the memory it had (``.data`` not replaced), unchanged
        if owner is not None and owner.data_ptr() == entry[1] and entry[2] == version(code):
            return entry[3]
    value = build(code)
    if not (code.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_entries) > 256:
            _entries.clear()
        owner = code if code._base is None else code._base  # alive, the memory at the key is the code's
        _entries[key] = (weakref.ref(owner), owner.data_ptr(), version(code), value)
    return value
