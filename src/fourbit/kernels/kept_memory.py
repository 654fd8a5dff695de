"""CUDA memory kept across calls (derived tables, split-K workspaces), allocated on a helper
thread: torch.compile's CUDA-graph warmup sends the calling thread's allocations to the graph's
memory pool, where a kept tensor is an error."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["kept_on_device"]

T = TypeVar("T")

#: The helper thread's name; a build running there that needs another runs it in place.
_HELPER_NAME = "fourbit-kept"


def kept_on_device(device: torch.device, make: Callable[[], T]) -> T:
    """``make()``, whose CUDA allocations are kept across calls: on the helper thread, on the
    caller's device and stream, so they come from the caching allocator's ordinary pool. Runs
    in place on the CPU, on the helper itself, and inside a capture (which keeps nothing)."""
    if device.type != "cuda" or threading.current_thread().name.startswith(_HELPER_NAME):
        return make()
    if torch.cuda.is_current_stream_capturing():
        return make()
    stream = torch.cuda.current_stream(device)

    def run() -> T:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            return make()

    return _helper().submit(run).result()


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The one thread that makes kept CUDA memory, started at the first."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=_HELPER_NAME)


if hasattr(os, "register_at_fork"):  # POSIX: a forked child has no helper thread
    os.register_at_fork(after_in_child=_helper.cache_clear)
