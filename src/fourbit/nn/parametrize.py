"""4-bit parametrization of any parameter (1-D, 2-D, 3-D MoE experts, ...).

``replace_parameter_4bit(module, "name")`` quantizes ``module.name`` and registers a
parametrization, so reading ``module.name`` returns the dequantized tensor (original shape, dtype
and device, no gradient) while only the packed bytes are stored.

Three things differ from bitsandbytes:

* Caching: the dequantized value is computed once per forward of the module, however often the
  parameter is read, and dropped when the forward ends. The cache belongs to the thread running
  the forward, so concurrent forwards of different modules do not interfere (bitsandbytes
  toggles torch's process-global parametrization cache).
* Loading: a state dict saved from a parametrized module (``name`` = packed data plus
  ``name.absmax``, ``name.quant_map``, ..., ``name.quant_state.bitsandbytes__nf4``) loads back,
  into an already parametrized module through ``module.load_state_dict``, and into a fresh
  float module through ``load_state_dict_4bit``. bitsandbytes cannot load such a dict.
* Errors: a corrupt or mismatched quantization state raises ValueError naming it, before the
  module is changed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.utils.parametrize as P
from torch import Tensor, nn

from .. import functional as F4
from ..kernels.derived import version
from ..state_dict_layout import PACKED_STATE_MARKER
from ..validation import check_float_input
from .params import Params4bit

__all__ = [
    "Bnb4bitParametrization",
    "Dequantize4bitParametrization",
    "load_state_dict_4bit",
    "replace_parameter_4bit",
    "replace_parameter_4bit_prequantized",
]

_HOOKS_ATTRIBUTE = "_fourbit_parametrize_hooks"


class _ForwardCache(threading.local):
    """Per-thread cache of dequantized values, alive while a parametrized module's forward runs."""

    def __init__(self) -> None:
        self.depth = 0
        self.values: dict[tuple[int, int, int], Tensor] = {}


_forward_cache = _ForwardCache()


class Dequantize4bitParametrization(nn.Module):
    """Turns the packed 4-bit data of a parameter back into its float tensor (``quant_state`` says how).

    Also available as ``Bnb4bitParametrization``, bitsandbytes' name.
    """

    def __init__(self, quant_state: F4.QuantState) -> None:
        super().__init__()
        self.quant_state = quant_state

    @torch.no_grad()
    def forward(self, quantized_param: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or _forward_cache.depth == 0:
            return F4.dequantize_4bit(quantized_param, self.quant_state)
        key = (id(self), quantized_param.data_ptr(), version(quantized_param))
        value = _forward_cache.values.get(key)
        if value is None:
            value = F4.dequantize_4bit(quantized_param, self.quant_state)
            _forward_cache.values[key] = value
        return value


Bnb4bitParametrization = Dequantize4bitParametrization


# --------------------------------------------------------------------------- hooks


def _open_forward_cache(module: nn.Module, inputs: Any) -> None:
    if not torch.compiler.is_compiling():
        _forward_cache.depth += 1


def _close_forward_cache(module: nn.Module, inputs: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    # always_call=True runs this even when the forward raised before the pre-hook counted it
    _forward_cache.depth = max(0, _forward_cache.depth - 1)
    if _forward_cache.depth == 0:
        _forward_cache.values.clear()


def _quantized_parametrization(module: nn.Module, name: str) -> Dequantize4bitParametrization | None:
    if not P.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, Dequantize4bitParametrization)), None)


def _save_state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Store each 4-bit parameter as ``name`` (packed) plus ``name.<quant_state entries>``."""
    if not P.is_parametrized(module):
        return
    for name in list(module.parametrizations.keys()):
        parametrization = _quantized_parametrization(module, name)
        original_key = f"{prefix}parametrizations.{name}.original"
        if parametrization is None or original_key not in state_dict:
            continue
        state_dict[f"{prefix}{name}"] = state_dict.pop(original_key)
        for key, value in parametrization.quant_state.as_dict(packed=True).items():
            state_dict[f"{prefix}{name}.{key}"] = value


def _quantized_names(state_dict: Mapping[str, Any], prefix: str) -> list[str]:
    """Direct parameter names under ``prefix`` that the state dict stores in 4-bit form."""
    names = []
    for key in state_dict:
        if key.startswith(prefix) and PACKED_STATE_MARKER in key:
            name = key[len(prefix) : key.index(PACKED_STATE_MARKER)]
            if name and "." not in name:
                names.append(name)
    return names


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Rebuild each 4-bit parameter of the checkpoint and point its packed data at the parametrization.

    Everything is checked first; a bad entry raises ValueError before the module changes.
    """
    plans = []
    for name in _quantized_names(state_dict, prefix):
        parametrization = _quantized_parametrization(module, name)
        if P.is_parametrized(module, name):
            current = module.parametrizations[name].original
            # the shape the module presents: the dequantized one, when it is 4-bit already
            expected_shape = tuple(parametrization.quant_state.shape) if parametrization is not None else None
        else:
            current = getattr(module, name, None)
            if not isinstance(current, nn.Parameter) or isinstance(current, Params4bit):
                continue  # not ours to load (a Linear4bit loads its own weight)
            expected_shape = tuple(current.shape)
        entries = {
            key[len(prefix) + len(name) + 1 :]: value
            for key, value in state_dict.items()
            if key.startswith(f"{prefix}{name}.")
        }
        packed = state_dict.get(f"{prefix}{name}")
        if packed is None:
            raise ValueError(f"state dict has quantization entries for '{prefix}{name}' but not its packed data")
        device = current.device if current.device.type != "meta" else packed.device
        try:
            state = F4.QuantState.from_dict(entries, device=device)
            packed = packed.to(device)
            F4.check_4bit_state(packed, state, name=f"'{prefix}{name}' quant_state")
        except ValueError as error:
            raise ValueError(f"cannot load 4-bit parameter '{prefix}{name}': {error}") from None
        if expected_shape is not None and tuple(state.shape) != expected_shape:
            raise ValueError(
                f"size mismatch for '{prefix}{name}': the checkpoint holds shape {tuple(state.shape)}, "
                f"the module's parameter is {expected_shape}"
            )
        plans.append((name, packed, state))
    for name, packed, state in plans:
        if P.is_parametrized(module, name):
            P.remove_parametrizations(module, name, leave_parametrized=False)
        setattr(module, name, nn.Parameter(torch.empty_like(packed), requires_grad=False))
        _register(module, name, state)
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            del state_dict[key]
        state_dict[f"{prefix}parametrizations.{name}.original"] = state_dict.pop(f"{prefix}{name}").to(packed.device)


