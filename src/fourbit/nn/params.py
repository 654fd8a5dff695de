"""``Params4bit``: a Parameter that holds packed 4-bit data together with its QuantState.

Built from float data it is not yet quantized; ``.to(device)`` (also ``.cuda()``, ``.cpu()``)
quantizes it on that device, in place, as bitsandbytes does. Once quantized it keeps its packed
bytes and QuantState through ``.to()``, dtype casts, ``copy``, ``deepcopy``, pickle, and
``torch.chunk`` / ``torch.split`` (which FSDP2 uses to shard parameters).

On a device whose kernels read tiles faster (``ops.prefers_tiles``: CUDA), the packed bytes are
kept in ``fourbit.layout``'s tiles (``quant_state.tiled``); pickles, moves to other devices and
sharding store bitsandbytes' rows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import functional as F4
from .. import ops
from ..formats import DEFAULT_BLOCKSIZE
from ..state_buffer import build_statistics_buffer, build_traced_arguments, current_statistics_buffer
from ..validation import check_float_input, check_settings

__all__ = ["Params4bit"]

# Attributes carried by every Params4bit, in the order bitsandbytes sets them.
_ATTRIBUTES = (
    "blocksize",
    "compress_statistics",
    "quant_type",
    "quant_state",
    "quant_storage",
    "bnb_quantized",
    "module",
)
# Functions whose pieces stay Params4bit (FSDP2 shards parameters with torch.chunk).
_PIECEWISE = (torch.chunk, torch.split, Tensor.chunk, Tensor.split)
#: Raised by Linear4bit's forward for a weight that was sharded (or replaced) while still float.
UNQUANTIZED_SHARD_ERROR = (
    "Linear4bit weight was sharded before it was quantized (FSDP2's fully_shard splits parameters "
    "with torch.chunk): its float data is not quantized yet and never will be. Quantize first: move the model "
    "to its device (model.to('cuda') or model.to('cpu')) or load a 4-bit checkpoint "
    "(fourbit.convert.load_quantized), then call fully_shard"
)


def _rebuild_params4bit(data: Tensor, requires_grad: bool) -> Params4bit:
    """Unpickling entry point: the attributes follow through ``__setstate__``."""
    return Params4bit(data, requires_grad=requires_grad)


def _state_property(name: str, path: tuple[str, ...]) -> property:
    """A read-only attribute that reads ``quant_state.<path>``; AttributeError when absent.

    A property, not ``__getattr__``: torch.compile traces descriptors on tensor subclasses.
    FSDP's state-dict traversal resolves keys such as "weight.absmax" through these.
    """

    def read(self: Params4bit) -> Any:
        value = self.__dict__.get("quant_state")
        for part in path:
            value = getattr(value, part, None) if value is not None else None
        if value is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return value

    read.__name__ = name
    read.__doc__ = f"``quant_state.{'.'.join(path)}`` (AttributeError when not quantized or absent)."
    return property(read)


class Params4bit(torch.nn.Parameter):
    """A frozen parameter holding 4-bit packed data and the ``QuantState`` to decode it.

    Args mirror bitsandbytes: ``blocksize`` (default 64), ``compress_statistics`` (default True),
    ``quant_type`` ("fp4" by default, or "nf4"), ``quant_storage`` (dtype the packed bytes are
    viewed as), ``module`` (the owning Linear4bit, if any). ``requires_grad`` defaults to False.
    """

    def __new__(
        cls,
        data: Tensor | None = None,
        requires_grad: bool = False,
        quant_state: F4.QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: torch.nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> Params4bit:
        if data is None:
            data = torch.empty(0)
        if blocksize is None:
            blocksize = DEFAULT_BLOCKSIZE
        check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # ------------------------------------------------------------------ state, copies, pickle

    def __getstate__(self) -> dict[str, Any]:
        state = {name: self.__dict__.get(name) for name in _ATTRIBUTES}
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.requires_grad = state["requires_grad"]
        for name in _ATTRIBUTES:
            setattr(self, name, state[name])
        self.data = state["data"]

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The attributes go in the third slot: pickle records the new object before restoring
        # them, so the cycle param -> module -> param resolves to one object. The bytes go in
        # rows, as the pickled QuantState describes them (``QuantState.__getstate__``).
        state = self.__getstate__()
        if self.quant_state is not None:
            state["data"] = F4.packed_rows(self.data, self.quant_state)
        return _rebuild_params4bit, (state["data"], self.requires_grad), state

    def __copy__(self) -> Params4bit:
        """A shallow copy: shares the packed storage and the very same QuantState."""
        clone = type(self).__new__(type(self))
        clone.__setstate__(self.__getstate__())
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> Params4bit:
        """A deep copy: new storage and a new QuantState; the owning module is shared unless it is
        itself being deep-copied, in which case the copy points at the module's copy."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = self.__getstate__()
        state["quant_state"] = copy.deepcopy(state["quant_state"], memo)
        state["data"] = copy.deepcopy(state["data"], memo)
        state["module"] = memo.get(id(self.module), self.module)
        clone.__setstate__(state)
        return clone

    # ------------------------------------------------------------------ construction from a checkpoint

    @classmethod
    def from_prequantized(
        cls,
        data: Tensor,
        quantized_stats: Mapping[str, Any],
        requires_grad: bool = False,
        device: torch.device | str = "cuda",
        module: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Params4bit:
        """A quantized parameter from packed ``data`` and a (packed) QuantState dict, on ``device``.

        ``quant_storage`` is ``data.dtype``. Raises ValueError when the dict is corrupt or does not
        describe ``data``.
        """
        state = F4.QuantState.from_dict(quantized_stats, device=device)
        packed = data.to(device)
        F4.check_4bit_state(packed, state, name="quantized_stats")
        packed = F4.packed_for_device(packed, state)
        self = cls(
            packed,
            requires_grad=requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=packed.dtype,
            module=module,
            bnb_quantized=True,
        )
        self.share_state_with_module()
        return self

    def unquantized_like(self, data: Tensor, module: torch.nn.Module | None = None) -> Params4bit:
        """A not-yet-quantized Params4bit over the float ``data`` with this one's settings
        (blocksize, statistics, quant type, storage): ``.to(device)`` quantizes it like this one."""
        return type(self)(
            data,
            requires_grad=False,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            module=module,
        )

    # ------------------------------------------------------------------ quantization and moves

    def _quantize(self, device: torch.device) -> Params4bit:
        """Quantize the float data on ``device``, in place."""
        check_float_input(self.data, name="the weight to quantize")
        weight = self.data.contiguous().to(device)
        packed, state = F4.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.data = F4.packed_for_device(packed, state)
        self.quant_state = state
        self.bnb_quantized = True
        self.share_state_with_module()
        return self

    def share_state_with_module(self) -> None:
        """Record this weight's QuantState and storage dtype on its owning module: the one place the
        module's copy is written (FSDP2 reads the module's copy once the weight is sharded). The
        state's statistics are gathered in one buffer, which compiled calls read with the code
        table and one tuple of plain values instead of up to five tensors and a dozen attributes
        (``fourbit.state_buffer``); the tables the kernels derive from the code table are built
        (``functional.prepare_code_tables``); and a CUDA state is marked static for compiled CUDA
        graphs (``QuantState.mark_static_for_cuda_graphs``)."""
        state = self.quant_state
        if self.module is not None and state is not None:
            torch.nn.Module.__setattr__(self.module, "quant_state", state)
            torch.nn.Module.__setattr__(self.module, "quant_storage", self.quant_storage)
            if current_statistics_buffer(state) is None:
                build_statistics_buffer(state)
            else:
                build_traced_arguments(state)  # the layout or shape may have changed since
            F4.prepare_code_tables(state)
            state.mark_static_for_cuda_graphs()

    def _with_data(self, data: Tensor) -> Params4bit:
        """A Params4bit over ``data`` with every attribute of this one (the QuantState shared)."""
        return type(self)(
            data,
            requires_grad=self.requires_grad,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
            module=self.module,
            bnb_quantized=self.bnb_quantized,
        )

    def to(self, *args: Any, **kwargs: Any) -> Params4bit:
        """Move (and, the first time, quantize on a real device) the parameter.

        Unquantized: a non-meta device quantizes in place and returns self; otherwise a plain move
        or cast. Quantized: the packed data and QuantState move to the device; a dtype is ignored,
        because casting packed bytes would destroy them (``model.half()`` leaves 4-bit weights
        intact). To the meta device the QuantState is copied, not moved: the state this parameter
        and its layer hold keeps its tensors (``Module.to("meta")`` fails, as bitsandbytes' does,
        when it wraps the result in a ``Parameter``, and leaves the layer as it was).
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                if dtype is not None:
                    self.data = self.data.to(dtype=dtype)
                return self._quantize(device)
            return self._with_data(super().to(device=device, dtype=dtype, non_blocking=non_blocking))
        state = self.quant_state
        if state is None or device is None:
            return self._with_data(super().to(device=device, non_blocking=non_blocking))
        if device.type == "meta":
            moved = self._with_data(super().to(device=device))
            moved.quant_state = copy.deepcopy(state).to(device)
            return moved
        data = self.data
        if state.tiled and not ops.prefers_tiles(device, state.shape, state.blocksize):
            data = F4.packed_rows(data, state)  # converted where the bytes are, before the copy
            state.tiled = False
        state.to(device)
        return self._with_data(F4.packed_for_device(data.to(device, non_blocking=non_blocking), state))

    def cpu(self) -> Params4bit:
        return self.to(device="cpu")

    def cuda(self, device: int | torch.device | str | None = None, non_blocking: bool = False) -> Params4bit:
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def _keep_if_quantized(self, dtype: torch.dtype) -> Tensor:
        return self if self.bnb_quantized else self.to(dtype)

    def half(self) -> Tensor:
        return self._keep_if_quantized(torch.float16)

    def bfloat16(self) -> Tensor:
        return self._keep_if_quantized(torch.bfloat16)

    def float(self) -> Tensor:
        return self._keep_if_quantized(torch.float32)

    def double(self) -> Tensor:
        return self._keep_if_quantized(torch.float64)

    def to_rows(self) -> None:
        """Store the packed bytes in bitsandbytes' rows from now on (a tiled weight is converted in
        place); sharding does this, as tiles cannot be split into row ranges."""
        state = self.quant_state
        if state is not None and state.tiled:
            self.data = F4.packed_rows(self.data, state)
            state.tiled = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _PIECEWISE and isinstance(args[0], Params4bit):
            args[0].to_rows()
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func in _PIECEWISE:
            source = args[0]
            return tuple(source._with_data(piece) for piece in result)
        return result

    def __repr__(self) -> str:
        status = f"quantized {self.quant_type}" if self.bnb_quantized else f"not yet quantized ({self.quant_type})"
        return f"Params4bit({status}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ QuantState read-through

    absmax = _state_property("absmax", ("absmax",))
    code = _state_property("code", ("code",))
    quant_map = _state_property("quant_map", ("code",))
    offset = _state_property("offset", ("offset",))
    state2 = _state_property("state2", ("state2",))
    nested_absmax = _state_property("nested_absmax", ("state2", "absmax"))
    nested_blocksize = _state_property("nested_blocksize", ("state2", "blocksize"))
    nested_quant_map = _state_property("nested_quant_map", ("state2", "code"))
    nested_dtype = _state_property("nested_dtype", ("state2", "dtype"))
    nested_offset = _state_property("nested_offset", ("offset",))
