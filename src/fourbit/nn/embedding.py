"""``Embedding4bit``, ``EmbeddingNF4``, ``EmbeddingFP4``: bitsandbytes' 4-bit embedding tables.

The table is a ``Params4bit`` (plain statistics, as bitsandbytes makes them) quantized when the
module moves to a device, as ``Linear4bit``'s weight is. A lookup decodes only the rows it reads
when a row is a whole number of blocks (``embedding_dim`` a multiple of the blocksize), else the
whole table. The packed table is saved only in float form: a quantized module refuses
``state_dict()`` (bitsandbytes refuses it always), so save the float table and quantize it after
loading; a float table loads into a quantized module too, quantized again.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as F4
from ..validation import check_settings
from .linear import forward_quant_state
from .params import Params4bit

__all__ = ["Embedding4bit", "EmbeddingFP4", "EmbeddingNF4"]


class Embedding4bit(nn.Embedding):
    """``nn.Embedding`` with a 4-bit table, bitsandbytes' ``Embedding4bit``: quantized on the first
    move to a device (``module.to("cpu")``, ``.cuda()``); outputs in the table's original dtype."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        check_settings(quant_type=quant_type, quant_storage=quant_storage)
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.quant_state: F4.QuantState | None = None
        self.quant_storage = quant_storage
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=False,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        if embedding_dim % self.weight.blocksize:
            warnings.warn(
                f"Embedding size {embedding_dim} is not divisible by block size {self.weight.blocksize}: each "
                "lookup decodes the whole table",
                stacklevel=2,
            )

    def __setattr__(self, name: str, value: Any) -> None:
        """A ``Params4bit`` assigned as the table is tied to this module, as ``Linear4bit`` ties its weight."""
        super().__setattr__(name, value)
        if name == "weight" and isinstance(value, Params4bit):
            value.module = self
            value.share_state_with_module()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.weight.quant_type}"

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        state = forward_quant_state(self, weight)
        if state.tiled:  # a lookup reads whole rows: bitsandbytes' layout, from now on
            weight.to_rows()
        if state.nested or self.embedding_dim % state.blocksize:
            return F.embedding(input, F4.dequantize_4bit(weight.data, state)).to(self.dtype)
        blocks = self.embedding_dim // state.blocksize
        rows = weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        looked_up = F4.QuantState(
            absmax=F.embedding(input, state.absmax.view(self.num_embeddings, blocks)).reshape(-1),
            shape=(*input.shape, self.embedding_dim),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        return F4.dequantize_4bit(F.embedding(input, rows).reshape(-1, 1), looked_up).to(self.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Embedding4bit:
        result = super()._apply(fn, recurse)
        weight = self._parameters.get("weight")
        if isinstance(weight, Params4bit):
            weight.share_state_with_module()  # the moved state
        return result

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """A float table loads as ``nn.Embedding``'s does; into a quantized module it is quantized
        again with the module's settings, where it lies (nothing changes if it does not fit)."""
        key = f"{prefix}weight"
        weight, current = state_dict.get(key), self._parameters.get("weight")
        if isinstance(current, Params4bit) and current.bnb_quantized and isinstance(weight, Tensor):
            expected = (self.num_embeddings, self.embedding_dim)
            if tuple(weight.shape) != expected or not weight.is_floating_point():
                error_msgs.append(
                    f"While loading {key!r} into {type(self).__name__}: a float table of shape {expected} is needed, "
                    f"got a {weight.dtype} tensor of shape {tuple(weight.shape)}"
                )
                return
            fresh = current.unquantized_like(weight.detach().clone(), module=self)
            self.weight = fresh.to(current.device)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self._parameters.get("weight")
        if isinstance(weight, Params4bit) and weight.bnb_quantized:
            raise NotImplementedError(
                f"{type(self).__name__} cannot be saved quantized (bitsandbytes cannot either): save the float "
                "embedding table and quantize it after loading"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)


class EmbeddingFP4(Embedding4bit):
    """``Embedding4bit`` with FP4 codes."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device)


class EmbeddingNF4(Embedding4bit):
    """``Embedding4bit`` with NF4 codes."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device)
