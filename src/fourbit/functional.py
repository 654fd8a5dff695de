"""Public 4-bit functions and ``QuantState``, with bitsandbytes' names, signatures and defaults.

This is the edge where arguments are checked: every function here raises ``ValueError`` or
``TypeError`` naming the bad argument and the allowed values before any kernel runs. The work
itself is done by the ``torch.ops.fourbit`` custom ops (``fourbit.ops``), which pick a kernel per
device. Nested statistics ("double quantization", ``compress_statistics=True``) are built here by
composing the 4-bit and the 8-bit ops, exactly as bitsandbytes does.
"""

from __future__ import annotations

import ctypes
import functools
import json
from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor

from . import ops
from .formats import (
    BLOCKSIZES,
    BLOCKWISE_BLOCKSIZES,
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    QUANT_STORAGE_DTYPES,
    QUANT_TYPES,
    create_dynamic_map,
    create_fp8_map,
    get_4bit_type,
    num_blocks,
    packed_nbytes,
)

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_fp8_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_4bit_type",
    "pack_dict_to_tensor",
    "prepare_linear",
    "prepared_key",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
    "unpack_tensor_to_dict",
]

_PACKED_KEY_PREFIX = "bitsandbytes__"


# --------------------------------------------------------------------------- argument checks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(_dtype_name(d) for d in dtypes)


