"""``matmul_4bit``: bitsandbytes' differentiable product of an input with a packed 4-bit weight.

The gradient formula itself is registered on the ``fourbit::linear_4bit`` op (``fourbit.ops``),
so the product is differentiable in eager mode, under torch.compile, and through every caller.
"""

from __future__ import annotations

from torch import Tensor

from . import functional
from .functional import QuantState

__all__ = ["matmul_4bit"]


def matmul_4bit(
    A: Tensor,
    B: Tensor,
    quant_state: QuantState | None,
    out: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``A @ W.T + bias`` for the 4-bit weight ``W`` of ``quant_state.shape`` (N, K) packed in ``B``.

    ``A`` may have any number of leading dimensions; the result has A's dtype (``bias`` is cast
    to it). Gradients flow to ``A`` and ``bias``, never to the packed weight. An empty ``A``
    gives an empty result of shape ``(*A.shape[:-1], N)``.
    """
    if quant_state is None:
        raise ValueError("quant_state is required")
    if out is not None:
        functional.check_linear_input(A, quant_state)
        functional.check_out(out, (*A.shape[:-1], quant_state.shape[0]), A.dtype)
    result = functional.linear_4bit(A, B, quant_state, bias)
    return out.copy_(result) if out is not None else result
