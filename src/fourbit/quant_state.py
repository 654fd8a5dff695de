"""``QuantState``: the statistics of a quantized tensor, and bitsandbytes' dict and state-dict
forms of it (``as_dict``/``from_dict``; the keys and the packed JSON entry are
``fourbit.state_dict_layout``'s, re-exported here)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor

from .formats import BLOCKWISE_BLOCKSIZES, FLOAT_DTYPES, QUANT_TYPES, num_blocks
from .layout import can_tile
from .state_buffer import (
    BUFFER_PARENT_ATTRIBUTE,
    STATISTICS_BUFFER_ATTRIBUTE,
    TRACED_ARGUMENTS_ATTRIBUTE,
    drop_statistics_buffer,
    relink_copied_buffer,
)
from .state_dict_layout import (
    MAX_PACKED_STATE_BYTES,
    PACKED_KEY_PREFIX,
    PACKED_STATE_MARKER,
    STATISTICS_KEYS,
    pack_dict_to_tensor,
    packed_state_key,
    quant_type_of_packed_key,
    state_dict_keys,
    unpack_tensor_to_dict,
)
from .validation import (
    check_blocksize,
    check_blockwise_blocksize,
    check_packed_size,
    check_quant_type,
    check_tensor,
    dtype_name,
    dtype_names,
)

__all__ = [
    "MAX_PACKED_STATE_BYTES",
    "PACKED_KEY_PREFIX",
    "PACKED_STATE_MARKER",
    "PREPARED_ATTRIBUTE",
    "STATISTICS_KEYS",
    "QuantState",
    "check_4bit_state",
    "check_packed_bytes",
    "pack_dict_to_tensor",
    "packed_state_key",
    "quant_type_of_packed_key",
    "state_dict_keys",
    "unpack_tensor_to_dict",
]

#: Where ``functional.prepared_product`` keeps a state's prepared product: never copied, pickled
#: or compared.
PREPARED_ATTRIBUTE = "_prepared_product"
_NOT_COPIED = (PREPARED_ATTRIBUTE, "_generation")


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


#: The attributes whose replacement invalidates a statistics buffer.
_STATISTICS_FIELDS = frozenset({"absmax", "code", "offset", "state2"})


def _same_values(a: Tensor | None, b: Tensor | None) -> bool:
    """Equal within 1e-6 (bitsandbytes' comparison), wherever the tensors live; None equals only None."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), atol=1e-6)


class QuantState:
    """Everything needed to undo a blockwise quantization: absmax, shape, code table, dtype, ...

    With nested statistics (``state2`` set), ``absmax`` holds uint8 codes of the centred
    per-block absmax, ``offset`` their mean and ``state2`` the 8-bit quantization state.
    ``tiled`` says that the packed bytes it describes are in the tiled runtime layout
    (``fourbit.layout``) rather than bitsandbytes' rows; it is never saved, and equality
    compares the statistics only.
    """

    #: Whether the packed bytes are tiled (``fourbit.layout``); a class default, so that states
    #: pickled before the attribute existed read False.
    tiled: bool = False
    #: The buffer the statistics are views of (``fourbit.state_buffer``), if any.
    _statistics_buffer: Tensor | None = None
    #: A weak reference to the state whose buffer this nested state's tensors are views of, if any.
    _buffer_parent: Any = None
    #: What a traced call reads of the state (``fourbit.state_buffer.traced_arguments``), if kept.
    _traced_arguments: tuple | None = None
    #: How many times a public attribute was assigned: with the state's identity, what a prepared
    #: product checks instead of each field (``fourbit.prepared.prepared_key``). Never copied.
    _generation: int = 0

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = tuple(f"{PACKED_KEY_PREFIX}{name}" for name in QUANT_TYPES)
    valid_qs_keys = (
        *STATISTICS_KEYS,
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    )
    _init_fields = ("absmax", "shape", "code", "dtype", "blocksize", "quant_type", "offset", "state2")
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
        # set directly: a new state has nothing for ``__setattr__`` to drop, whose bookkeeping torch
        # 2.11's dynamo cannot trace in compiled code that builds states (``Embedding4bit.forward``)
        shape = torch.Size(shape) if shape is not None else None
        values = (absmax, shape, code, dtype, blocksize, quant_type, offset, state2)
        for name, value in zip(self._init_fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        """Replacing a statistic drops the buffer its tensors were views of, and assigning any
        public attribute drops the traced arguments (``fourbit.state_buffer``) and the prepared
        product, which holds the tensors it was built from (``functional.prepared_product``)."""
        if not name.startswith("_"):
            self.__dict__.pop(TRACED_ARGUMENTS_ATTRIBUTE, None)
            self.__dict__.pop(PREPARED_ATTRIBUTE, None)
            object.__setattr__(self, "_generation", self._generation + 1)
        if name in _STATISTICS_FIELDS:
            drop_statistics_buffer(self)
        object.__setattr__(self, name, value)

    @property
    def nested(self) -> bool:
        """True when absmax is itself quantized (``state2`` holds its 8-bit state)."""
        return self.state2 is not None

    def __getattr__(self, name: str) -> Any:
        # FSDP's state-dict traversal resolves "weight.quant_state.bitsandbytes__nf4" via getattr.
        if name.startswith(PACKED_KEY_PREFIX) and name.removeprefix(PACKED_KEY_PREFIX) == self.quant_type:
            return self.as_dict(packed=True)[packed_state_key(self.quant_type)]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, index: int) -> Any:
        """The legacy list layout ``[absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    def __repr__(self) -> str:
        shape = tuple(self.shape) if self.shape is not None else None
        dtype = dtype_name(self.dtype) if self.dtype is not None else None
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={shape}, dtype={dtype}, "
            f"blocksize={self.blocksize}, nested={self.nested}{', tiled=True' if self.tiled else ''})"
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
            if short.startswith(PACKED_KEY_PREFIX):
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
        absmax = _tensor_entry(entries, "absmax")
        code = _tensor_entry(entries, "quant_map", 256 if blockwise else 16)
        if blockwise and shape is None and nested_present:
            raise ValueError("a nested 8-bit quant_state needs its 'shape'")

        offset = state2 = None
        if nested_present:
            nested_blocksize = _int_entry(entries, "nested_blocksize")
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
                absmax=_tensor_entry(entries, "nested_absmax"),
                code=_tensor_entry(entries, "nested_quant_map", 256),
                blocksize=nested_blocksize,
                dtype=_dtype_from_name(entries["nested_dtype"], "nested_dtype"),
            )
        state = cls(absmax, shape, code, blocksize, quant_type, dtype, offset, state2)
        state.validate()
        return state.to(device)

    def validate(self, packed: Tensor | None = None, name: str = "quant_state") -> None:
        """Raise a clear error unless the state is whole and consistent: its settings, one absmax
        entry per block, complete nested statistics; with ``packed``, that it describes those packed
        4-bit bytes and lives on their device.

        The one check of a state: ``from_dict`` runs it on what it read, and every 4-bit operation
        on the state it is given (``check_4bit_state``).
        """
        blockwise = self.quant_type is None  # an 8-bit blockwise state (quantize_blockwise)
        if blockwise and packed is None:
            check_blockwise_blocksize(self.blocksize, f"{name}.blocksize")
        else:
            check_quant_type(self.quant_type)
            check_blocksize(self.blocksize, name=f"{name}.blocksize")
            if self.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}.dtype={self.dtype} is not supported; allowed: {dtype_names(FLOAT_DTYPES)}")
            if self.shape is None:
                raise ValueError(f"{name}.shape is not set")
        if packed is not None:
            check_packed_bytes(packed, self, name)
        if self.tiled and not can_tile(self.shape):
            raise ValueError(f"{name} is tiled, but a weight of shape {tuple(self.shape)} has no tiled layout")
        blocks = num_blocks(prod(self.shape), self.blocksize) if self.shape is not None else None
        if not isinstance(self.absmax, Tensor) or (blocks is not None and self.absmax.numel() != blocks):
            found = self.absmax.numel() if isinstance(self.absmax, Tensor) else type(self.absmax).__name__
            raise ValueError(
                f"{name}.absmax must have {blocks} entries (one per block of {self.blocksize}), got {found}"
            )
        if self.nested:
            inner = self.state2
            if self.absmax.dtype != torch.uint8 or self.offset is None or inner.absmax is None or inner.code is None:
                raise ValueError(f"{name} is nested but lacks uint8 absmax codes, an offset or state2 statistics")
            check_blocksize(inner.blocksize, BLOCKWISE_BLOCKSIZES, f"{name}.state2.blocksize")
            if blocks is not None and inner.absmax.numel() != num_blocks(blocks, inner.blocksize):
                expected = num_blocks(blocks, inner.blocksize)
                raise ValueError(f"{name}.state2.absmax must have {expected} entries, got {inner.absmax.numel()}")
        elif not self.absmax.is_floating_point():
            raise ValueError(f"{name}.absmax must be floating point when not nested, got {self.absmax.dtype}")
        if packed is not None and self.absmax.device != packed.device:
            raise ValueError(
                f"{name} is on {self.absmax.device} but the packed data is on {packed.device}; "
                f"call {name}.to(device) first"
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
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            entries.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors drops tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return entries
        tensors = {key: value for key, value in entries.items() if isinstance(value, Tensor)}
        if self._statistics_buffer is not None:  # views of one buffer: copies, which safetensors can save
            tensors = {key: value.clone() for key, value in tensors.items()}
        scalars = {key: value for key, value in entries.items() if not isinstance(value, Tensor)}
        tensors[packed_state_key(self.quant_type)] = pack_dict_to_tensor(scalars)
        return tensors

    def mark_static_for_cuda_graphs(self) -> None:
        """Mark the state's CUDA tensors as static inputs of compiled graphs. Unmarked, CUDA-graph
        replays under ``torch.compile`` copy every one of them into the graph's own input buffers
        on each call; marked, they are read in place, and a replaced tensor (another address)
        makes cudagraph trees record again (``mark_static_address`` without a guard)."""
        tensors = [self.absmax, self.code, self.offset]
        if self.state2 is not None:
            tensors += [self.state2.absmax, self.state2.code]
        if self._statistics_buffer is not None:
            tensors.append(self._statistics_buffer)
        cuda = [t for t in tensors if isinstance(t, Tensor) and t.device.type == "cuda"]
        if cuda:
            import torch._dynamo  # only once there is a CUDA state: it costs a second to import

            for tensor in cuda:
                torch._dynamo.mark_static_address(tensor, guard=False)

    def _attributes(self) -> dict[str, Any]:
        """``__dict__`` without the product ``functional.prepared_product`` keeps here and the
        count of assignments (a copy is a new state)."""
        return {name: value for name, value in self.__dict__.items() if name not in _NOT_COPIED}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without ``tiled``: what pickles the packed bytes (``Params4bit``) stores them
        in rows, so an unpickled state describes rows. Statistics that are views of a buffer are
        pickled as copies of their own, without it: ``torch.save`` refuses views of one storage
        in two dtypes, and plain pickle would not keep them shared."""
        attributes = self._attributes()
        viewed = attributes.pop(STATISTICS_BUFFER_ATTRIBUTE, None) is not None
        viewed |= attributes.pop(BUFFER_PARENT_ATTRIBUTE, None) is not None
        attributes.pop(TRACED_ARGUMENTS_ATTRIBUTE, None)
        attributes.pop("tiled", None)
        if viewed:
            for name in _STATISTICS_FIELDS:
                if isinstance(attributes.get(name), Tensor):
                    attributes[name] = attributes[name].clone()
        return attributes

    def __copy__(self) -> QuantState:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self._attributes())
        relink_copied_buffer(self, clone, deep=False)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantState:
        """A deep copy keeps ``tiled``: it goes with a copy of the same bytes (``Params4bit``)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self._attributes(), memo))
        relink_copied_buffer(self, clone, deep=True)
        return clone

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` in place (returns self for chaining). Tensors already
        there stay as they are, so a state whose statistics share a buffer keeps it."""
        names = ("absmax", "code", "offset") if self.nested else ("absmax", "code")
        for name in names:
            tensor = getattr(self, name)
            moved = tensor.to(device) if tensor is not None else None
            if moved is not tensor:
                setattr(self, name, moved)
        if self.nested:
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


def check_4bit_state(packed: Tensor, state: Any, name: str = "quant_state") -> None:
    """Raise a clear error unless ``state`` is a ``QuantState`` that describes the packed 4-bit
    tensor ``packed`` (``QuantState.validate`` with the data)."""
    check_tensor(packed, "packed data")
    if not isinstance(state, QuantState):
        raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
    state.validate(packed, name)


def check_packed_bytes(packed: Tensor, state: QuantState, name: str = "quant_state") -> None:
    """Raise a clear error unless ``packed`` has a storage dtype and holds the bytes ``state.shape``
    needs (the part of ``check_4bit_state`` that reads no tensor of the state)."""
    check_packed_size(packed, state.shape, name)