def _check_tensor(value: Any, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_float_input(A: Any, name: str = "A") -> None:
    _check_tensor(A, name)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {_dtype_name(A.dtype)}; 4-bit quantization supports {_names(FLOAT_DTYPES)}")


def _check_blocksize(blocksize: Any, allowed: Sequence[int] = BLOCKSIZES, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{name}={blocksize!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def _check_quant_type(quant_type: Any) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; allowed: {', '.join(map(repr, QUANT_TYPES))}")


def _check_quant_storage(quant_storage: Any, numel: int) -> None:
    check_settings(quant_storage=quant_storage)
    itemsize = quant_storage.itemsize
    nbytes = packed_nbytes(numel)
    if nbytes % itemsize:
        raise ValueError(
            f"{numel} elements pack into {nbytes} bytes, which is not a whole number of "
            f"{_dtype_name(quant_storage)} items ({itemsize} bytes each); use quant_storage=torch.uint8 "
            f"or a tensor whose element count is a multiple of {2 * itemsize}"
        )


def check_settings(blocksize: Any = None, quant_type: Any = None, quant_storage: Any = None) -> None:
    """Raise ValueError naming the allowed values for a blocksize, quant_type or quant_storage
    (those given) that fourbit does not support."""
    if blocksize is not None:
        _check_blocksize(blocksize)
    if quant_type is not None:
        _check_quant_type(quant_type)
    if quant_storage is not None and quant_storage not in QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage={quant_storage!r} is not supported; allowed: {_names(QUANT_STORAGE_DTYPES)}")


def check_out(out: Any, shape: Sequence[int], dtype: torch.dtype, name: str = "out") -> None:
    """``out`` (when given) must be a ``dtype`` tensor of ``shape``, to receive a result by copy."""
    if out is None:
        return
    _check_tensor(out, name)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"{name} must be a {_dtype_name(dtype)} tensor of shape {tuple(shape)}, "
            f"got {_dtype_name(out.dtype)} of shape {tuple(out.shape)}"
        )


# --------------------------------------------------------------------------- code tables


@functools.cache
def _cached_4bit_code(quant_type: str, device: torch.device) -> Tensor:
    return get_4bit_type(quant_type, device=device)


@functools.cache
def _cached_dynamic_map(device: torch.device) -> Tensor:
    return create_dynamic_map().to(device)


# --------------------------------------------------------------------------- packed dict helpers


#: Largest packed quant_state JSON accepted: real ones hold a few hundred bytes.
MAX_PACKED_STATE_BYTES = 1 << 20


def pack_dict_to_tensor(source: Mapping[str, Any]) -> Tensor:
    """Encode a JSON-serialisable dict as UTF-8 JSON bytes in a 1-D uint8 tensor (bitsandbytes' format)."""
    payload = json.dumps(dict(source)).encode("utf-8")
    return torch.tensor(list(payload), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: Tensor) -> dict[str, Any]:
    """Decode a tensor written by ``pack_dict_to_tensor``; ValueError when it is not such a tensor."""
    if not isinstance(tensor, Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        described = f"{tensor.dtype} tensor of shape {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else tensor
        raise ValueError(f"packed quant_state must be a 1-D uint8 tensor of JSON bytes, got {described}")
    if tensor.numel() > MAX_PACKED_STATE_BYTES:
        raise ValueError(
            f"packed quant_state holds {tensor.numel()} bytes; a quantization state's JSON is a few hundred "
            f"(the limit is {MAX_PACKED_STATE_BYTES})"
        )
    data = tensor.detach().cpu().contiguous()
    try:
        decoded = json.loads(ctypes.string_at(data.data_ptr(), data.numel()).decode("utf-8") if data.numel() else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"packed quant_state is not valid UTF-8 JSON: {error}") from None
    if not isinstance(decoded, dict):
        raise ValueError(f"packed quant_state must hold a JSON object, got {type(decoded).__name__}")
    return decoded


# --------------------------------------------------------------------------- QuantState


def _dtype_from_name(value: Any, key: str) -> torch.dtype:
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant_state entry {key!r} must name a torch dtype, got {value!r}")
    return dtype


def _int_entry(entries: Mapping[str, Any], key: str) -> int:
    value = entries[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"quant_state entry {key!r} must be an integer, got {value!r}")
    return value


def _tensor_entry(entries: Mapping[str, Any], key: str, numel: int | None = None) -> Tensor:
    value = entries[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"quant_state entry {key!r} must be a tensor, got {type(value).__name__}")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"quant_state entry {key!r} must have {numel} elements, got {value.numel()}")
    return value


def _same_values(a: Tensor | None, b: Tensor | None) -> bool:
    """Equal within 1e-6 (bitsandbytes' comparison), wherever the tensors live; None equals only None."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), atol=1e-6)


class QuantState:
    """Everything needed to undo a blockwise quantization: absmax, shape, code table, dtype, ...

    With nested statistics (``state2`` set), ``absmax`` holds uint8 codes of the centred
    per-block absmax, ``offset`` their mean and ``state2`` the 8-bit quantization state.
    """

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = tuple(f"{_PACKED_KEY_PREFIX}{name}" for name in QUANT_TYPES)
    valid_qs_keys = (
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    )
    _required_keys = ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape")
    _nested_keys = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")

    def __init__(
        self,
        absmax: Tensor,
        shape: Sequence[int] | None = None,
        code: Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: Tensor | None = None,
        state2: QuantState | None = None,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """True when absmax is itself quantized (``state2`` holds its 8-bit state)."""
        return self.state2 is not None

    def __getattr__(self, name: str) -> Any:
        # FSDP's state-dict traversal resolves "weight.quant_state.bitsandbytes__nf4" via getattr.
        if name.startswith(_PACKED_KEY_PREFIX) and name.removeprefix(_PACKED_KEY_PREFIX) == self.quant_type:
            return self.as_dict(packed=True)[f"quant_state.{name}"]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, index: int) -> Any:
        """The legacy list layout ``[absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    def __repr__(self) -> str:
        shape = tuple(self.shape) if self.shape is not None else None
        dtype = _dtype_name(self.dtype) if self.dtype is not None else None
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={shape}, dtype={dtype}, "
            f"blocksize={self.blocksize}, nested={self.nested})"
        )

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str) -> QuantState:
        """Rebuild a state from ``as_dict`` output, packed or not, keys with or without a prefix.

        Tensors are moved to ``device``. The dict is not modified. Raises ValueError naming the keys
        when the dict is neither form, has several or unknown packed entries, unknown or missing
        keys, undecodable JSON or entries of the wrong type.
        """
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"qs_dict must be a mapping, got {type(qs_dict).__name__}")
        found = sorted(qs_dict)
        entries: dict[str, Any] = {}
        packed_entries: list[tuple[str, Any]] = []
        for key, value in qs_dict.items():
            short = str(key).split(".")[-1]
            if short.startswith(_PACKED_KEY_PREFIX):
                packed_entries.append((key, value))
            else:
                entries[short] = value
        if len(packed_entries) > 1:
            raise ValueError(f"expected exactly one packed quant_state entry, found {[k for k, _ in packed_entries]}")
        if packed_entries:
            key, value = packed_entries[0]
            if key.split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"unknown packed quant_state entry {key!r}; expected one ending in {cls.valid_qs_type_keys}"
                )
            entries.update(unpack_tensor_to_dict(value))
        elif "quant_type" not in entries:
            raise ValueError(f"expected packed or unpacked quant_state entries, found neither; keys: {found}")
        unknown = sorted(set(entries) - set(cls.valid_qs_keys))
        if unknown:
            raise ValueError(f"unknown quant_state entries {unknown}; keys found: {found}")
        missing = [key for key in cls._required_keys if key not in entries]
        if missing:
            raise ValueError(f"quant_state is missing {missing}; keys found: {found}")
        nested_present = [key for key in cls._nested_keys if key in entries]
        if nested_present and len(nested_present) != len(cls._nested_keys):
            absent = [key for key in cls._nested_keys if key not in entries]
            raise ValueError(f"quant_state has nested entries {nested_present} but lacks {absent}")

        quant_type = entries["quant_type"]
        blockwise = quant_type is None  # an 8-bit blockwise state (quantize_blockwise)
        if not blockwise and quant_type not in QUANT_TYPES:
            raise ValueError(
                f"quant_state entry 'quant_type' must be one of {QUANT_TYPES} (or None for an 8-bit "
                f"blockwise state), got {quant_type!r}"
            )
        blocksize = _int_entry(entries, "blocksize")
        if blockwise:
            _check_blockwise_blocksize(blocksize, "quant_state blocksize")
        else:
            _check_blocksize(blocksize, name="quant_state blocksize")
        dtype = _dtype_from_name(entries["dtype"], "dtype")
        shape_value = entries["shape"]
        if blockwise and shape_value is None:
            shape = None
        elif not isinstance(shape_value, (list, tuple, torch.Size)) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape_value
        ):
            raise ValueError(f"quant_state entry 'shape' must be a list of non-negative integers, got {shape_value!r}")
        else:
            shape = torch.Size(shape_value)
        expected_blocks = num_blocks(prod(shape), blocksize) if shape is not None else None
        absmax = _tensor_entry(entries, "absmax", expected_blocks)
        code = _tensor_entry(entries, "quant_map", 256 if blockwise else 16)
        if blockwise and expected_blocks is None and nested_present:
            raise ValueError("a nested 8-bit quant_state needs its 'shape'")

        offset = state2 = None
        if nested_present:
            if absmax.dtype != torch.uint8:
                raise ValueError(f"nested quant_state needs uint8 'absmax' codes, got {absmax.dtype}")
            nested_blocksize = _int_entry(entries, "nested_blocksize")
            _check_blocksize(nested_blocksize, BLOCKWISE_BLOCKSIZES, "quant_state nested_blocksize")
            nested_offset = entries["nested_offset"]
            if isinstance(nested_offset, Tensor):
                if nested_offset.numel() != 1:
                    raise ValueError(
                        f"quant_state entry 'nested_offset' must be one number, got a tensor of shape "
                        f"{tuple(nested_offset.shape)}"
                    )
                nested_offset = nested_offset.item()
            if isinstance(nested_offset, bool) or not isinstance(nested_offset, (int, float)):
                raise ValueError(f"quant_state entry 'nested_offset' must be a number, got {nested_offset!r}")
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=_tensor_entry(entries, "nested_absmax", num_blocks(expected_blocks, nested_blocksize)).to(
                    device
                ),
                code=_tensor_entry(entries, "nested_quant_map", 256).to(device),
                blocksize=nested_blocksize,
                dtype=_dtype_from_name(entries["nested_dtype"], "nested_dtype"),
            )
        elif not absmax.is_floating_point():
            raise ValueError(f"quant_state entry 'absmax' must be floating point, got {absmax.dtype}")
        return cls(
            absmax=absmax.to(device),
            shape=shape,
            code=code.to(device),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict (bitsandbytes' keys).

        ``packed=True`` keeps only tensors: absmax, quant_map (and nested_absmax, nested_quant_map)
        plus ``quant_state.bitsandbytes__<quant_type>``, the other entries as JSON bytes, so the
        result can go into a state dict or a safetensors file.
        """
        entries: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            entries.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors drops tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return entries
        tensors = {key: value for key, value in entries.items() if isinstance(value, Tensor)}
        scalars = {key: value for key, value in entries.items() if not isinstance(value, Tensor)}
        tensors[f"quant_state.{_PACKED_KEY_PREFIX}{self.quant_type}"] = pack_dict_to_tensor(scalars)
        return tensors

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` in place (returns self for chaining)."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return False
        if (self.state2 is None) != (other.state2 is None):
            return False
        return (
            _same_values(self.absmax, other.absmax)
            and self.shape == other.shape
            and _same_values(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and _same_values(self.offset, other.offset)
            and (self.state2 is None or self.state2 == other.state2)
        )

    __hash__ = None  # mutable; equality is by value


# --------------------------------------------------------------------------- 8-bit blockwise


def _check_blockwise_code(code: Any) -> None:
    _check_tensor(code, "code")
    if code.dim() != 1 or not 2 <= code.numel() <= 256 or not code.is_floating_point():
        raise ValueError(
            f"code must be a 1-D floating tensor of 2..256 sorted values, got {code.dtype} of shape {tuple(code.shape)}"
        )


def _check_blockwise_blocksize(blocksize: Any, name: str = "blocksize") -> None:
    """8-bit blockwise quantization takes any positive block size, as bitsandbytes' CPU path does."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{name} must be a positive integer, got {blocksize!r}")


def quantize_blockwise(
    A: Tensor,
    code: Tensor | None = None,
    absmax: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[Tensor, QuantState]:
    """8-bit blockwise quantization: each block of ``blocksize`` values is scaled by its absmax and
    mapped to the nearest entry of the sorted 256-entry ``code`` (default: the signed dynamic map).

    Returns the uint8 codes (same shape as ``A``) and a QuantState. ``nested=True`` quantizes the
    centred absmax again. ``out`` and ``absmax``, when given, receive the results (bitsandbytes'
    legacy arguments).
    """
    _check_float_input(A)
    _check_blockwise_blocksize(blocksize)
    if code is None:
        code = _cached_dynamic_map(A.device)
    else:
        _check_blockwise_code(code)
    code = code.to(device=A.device, dtype=torch.float32)
    check_out(out, A.shape, torch.uint8)
    check_out(absmax, (num_blocks(A.numel(), blocksize),), torch.uint8 if nested else torch.float32, "absmax")
    quantized, block_absmax = torch.ops.fourbit.quantize_blockwise(A.detach(), code, blocksize)
    if nested:
        qabsmax, offset, state2 = _nested_statistics(block_absmax, blocksize)
        state = QuantState(
            absmax=qabsmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2
        )
    else:
        state = QuantState(absmax=block_absmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        quantized = out.copy_(quantized)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return quantized, state


def _nested_statistics(block_absmax: Tensor, blocksize: int) -> tuple[Tensor, Tensor, QuantState]:
    """Nested statistics of float32 ``block_absmax``: their 8-bit codes around their mean (the
    subtraction happens inside the quantizer, which saves a pass), the mean, and the state of
    the 8-bit quantization (signed dynamic map)."""
    offset = block_absmax.mean() if block_absmax.numel() else block_absmax.new_zeros(())
    code = _cached_dynamic_map(block_absmax.device)
    codes, absmax = torch.ops.fourbit.quantize_blockwise(block_absmax, code, blocksize, offset)
    return codes, offset, QuantState(absmax=absmax, code=code.clone(), blocksize=blocksize, dtype=torch.float32)


def _decoded_nested_absmax(state: QuantState) -> Tensor:
    """Float32 absmax of a nested state: dequantized codes plus the offset."""
    return dequantize_blockwise(state.absmax, state.state2) + state.offset


def dequantize_blockwise(
    A: Tensor,
    quant_state: QuantState | None = None,
    absmax: Tensor | None = None,
    code: Tensor | None = None,
    out: Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Tensor:
    """Undo ``quantize_blockwise``: ``code[A] * absmax`` per block, in ``quant_state.dtype``
    (float32 when only ``absmax`` is given)."""
    _check_tensor(A, "A")
    if A.dtype != torch.uint8:
        raise ValueError(f"A must be uint8 codes from quantize_blockwise, got {_dtype_name(A.dtype)}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise requires either quant_state or absmax")
        if code is None:
            code = _cached_dynamic_map(A.device)
        else:
            _check_blockwise_code(code)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    _check_blockwise_blocksize(quant_state.blocksize, "quant_state.blocksize")
    if quant_state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype={quant_state.dtype} is not supported; allowed: {_names(FLOAT_DTYPES)}")
    scale = _decoded_nested_absmax(quant_state) if quant_state.nested else quant_state.absmax
    expected = num_blocks(A.numel(), quant_state.blocksize)
    if scale.numel() != expected:
        raise ValueError(
            f"absmax has {scale.numel()} entries but {A.numel()} codes in blocks of "
            f"{quant_state.blocksize} need {expected}"
        )
    check_out(out, A.shape, quant_state.dtype)
    entries = quant_state.code.numel()
    if entries < 256 and A.numel() and int(A.max()) >= entries:
        raise ValueError(f"A holds code {int(A.max())}, beyond the {entries}-entry code table")
    result = torch.ops.fourbit.dequantize_blockwise(
        A,
        scale.float(),
        quant_state.code.to(device=A.device, dtype=torch.float32),
        quant_state.blocksize,
        quant_state.dtype,
    )
    return out.copy_(result) if out is not None else result


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
    _check_float_input(A)
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    _check_quant_storage(quant_storage, A.numel())
    check_out(out, (packed_nbytes(A.numel()) // quant_storage.itemsize, 1), quant_storage)
    blocks = num_blocks(A.numel(), blocksize)
    check_out(absmax, (blocks,), torch.uint8 if compress_statistics else torch.float32, "absmax")
    # the kernels reuse what they derive from the shared table; each QuantState owns a copy
    # (safetensors refuses shared tensors)
    shared_code = _cached_4bit_code(quant_type, A.device)
    packed, block_absmax = torch.ops.fourbit.quantize_4bit(A.detach(), shared_code, blocksize, quant_storage)
    code = shared_code.clone()
    if compress_statistics:
        qabsmax, offset, state2 = _nested_statistics(block_absmax, NESTED_BLOCKSIZE)
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


def check_4bit_state(packed: Tensor, state: Any, name: str = "quant_state") -> None:
    """Raise a clear error unless ``state`` describes the packed 4-bit tensor ``packed``.

    Checks the types and settings of the state, that the packed bytes match ``state.shape``,
    that absmax has one entry per block, and that the statistics live on the data's device.
    """
    _check_tensor(packed, "packed data")
    if not isinstance(state, QuantState):
        raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
    _check_quant_type(state.quant_type)
    _check_blocksize(state.blocksize, name=f"{name}.blocksize")
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}.dtype={state.dtype} is not supported; allowed: {_names(FLOAT_DTYPES)}")
    if state.shape is None:
        raise ValueError(f"{name}.shape is not set")
    if packed.dtype not in QUANT_STORAGE_DTYPES:
        raise ValueError(
            f"packed 4-bit data has dtype {_dtype_name(packed.dtype)}; allowed: {_names(QUANT_STORAGE_DTYPES)}"
        )
    numel = prod(state.shape)
    nbytes = packed.numel() * packed.element_size()
    if nbytes != packed_nbytes(numel):
        raise ValueError(
            f"packed data holds {nbytes} bytes but {name}.shape={tuple(state.shape)} ({numel} values) "
            f"needs {packed_nbytes(numel)}"
        )
    blocks = num_blocks(numel, state.blocksize)
    if not isinstance(state.absmax, Tensor) or state.absmax.numel() != blocks:
        found = state.absmax.numel() if isinstance(state.absmax, Tensor) else type(state.absmax).__name__
        raise ValueError(f"{name}.absmax must have {blocks} entries (one per block of {state.blocksize}), got {found}")
    if state.nested:
        inner = state.state2
        if state.absmax.dtype != torch.uint8 or state.offset is None or inner.absmax is None or inner.code is None:
            raise ValueError(f"{name} is nested but lacks uint8 absmax codes, an offset or state2 statistics")
        _check_blocksize(inner.blocksize, BLOCKWISE_BLOCKSIZES, f"{name}.state2.blocksize")
        if inner.absmax.numel() != num_blocks(blocks, inner.blocksize):
            expected = num_blocks(blocks, inner.blocksize)
            raise ValueError(f"{name}.state2.absmax must have {expected} entries, got {inner.absmax.numel()}")
    elif not state.absmax.is_floating_point():
        raise ValueError(f"{name}.absmax must be floating point when not nested, got {state.absmax.dtype}")
    if state.absmax.device != packed.device:
        raise ValueError(
            f"{name} is on {state.absmax.device} but the packed data is on {packed.device}; "
            f"call {name}.to(device) first"
        )


def op_arguments(state: QuantState, device: torch.device) -> dict[str, Any]:
    """The ``torch.ops.fourbit`` keyword arguments describing a (possibly nested) 4-bit state on ``device``."""
    code = state.code if state.code is not None else _cached_4bit_code(state.quant_type, device)
    # flat and contiguous, whatever the state holds: the kernels read statistics as flat arrays
    absmax = state.absmax.reshape(-1)
    arguments: dict[str, Any] = {"absmax": absmax, "code": code.to(device=device, dtype=torch.float32)}
    if state.nested:
        arguments.update(
            nested_absmax=state.state2.absmax.reshape(-1).float(),
            nested_code=state.state2.code.to(device=device, dtype=torch.float32),
            nested_offset=state.offset.to(device=device, dtype=torch.float32),
            nested_blocksize=state.state2.blocksize,
        )
    return arguments


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
    _check_tensor(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit requires both absmax and out when quant_state is not provided")
        _check_tensor(out, "out")
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=DEFAULT_BLOCKSIZE if blocksize is None else blocksize,
            quant_type=quant_type,
        )
    check_4bit_state(A, quant_state)
    check_out(out, quant_state.shape, quant_state.dtype)
    result = torch.ops.fourbit.dequantize_4bit(
        A,
        blocksize=quant_state.blocksize,
        shape=list(quant_state.shape),
        dtype=quant_state.dtype,
        **op_arguments(quant_state, A.device),
    )
    if out is not None:
        result = out.copy_(result)
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and result.dim() == 2:
        return result.t()
    return result


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


def check_linear_input(A: Any, state: QuantState, name: str = "A") -> None:
    """Raise a clear error unless ``A`` can be multiplied by the 4-bit weight of ``state`` (N, K)."""
    _check_tensor(A, name)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {_dtype_name(A.dtype)}; 4-bit matmul supports {_names(FLOAT_DTYPES)}")
    if len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {tuple(state.shape)}")
    if A.dim() == 0 or A.shape[-1] != state.shape[1]:
        got = A.shape[-1] if A.dim() else "a scalar"
        raise ValueError(
            f"{name} has last dimension {got} but the 4-bit weight {tuple(state.shape)} expects in_features="
            f"{state.shape[1]}; a weight quantized as (in, out) must be re-quantized from its transpose"
        )


def linear_4bit(A: Tensor, B: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """``A @ dequantize(B).T + bias`` through the ``fourbit::linear_4bit`` op, after checking arguments.

    ``bias`` is cast to A's dtype. Differentiable in ``A`` and ``bias``.
    """
    check_4bit_state(B, state)
    check_linear_input(A, state)
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (state.shape[0],):
            raise ValueError(f"bias must have shape ({state.shape[0]},), got {tuple(bias.shape)}")
        bias = bias.to(A.dtype)
    return torch.ops.fourbit.linear_4bit(
        A, B, blocksize=state.blocksize, shape=list(state.shape), bias=bias, **op_arguments(state, A.device)
    )


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
    prepared = ops.PreparedLinear(packed, blocksize=state.blocksize, shape=state.shape, **op_arguments(state, B.device))
    prepared.state = state  # keeps the ids in prepared_key from being reused
    return prepared


def prepared_key(B: Tensor, state: QuantState) -> tuple[int, ...]:
    """What a ``prepare_linear`` result depends on: where the packed bytes are, the identity of
    the state and of each of its tensors, and the version of the code tables (derived tables)."""
    inner = state.state2
    code = state.code
    return (
        B.data_ptr(),
        id(state),
        id(state.absmax),
        id(code),
        code._version if code is not None else -1,
        id(state.offset),
        id(inner),
        id(inner.absmax) if inner is not None else 0,
        id(inner.code) if inner is not None else 0,
    )


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
