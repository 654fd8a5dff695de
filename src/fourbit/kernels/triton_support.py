"""Whether the installed Triton can run fourbit's CUDA kernels. Reads package metadata only, so
that asking imports no Triton."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

#: The oldest Triton the kernels are verified with (3.6 on an H200; 3.9's interpreter in CI). The
#: interpreters of Triton 3.1-3.4 (torch 2.5-2.8's own) fail the kernel tests, and no GPU with those
#: versions was at hand to tell whether compiled kernels would too, so CUDA tensors take the
#: reference path there.
MIN_TRITON = (3, 6)


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's (major, minor), read from its package metadata; None without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path
        import triton

        text = triton.__version__
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def triton_enabled() -> bool:
    """Whether CUDA tensors use the Triton kernels: Triton ``MIN_TRITON`` or newer is installed and
    FOURBIT_DISABLE_TRITON is unset."""
    version = triton_version()
    return version is not None and version >= MIN_TRITON and os.environ.get("FOURBIT_DISABLE_TRITON", "") in ("", "0")
