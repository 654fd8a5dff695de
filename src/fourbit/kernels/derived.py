"""Tables derived from a code tensor (the decode table, sorted midpoints, nibble maps, lookup
grids), built on the device once per code tensor and reused: eager calls then run only their
kernels.

Entries are keyed by the code's memory (address, dtype, shape, strides), so that another view of
the same values finds them: a compiled backward receives a code table saved by its forward as a
new view in every call. Each entry holds a weak reference to the tensor that owns the memory (a
view's base), and the version counter views share, so a table freed and another allocated at its
address, or a table changed in place, is rebuilt. Entries of freed code tables are dropped when
the cache fills; live ones are all kept (a model has one code table per layer). Nothing is
cached while a CUDA graph is being captured: a tensor made there holds its values only once the
graph is replayed. Outside a capture, CUDA tables are built on a helper thread: torch.compile's
CUDA-graph warmup sends the calling thread's allocations to the graph's memory pool, where a kept
table is an error. ``prepare_product_tables`` builds a code table's product tables ahead.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from . import reference

__all__ = ["decode_table", "derived", "float16_table", "prepare_product_tables", "version"]

T = TypeVar("T")

_entries: dict[tuple[object, ...], tuple[weakref.ref, int, int, object]] = {}
#: Entries kept before those of freed code tables are dropped; doubles past what stays alive, so
#: that a model with many code tables (one per layer) keeps all of them.
_MIN_LIMIT = 256
_limit = _MIN_LIMIT
#: The helper thread's name; a table built there that needs another builds it in place.
_HELPER_NAME = "fourbit-derived"


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
    capturing = code.is_cuda and torch.cuda.is_current_stream_capturing()
    off_thread = code.is_cuda and not capturing and not threading.current_thread().name.startswith(_HELPER_NAME)
    value = _build_off_thread(code, build) if off_thread else build(code)
    if not capturing:
        owner = code if code._base is None else code._base  # alive, the memory at the key is the code's
        _store(key, (weakref.ref(owner), owner.data_ptr(), version(code), value))
    return value


def _build_off_thread(code: torch.Tensor, build: Callable[[torch.Tensor], T]) -> T:
    """``build(code)`` on a helper thread, on the caller's device and stream: its memory comes
    from the caching allocator's ordinary pool even when the caller's goes to a CUDA graph's."""
    device, stream = code.device, torch.cuda.current_stream(code.device)

    def run() -> T:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            return build(code)

    return _helper().submit(run).result()


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The one thread that builds CUDA tables, started at the first."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=_HELPER_NAME)


if hasattr(os, "register_at_fork"):  # POSIX: a forked child has no helper thread
    os.register_at_fork(after_in_child=_helper.cache_clear)


def _store(key: tuple[object, ...], entry: tuple[weakref.ref, int, int, object]) -> None:
    """Keep ``entry``; at the limit, first drop the entries whose code tables were freed."""
    global _limit
    if len(_entries) >= _limit:
        for stale in [known for known, (owner, *_) in _entries.items() if owner() is None]:
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
