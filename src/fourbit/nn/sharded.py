"""FSDP2 and ``torch.distributed.checkpoint`` support of ``Linear4bit``.

FSDP2 replaces a layer's weight by a DTensor shard, which holds no QuantState; the layer keeps
it. These methods let checkpoint keys such as ``weight.absmax`` resolve through the sharded
weight, and load a checkpoint into a weight that is already sharded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..quant_state import QuantState

__all__ = ["ShardedWeightSupport"]


class _StateDictKeys:
    """What key traversal sees under a Linear4bit's ``weight``: the packed QuantState entries."""

    def __init__(self, module: Any) -> None:
        self._module = module

    @property
    def weight(self) -> _StateDictKeys:
        return self

    def __getattr__(self, name: str) -> Any:
        state = self._module._current_quant_state()
        if state is not None:
            if name == "quant_state":
                return state
            entries = state.as_dict(packed=True)
            if name in entries:
                return entries[name]
        raise AttributeError(f"{type(self._module).__name__}.weight has no state-dict entry {name!r}")


class ShardedWeightSupport:
    """Mixed into ``Linear4bit`` (before ``nn.Linear``): state-dict key resolution and loading for a
    weight FSDP2 has sharded."""

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint resolves state-dict keys attribute by attribute; this sends
        ``weight.*`` through ``_state_dict_keys`` so that ``weight.absmax`` resolves even when FSDP2
        has replaced the weight by a DTensor."""
        return {"weight": "_state_dict_keys"}

    @property
    def _state_dict_keys(self) -> _StateDictKeys:
        return _StateDictKeys(self)

    def _load_into_sharded_weight(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
        quant_entries: Mapping[str, Any],
    ) -> None:
        """Load into a weight FSDP2 has sharded: the packed bytes are copied into the shard in place
        (as for any parameter) and the module's QuantState is rebuilt from the entries."""
        device = self.quant_state.absmax.device if self.quant_state is not None else self.weight.device
        try:
            state = QuantState.from_dict(quant_entries, device=device)
            expected = (self.out_features, self.in_features)
            if tuple(state.shape) != expected:
                raise ValueError(f"checkpoint weight has shape {tuple(state.shape)} but this layer is {expected}")
        except (ValueError, TypeError) as error:
            error_msgs.append(f"While loading {prefix}weight into {type(self).__name__}: {error}")
            return
        quant_prefix = f"{prefix}weight."
        others = {key: value for key, value in state_dict.items() if not key.startswith(quant_prefix)}
        super()._load_from_state_dict(others, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.quant_state = state
