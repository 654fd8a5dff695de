"""``matmul_4bit``: bitsandbytes' differentiable product of an input with a packed 4-bit weight.

The gradient formula itself is registered on the ``fourbit::linear_4bit`` op (``fourbit.ops``),
so the product is differentiable in eager mode, under torch.compile, and through every caller.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import functional
from .functional import QuantState
from .state_buffer import weight_shape
from .validation import check_out

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
    if _quantized_as_k_by_n(A, quant_state):
        return _k_by_n_product(A, B, quant_state, out, bias)
    if out is not None:
        functional.check_linear_input(A, quant_state)
        check_out(out, (*A.shape[:-1], quant_state.shape[0]), A.dtype)
    result = functional.linear_4bit(A, B, quant_state, bias)
    return out.copy_(result) if out is not None else result


def _quantized_as_k_by_n(A: object, state: QuantState) -> bool:
    """Whether the weight was quantized from its (in, out) transpose: A's last dimension matches the
    state's first and not its second (square weights are read as (out, in))."""
    shape = weight_shape(state) if isinstance(state, QuantState) else getattr(state, "shape", None)
    return (
        isinstance(A, Tensor)
        and A.dim() > 0
        and shape is not None
        and len(shape) == 2
        and A.shape[-1] == shape[0] != shape[1]
    )


def _k_by_n_product(A: Tensor, B: Tensor, state: QuantState, out: Tensor | None, bias: Tensor | None) -> Tensor:
    """``A @ W + bias`` for a weight quantized as (in, out), as bitsandbytes still computes it, with
    its deprecation warning."""
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"matmul_4bit: the weight was quantized from a [K, N] tensor (quant_state.shape={list(state.shape)}). "
            "Re-quantize from the weight in [N, K] (out_features, in_features) orientation; this is slower and "
            "will become an error.",
            DeprecationWarning,
            stacklevel=3,
        )
    weight = functional.dequantize_4bit(B.reshape(-1, 1), state).to(A.dtype)  # (K, N), however B is viewed
    result = torch.nn.functional.linear(A, weight.t(), bias.to(A.dtype) if bias is not None else None)
    if out is not None:
        check_out(out, result.shape, A.dtype)
        return out.copy_(result)
    return result