def _install_hooks(module: nn.Module) -> None:
    """Register the cache, save and load hooks on ``module``, once."""
    if getattr(module, _HOOKS_ATTRIBUTE, None) is not None:
        return
    handles = (
        module.register_forward_pre_hook(_open_forward_cache),
        module.register_forward_hook(_close_forward_cache, always_call=True),
        module.register_state_dict_post_hook(_save_state_dict_post_hook),
        module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook),
    )
    object.__setattr__(module, _HOOKS_ATTRIBUTE, handles)


def _register(module: nn.Module, name: str, state: F4.QuantState) -> None:
    P.register_parametrization(module, name, Dequantize4bitParametrization(state), unsafe=True)
    _install_hooks(module)


def _checked_parameter(module: nn.Module, param_name: str) -> nn.Parameter:
    if not hasattr(module, param_name):
        raise AttributeError(f"Module does not have parameter '{param_name}'")
    value = getattr(module, param_name)
    if not isinstance(value, nn.Parameter):
        detail = ": it is already parametrized" if P.is_parametrized(module, param_name) else ""
        raise TypeError(f"Parameter '{param_name}' is not an instance of nn.Parameter{detail}")
    return value


# --------------------------------------------------------------------------- public functions


def replace_parameter_4bit(
    module: nn.Module,
    param_name: str,
    compress_statistics: bool = False,
    quant_type: str = "nf4",
    blocksize: int | None = None,
) -> None:
    """Quantize ``module.<param_name>`` to 4 bits and read it back through a parametrization.

    The parameter becomes ``nn.Parameter(packed, requires_grad=False)``; ``module.<param_name>``
    returns the dequantized tensor (computed once per forward of ``module``). The state dict
    stores ``param_name`` (packed) and ``param_name.<quant_state entries>``.

    Raises AttributeError when the module has no such attribute, TypeError when it is not an
    ``nn.Parameter``, ValueError for unsupported settings.
    """
    original = _checked_parameter(module, param_name)
    check_float_input(original, name=f"parameter '{param_name}'")
    packed, state = F4.quantize_4bit(
        original.data, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type
    )
    setattr(module, param_name, nn.Parameter(packed, requires_grad=False))
    _register(module, param_name, state)


def replace_parameter_4bit_prequantized(
    module: nn.Module, param_name: str, qs_dict: Mapping[str, Any], device: torch.device | str
) -> None:
    """Register the 4-bit parametrization on a parameter that already holds packed data.

    ``qs_dict`` is a (packed) QuantState dict, loaded onto ``device``. Raises AttributeError or
    TypeError as ``replace_parameter_4bit``, and ValueError when the dict is corrupt or does not
    describe the parameter's data.
    """
    packed = _checked_parameter(module, param_name)
    state = F4.QuantState.from_dict(qs_dict, device=device)
    F4.check_4bit_state(packed, state, name="qs_dict")
    _register(module, param_name, state)


def load_state_dict_4bit(module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
    """``module.load_state_dict`` for a checkpoint holding 4-bit parametrized parameters.

    Works on a fresh float module too: every parameter the checkpoint stores in 4-bit form is
    replaced by its packed data and parametrized with the checkpoint's QuantState. Returns what
    ``load_state_dict`` returns.
    """
    for prefix_name, submodule in module.named_modules():
        prefix = f"{prefix_name}." if prefix_name else ""
        names = _quantized_names(state_dict, prefix)
        if any(isinstance(getattr(submodule, name, None), Tensor) for name in names) and not any(
            isinstance(getattr(submodule, name, None), Params4bit) for name in names
        ):
            _install_hooks(submodule)
    return module.load_state_dict(state_dict, strict=strict, assign=assign)
