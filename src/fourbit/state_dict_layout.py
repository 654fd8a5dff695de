"""bitsandbytes' state-dict layout of a 4-bit tensor ``W``: ``W`` holds the packed codes,
``W.<statistic>`` each of STATISTICS_KEYS it has, and ``W.quant_state.bitsandbytes__<type>`` the
remaining QuantState fields as JSON bytes. Every module reads the layout from here."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_PACKED_STATE_BYTES",
    "PACKED_KEY_PREFIX",
    "PACKED_STATE_MARKER",
    "STATISTICS_KEYS",
    "pack_dict_to_tensor",
    "packed_state_key",
    "quant_type_of_packed_key",
    "state_dict_keys",
    "unpack_tensor_to_dict",
]

#: The tensors of a QuantState beside the packed codes (the nested two only with nested statistics).
STATISTICS_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
#: What precedes the quant type in the packed entry's last name part.
PACKED_KEY_PREFIX = "bitsandbytes__"
#: The part of a key that marks the packed entry: ``<W>.quant_state.bitsandbytes__<type>``.
PACKED_STATE_MARKER = f".quant_state.{PACKED_KEY_PREFIX}"


def packed_state_key(quant_type: str) -> str:
    """The packed entry's key relative to its tensor: ``quant_state.bitsandbytes__<quant_type>``."""
    return f"quant_state.{PACKED_KEY_PREFIX}{quant_type}"


def quant_type_of_packed_key(key: str) -> str:
    """The quant type a packed entry's key names (``...bitsandbytes__nf4`` -> ``nf4``)."""
    return key.rsplit(".", 1)[-1].removeprefix(PACKED_KEY_PREFIX)


def state_dict_keys(quant_type: str, nested: bool) -> list[str]:
    """The keys, relative to the tensor, of a QuantState in a state dict, in bitsandbytes' order."""
    statistics = STATISTICS_KEYS if nested else STATISTICS_KEYS[:2]
    return [*statistics, packed_state_key(quant_type)]


#: Largest packed quant_state JSON accepted: real ones hold a few hundred bytes.
MAX_PACKED_STATE_BYTES = 1 << 20


def pack_dict_to_tensor(source: Mapping[str, Any]) -> Tensor:
    """Encode a JSON-serialisable dict as UTF-8 JSON bytes in a 1-D uint8 tensor (bitsandbytes' format)."""
    if not isinstance(source, Mapping):
        raise TypeError(f"pack_dict_to_tensor takes a dict, got {type(source).__name__}")
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
