"""``Linear4bit`` (and ``LinearNF4``, ``LinearFP4``): a linear layer with a 4-bit weight.

The weight is a ``Params4bit``; moving the module to a device quantizes it there. The state dict
uses bitsandbytes' layout: ``weight`` (packed bytes), ``bias``, and ``weight.<k>`` for every
entry of ``quant_state.as_dict(packed=True)``. Unlike bitsandbytes, such a dict loads back with
``load_state_dict`` (into a fresh module, on meta or a real device), and a corrupt one raises a
clear error leaving the module as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F4
from ..autograd import matmul_4bit
from ..formats import DEFAULT_BLOCKSIZE, FLOAT_DTYPES
from ..validation import check_compute_dtype, check_settings
from .params import UNQUANTIZED_SHARD_ERROR, Params4bit
from .sharded import ShardedWeightSupport

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4"]

_SLOW_FP16_WARNING = (
    "Input type into Linear4bit is torch.float16, but compute_dtype is {compute_dtype}: inference will be slow. "
    "Pass compute_dtype=torch.float16 (or bfloat16) to compute in half precision."
)


def current_quant_state(module: nn.Module, weight: Any) -> F4.QuantState | None:
    """``weight``'s QuantState, or ``module``'s copy when the weight is not a Params4bit (FSDP2
    replaces it by a DTensor shard and, in forward, by the gathered packed bytes). A function,
    not a method: a compiled forward then guards it once, not once per layer."""
    state = getattr(weight, "quant_state", None)
    return state if state is not None else module.quant_state


def forward_quant_state(module: nn.Module, weight: Any) -> F4.QuantState:
    """The QuantState ``module`` computes with; a clear error when there is none or the bytes
    were cast. The module's class name is read only to raise: read on every call, it would make a
    compiled forward guard each layer's type against every other layer's, in Python."""
    if isinstance(weight, Params4bit) and not weight.bnb_quantized:
        raise RuntimeError(
            f"{type(module).__name__} weight is not quantized yet: move the module to a device first "
            "(module.to('cpu') or module.cuda()), or load a quantized state dict"
        )
    state = current_quant_state(module, weight)
    if state is None and not isinstance(weight, Params4bit):
        raise RuntimeError(UNQUANTIZED_SHARD_ERROR)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} weight has lost its quantization state")
    if not isinstance(weight, Params4bit) and weight.dtype != module.quant_storage:
        raise RuntimeError(
            f"{type(module).__name__} packed weight arrived as {weight.dtype}, but it is stored as "
            f"{module.quant_storage}: something cast the packed bytes (for example an FSDP2 MixedPrecisionPolicy "
            "whose param_dtype differs from quant_storage). Use quant_storage=torch.uint8, which is never cast, "
            "or a param_dtype equal to quant_storage"
        )
    return state


class Linear4bit(ShardedWeightSupport, nn.Linear):
    """A linear layer whose weight is stored in 4 bits (QLoRA's NF4 or FP4).

    Build it, load float (or pre-quantized) weights, then ``.to(device)``: the weight is
    quantized on that device. ``compute_dtype`` is the dtype of the product; when None it is
    taken from the first input (float32 and bfloat16 inputs set it). The output has the input's
    dtype. ``blocksize`` is a fourbit extension (bitsandbytes fixes 64).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        blocksize: int = DEFAULT_BLOCKSIZE,
    ) -> None:
        check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
        check_compute_dtype(compute_dtype)
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state: F4.QuantState | None = None
        self.quant_storage = quant_storage
        self._warned_slow_fp16 = False
        self._prepared: tuple | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        """A ``Params4bit`` assigned as the weight (transformers' and peft's pattern) is tied to this
        layer, so that quantizing it on ``.to(device)`` also records the state here (FSDP2 reads the
        layer's copy once the weight is sharded). A sharded weight FSDP2 assigns is gathered exactly."""
        super().__setattr__(name, value)
        if name == "weight":
            if isinstance(value, Params4bit):
                value.module = self
                value.share_state_with_module()
            else:
                self._gather_bytes_exactly(value)

    def extra_repr(self) -> str:
        weight = self.weight
        settings = f"quant_type={weight.quant_type}, blocksize={weight.blocksize}"
        return f"{super().extra_repr()}, {settings}, compute_dtype={self.compute_dtype}"

    # ------------------------------------------------------------------ forward

    def set_compute_type(self, x: Tensor) -> None:
        """Take the compute dtype from the first input, as bitsandbytes does."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32) and not self._warned_slow_fp16:
            self._warned_slow_fp16 = True
            if not torch.compiler.is_compiling():
                warnings.warn(_SLOW_FP16_WARNING.format(compute_dtype=self.compute_dtype), stacklevel=3)

    def _current_quant_state(self) -> F4.QuantState | None:
        """The weight's QuantState, or the module's copy (``current_quant_state``)."""
        return current_quant_state(self, self.weight)

    def _forward_quant_state(self) -> F4.QuantState:
        """The QuantState to compute with, or a clear error (``forward_quant_state``)."""
        return forward_quant_state(self, self.weight)

    def forward(self, x: Tensor) -> Tensor:
        parameters = self._parameters  # read without nn.Module.__getattr__, which costs more
        try:
            weight, bias = parameters["weight"], parameters["bias"]
        except KeyError:  # a parametrization or a replaced attribute took them out of _parameters
            weight, bias = self.weight, self.bias
        if isinstance(weight, Params4bit) and not weight.bnb_quantized:
            forward_quant_state(self, weight)  # raises: not quantized yet
        # compiled, the product checks the input against the state's shape (which the trace
        # guards anyway), so that the trace reads no attribute of its own for it
        compiling = torch.compiler.is_compiling()
        if not compiling:
            try:
                columns = x.shape[-1]
            except IndexError:  # a 0-d input
                columns = None
            if columns != self.in_features:
                raise ValueError(
                    f"{type(self).__name__} expects inputs with last dimension in_features={self.in_features}, "
                    f"got {'a 0-d input' if columns is None else columns} (input shape {tuple(x.shape)})"
                )
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        # dtypes held in locals: after a kernel has streamed a weight through the caches, each
        # tensor attribute read runs cold (docs/performance.md)
        input_dtype = dtype = x.dtype
        if self.compute_dtype is not None and input_dtype != self.compute_dtype:
            if not input_dtype.is_floating_point:  # the cast back would truncate the output
                raise TypeError(
                    f"{type(self).__name__} takes floating-point inputs, got {input_dtype} "
                    f"(compute_dtype {self.compute_dtype}), as nn.Linear does"
                )
            x = x.to(self.compute_dtype)
            dtype = self.compute_dtype
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if isinstance(weight, Params4bit) and dtype in FLOAT_DTYPES and not compiling:
            out = self._prepared_product(weight)(x, bias)
        else:
            out = matmul_4bit(x, weight, forward_quant_state(self, weight), bias=bias)
        return out if dtype == input_dtype else out.to(input_dtype)

    def _prepared_product(self, weight: Params4bit) -> Any:
        """The weight's product prepared once (``functional.prepare_linear``), rebuilt when the
        packed data, the state or any of its tensors is replaced (``functional.prepared_key``).
        A cached product was checked when it was built, so a hit checks nothing again."""
        cached = self.__dict__.get("_prepared")
        state = weight.quant_state
        if cached is not None and state is not None and cached[0] == F4.prepared_key(weight, state):
            return cached[1]
        state = self._forward_quant_state()
        cached = (F4.prepared_key(weight, state), F4.prepare_linear(weight, state))
        self.__dict__["_prepared"] = cached  # a plain attribute: not a parameter, buffer or module
        return cached[1]

    def _drop_prepared(self) -> None:
        self.__dict__["_prepared"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        self._drop_prepared()  # it holds the packed data this move replaces
        result = super()._apply(fn, recurse)
        weight = self._parameters.get("weight")
        if isinstance(weight, Params4bit):
            weight.share_state_with_module()  # the moved state: its buffer and static marks again
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_prepared"] = None  # compiled launches are rebuilt where the copy runs
        return state

    # ------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self._current_quant_state()
        if state is not None and state.tiled:  # checkpoints hold bitsandbytes' rows
            destination[f"{prefix}weight"] = F4.packed_rows(self.weight.detach(), state)
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _weight_from_state_dict(self, weight: Any, quant_entries: Mapping[str, Any], assign: bool) -> Params4bit:
        """The Params4bit a checkpoint's weight (packed with its QuantState, or float) becomes.

        Nothing of the layer changes here: a rejected checkpoint leaves it as it was. Unless
        ``assign``, the result owns copies, so that later changes to the dict do not reach it.
        """
        if not isinstance(weight, Tensor):
            raise TypeError(f"the weight entry must be a tensor, got {type(weight).__name__}")
        current = self.weight
        device = current.device if current.device.type != "meta" else weight.device
        expected = (self.out_features, self.in_features)
        if quant_entries:
            if not assign:
                weight = weight.detach().clone()
                quant_entries = {
                    key: value.detach().clone() if isinstance(value, Tensor) else value
                    for key, value in quant_entries.items()
                }
            loaded = Params4bit.from_prequantized(weight, quant_entries, device=device)
            if tuple(loaded.quant_state.shape) != expected:
                raise ValueError(
                    f"checkpoint weight has shape {tuple(loaded.quant_state.shape)} but this layer is {expected}"
                )
            loaded.module = self
            return loaded
        if tuple(weight.shape) != expected or not weight.is_floating_point():
            raise ValueError(
                f"a float weight of shape {expected} or a packed weight with its weight.quant_state entries "
                f"is needed, got a {weight.dtype} tensor of shape {tuple(weight.shape)} and no quant_state entries"
            )
        fresh = current.unquantized_like(weight.detach().clone(), module=self)
        return fresh.to(device) if device.type != "meta" else fresh

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight_key = f"{prefix}weight"
        quant_prefix = f"{weight_key}."
        quant_entries = {
            key[len(quant_prefix) :]: value for key, value in state_dict.items() if key.startswith(quant_prefix)
        }
        if quant_entries and not isinstance(self.weight, Params4bit):
            self._load_into_sharded_weight(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs, quant_entries
            )
            return
        replace_weight = weight_key in state_dict and (
            quant_entries or self.weight.bnb_quantized or self.weight.is_meta
        )
        if not replace_weight:
            # an unquantized layer takes a float weight like nn.Linear; .to(device) quantizes it
            # (a meta layer instead takes the checkpoint's weight and quantizes it where it lies)
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        assign = self.weight.is_meta or bool(local_metadata.get("assign_to_params_buffers"))
        try:
            weight = self._weight_from_state_dict(state_dict[weight_key], quant_entries, assign)
        except (ValueError, TypeError) as error:
            error_msgs.append(f"While loading {weight_key!r} into {type(self).__name__}: {error}")
            return
        others = {
            key: value for key, value in state_dict.items() if key != weight_key and not key.startswith(quant_prefix)
        }
        metadata = dict(local_metadata)
        if self.weight.is_meta:
            metadata["assign_to_params_buffers"] = True  # a meta layer takes the checkpoint's tensors
        super()._load_from_state_dict(others, prefix, metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        self.weight = weight  # ties the weight and records its state here (__setattr__)
        self._drop_prepared()


class LinearFP4(Linear4bit):
    """``Linear4bit`` with ``quant_type="fp4"``."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        blocksize: int = DEFAULT_BLOCKSIZE,
    ) -> None:
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "fp4",
            quant_storage,
            device,
            blocksize,
        )


class LinearNF4(Linear4bit):
    """``Linear4bit`` with ``quant_type="nf4"`` (QLoRA's NormalFloat)."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        blocksize: int = DEFAULT_BLOCKSIZE,
    ) -> None:
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "nf4",
            quant_storage,
            device,
            blocksize,
        )
