"""FSDP2 and ``torch.distributed.checkpoint`` support of ``Linear4bit``.

FSDP2 replaces a layer's weight by a DTensor shard, which holds no QuantState; the layer keeps
it. These methods let checkpoint keys such as ``weight.absmax`` resolve through the sharded
weight, and load a checkpoint into a weight that is already sharded. ``PackedShard`` makes
FSDP2's all-gather move the packed bytes unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..quant_state import QuantState

__all__ = ["PackedShard", "ShardedWeightSupport"]

# Storage dtypes that FSDP2's CUDA all-gather copies through float32.
_WIDENED_DTYPES = (torch.bfloat16, torch.float16)


class PackedShard(Tensor):
    """One process's shard of packed 4-bit bytes under FSDP2, all-gathered as raw bytes (uint8).

    FSDP2 packs floating shards for the all-gather with CUDA ``_foreach_copy_``, which passes 16-bit
    floats through float32 and so quiets the signalling-NaN bit patterns that packed bytes viewed
    as bfloat16 or float16 hold (about one element in 500): each would arrive with one 4-bit code
    changed. Bytes are copied unchanged. ``Linear4bit`` gives its sharded weight this type when
    FSDP2 assigns it (``ShardedWeightSupport._gather_bytes_exactly``); views keep it.
    """

    def fsdp_pre_all_gather(
        self,
        mesh: Any,
        outer_size: torch.Size | None = None,
        outer_stride: tuple[int, ...] | None = None,
        module: Any = None,
        mp_policy: Any = None,
    ) -> tuple[tuple[Tensor, ...], torch.dtype]:
        """The all-gather input: the shard's bytes, and its dtype to view the gathered bytes as."""
        return (self.as_subclass(Tensor).view(torch.uint8),), self.dtype

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[Tensor, ...],
        metadata: torch.dtype,
        param_dtype: torch.dtype,
        *,
        out: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """The gathered bytes viewed as the storage dtype, whatever ``param_dtype`` a mixed-precision
        policy asks for (a cast would destroy packed bytes)."""
        (gathered,) = all_gather_outputs
        if out is not None:  # ``out`` views ``gathered``, whose storage FSDP2 has refilled
            return None
        return gathered.view(metadata), (gathered,)

    def __reduce_ex__(self, protocol: int) -> Any:
        """Pickle (torch.save, torch.distributed.checkpoint) as a plain tensor."""
        return self.as_subclass(Tensor).__reduce_ex__(protocol)


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
    """Mixed into ``Linear4bit`` (before ``nn.Linear``): exact all-gathers, state-dict key resolution
    and loading for a weight FSDP2 has sharded."""

    def _gather_bytes_exactly(self, weight: Any) -> None:
        """Make FSDP2 all-gather ``weight``, a sharded DTensor of packed bytes stored as a 16-bit float
        that FSDP2 is assigning, as raw bytes (``PackedShard``).

        Raises ValueError for an uneven split (packed rows not a multiple of the processes): FSDP2
        then requires all-gather inputs of the shard's own shape, which a byte view does not have.
        """
        local = getattr(weight, "_local_tensor", None)
        if type(local) is not Tensor or local.dtype not in _WIDENED_DTYPES or self.__dict__.get("quant_state") is None:
            return
        processes = weight.device_mesh.size(-1)
        if weight.shape[0] % processes:
            raise ValueError(
                f"{type(self).__name__}: FSDP2 would split its {weight.shape[0]} packed {weight.dtype} rows unevenly "
                f"over {processes} processes, and an uneven {weight.dtype} shard cannot be all-gathered without "
                "changing packed bytes (CUDA copies it through float32). Use quant_storage=torch.float32, "
                "or uint8 where this torch's FSDP2 shards integer parameters"
            )
        weight._local_tensor = local.as_subclass(PackedShard)

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
