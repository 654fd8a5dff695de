"""Argument checks shared by the public functions: each raises a ValueError or TypeError that
names the argument, what it got and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor

from .formats import BLOCKSIZES, FLOAT_DTYPES, QUANT_STORAGE_DTYPES, QUANT_TYPES, packed_nbytes

__all__ = [
    "check_blocksize",
    "check_blockwise_blocksize",
    "check_blockwise_code",
    "check_compute_dtype",
    "check_float_input",
    "check_out",
    "check_packed_size",
    "check_quant_storage",
    "check_quant_type",
    "check_settings",
    "check_tensor",
    "dtype_name",
    "dtype_names",
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def check_tensor(value: Any, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_float_input(A: Any, name: str = "A", what: str = "4-bit quantization") -> None:
    check_tensor(A, name)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {dtype_name(A.dtype)}; {what} supports {dtype_names(FLOAT_DTYPES)}")


def check_blocksize(blocksize: Any, allowed: Sequence[int] = BLOCKSIZES, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{name}={blocksize!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def check_quant_type(quant_type: Any) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; allowed: {', '.join(map(repr, QUANT_TYPES))}")


def check_quant_storage(quant_storage: Any, numel: int) -> None:
    check_settings(quant_storage=quant_storage)
    itemsize = quant_storage.itemsize
    nbytes = packed_nbytes(numel)
    if nbytes % itemsize:
        raise ValueError(
            f"{numel} elements pack into {nbytes} bytes, which is not a whole number of "
            f"{dtype_name(quant_storage)} items ({itemsize} bytes each); use quant_storage=torch.uint8 "
            f"or a tensor whose element count is a multiple of {2 * itemsize}"
        )


def check_settings(blocksize: Any = None, quant_type: Any = None, quant_storage: Any = None) -> None:
    """Raise ValueError naming the allowed values for a blocksize, quant_type or quant_storage
    (those given) that fourbit does not support."""
    if blocksize is not None:
        check_blocksize(blocksize)
    if quant_type is not None:
        check_quant_type(quant_type)
    if quant_storage is not None and quant_storage not in QUANT_STORAGE_DTYPES:
        raise ValueError(
            f"quant_storage={quant_storage!r} is not supported; allowed: {dtype_names(QUANT_STORAGE_DTYPES)}"
        )


def check_out(out: Any, shape: Sequence[int], dtype: torch.dtype, name: str = "out") -> None:
    """``out`` (when given) must be a ``dtype`` tensor of ``shape``, to receive a result by copy."""
    if out is None:
        return
    check_tensor(out, name)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"{name} must be a {dtype_name(dtype)} tensor of shape {tuple(shape)}, "
            f"got {dtype_name(out.dtype)} of shape {tuple(out.shape)}"
        )


def check_blockwise_code(code: Any, quantizing: bool = False) -> None:
    """A code table for 8-bit blockwise (de)quantization: 2..256 floats; for ``quantizing``, in
    ascending order too (the quantizers search it for the nearest entry, and an unsorted table
    would make them pick wrong codes silently; a decode only looks entries up)."""
    check_tensor(code, "code")
    if code.dim() != 1 or not 2 <= code.numel() <= 256 or not code.is_floating_point():
        raise ValueError(
            f"code must be a 1-D floating tensor of 2..256 sorted values, got {code.dtype} of shape {tuple(code.shape)}"
        )
    if quantizing and not bool((code[1:] >= code[:-1]).all()):  # also false where an entry is NaN
        raise ValueError("code must be sorted in ascending order, without NaN (torch.sort(code).values)")


def check_compute_dtype(compute_dtype: Any) -> None:
    """A layer's ``compute_dtype``: None (taken from the first input) or a floating dtype."""
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")


def check_blockwise_blocksize(blocksize: Any, name: str = "blocksize") -> None:
    """8-bit blockwise quantization takes any positive block size, as bitsandbytes' CPU path does."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{name} must be a positive integer, got {blocksize!r}")


def check_packed_size(packed: Tensor, shape: Sequence[int], name: str = "quant_state") -> None:
    """Raise a clear error unless ``packed`` has a storage dtype and holds the bytes of a weight of
    ``shape`` (``name`` is the state whose shape it is)."""
    if packed.dtype not in QUANT_STORAGE_DTYPES:
        raise ValueError(
            f"packed 4-bit data has dtype {dtype_name(packed.dtype)}; allowed: {dtype_names(QUANT_STORAGE_DTYPES)}"
        )
    numel = prod(shape)
    nbytes = packed.numel() * packed.element_size()
    if nbytes != packed_nbytes(numel):
        raise ValueError(
            f"packed data holds {nbytes} bytes but {name}.shape={tuple(shape)} ({numel} values) "
            f"needs {packed_nbytes(numel)}"
        )
