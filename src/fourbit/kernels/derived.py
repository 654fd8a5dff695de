"""Tables derived from a code tensor (the decode table, sorted midpoints, nibble maps, lookup
grids), built on the device once per code tensor and reused: eager calls then run only their
kernels.

Entries are keyed by the code's memory (address, dtype, shape, strides), so that another tensor
over the same values finds them: a compiled backward receives a code table saved by its forward
as a new view in every call, and a compiled graph's code is often an alias inductor makes afresh
in every call (no base, a version counter of its own). Each entry holds a weak reference to the
memory's storage, so a table freed and another allocated at its address is rebuilt, and one to
the tensor that owns it (a view's base), whose version counter tells a table changed in place,
also when the call passes an alias. (An entry whose owner is gone is adopted by the next caller's
tensor: a change made in place between the two, through a tensor never passed here, goes
unseen.) Entries of freed code tables are dropped when the cache fills; live ones are all kept (a
model has one code table per layer). Nothing is cached while a CUDA graph is being captured: a
tensor made there holds its values only once the graph is replayed. Outside a capture, CUDA
tables are built on ``kept_memory``'s helper thread, outside any CUDA-graph memory pool.
``prepare_product_tables`` builds a code table's product tables ahead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

from . import reference
from .kept_memory import kept_on_device

__all__ = ["decode_table", "derived", "float16_table", "prepare_product_tables", "version"]

T = TypeVar("T")

#: Per key: the storage (weakly) and its address, the owner (weakly) whose version is recorded, the value.
_entries: dict[tuple[object, ...], tuple[weakref.ref, int, weakref.ref, int, object]] = {}
#: Entries kept before those of freed code tables are dropped; doubles past what stays alive, so
#: that a model with many code tables (one per layer) keeps all of them.
_MIN_LIMIT = 256
_limit = _MIN_LIMIT


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
    owner = None
    if entry is not None:
        storage_ref, address, owner_ref, recorded, value = entry
        storage = storage_ref()
        if storage is not None and storage.data_ptr() == address:  # the same memory, not reused
            owner = owner_ref()
            if owner is None or owner.untyped_storage().data_ptr() != address:
                # the owner gone (an earlier call's alias) or its data replaced: the caller's
                # tensor owns the entry from now on
                _entries[key] = _entry(code, None, value)
                return value
            if version(owner) == recorded:
                return value
    value = kept_on_device(code.device, lambda: build(code))
    if not (code.is_cuda and torch.cuda.is_current_stream_capturing()):
        _store(key, _entry(code, owner, value))
    return value


def _entry(code: torch.Tensor, owner: torch.Tensor | None, value: object) -> tuple:
    """An entry for ``value`` derived from ``code``: its storage, and ``owner`` (default the code's
    base, or the code) with its version. An alias (a version counter of its own) sees no
    in-place change made through the tensor it aliases, so a live owner is kept."""
    if owner is None:
        owner = code if code._base is None else code._base
    storage = code.untyped_storage()
    return weakref.ref(storage), storage.data_ptr(), weakref.ref(owner), version(owner), value


def _store(key: tuple[object, ...], entry: tuple[weakref.ref, int, weakref.ref, int, object]) -> None:
    """Keep ``entry``; at the limit, first drop the entries whose code tables were freed."""
    global _limit
    if len(_entries) >= _limit:
        for stale in [known for known, (storage, *_) in _entries.items() if storage() is None]:
            del _entries[stale]
        _limit = max(_MIN_LIMIT, 2 * len(_entries))
    _entries[key] = entry


def decode_table(code: torch.Tensor) -> torch.Tensor:
    """The code table the decode kernels read: its zero entries as +0.0 (``reference.decode_table``)."""
    return derived(code, "decode", reference.decode_table)


def float16_table(code: torch.Tensor) -> torch.Tensor:
    """The code table in float16, which the CUDA-core products read for half inputs."""
    return derived(code, "float16", torch.Tensor.half)


def prepare_product_tables(code: torch.Tensor) -> None:
    """Build the tables a product or its gradient derives from ``code``, ahead of any call. A
    first call under ``torch.compile(mode="reduce-overhead")`` would otherwise build them during
    the CUDA-graph warmup, inside the graph's memory pool, where a kept table is an error."""
    decode_table(code)
    float16_table(code)
