"""Tables derived from a code tensor (the decode table, sorted midpoints, nibble maps, lookup
grids), built on the device once per code tensor and reused: eager calls then run only their
kernels.

Entries are keyed by the code tensor itself (a weak reference) and its version counter, so a
table freed and another allocated at its address, or a table changed in place, is rebuilt.
Nothing is cached while a CUDA graph is being captured: a tensor made there holds its values
only once the graph is replayed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_entries: dict[tuple[int, str], tuple[weakref.ref, int, object]] = {}


def version(tensor: torch.Tensor) -> int:
    """The tensor's version counter; 0 for an inference tensor, which has none (it can change in
    place only inside inference mode)."""
    return 0 if tensor.is_inference() else tensor._version


def derived(code: torch.Tensor, name: str, build: Callable[[torch.Tensor], T]) -> T:
    """``build(code)``, computed once per code tensor, version and ``name``."""
    key = (id(code), name)
    entry = _entries.get(key)
    if entry is not None and entry[0]() is code and entry[1] == version(code):
        return entry[2]
    value = build(code)
    if not (code.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_entries) > 256:
            _entries.clear()
        _entries[key] = (weakref.ref(code), version(code), value)
    return value
