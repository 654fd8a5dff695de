"""The Autograd kernel of ``fourbit::linear_4bit``: its gradient, and a short way for calls that
record none.

``torch.library.register_autograd`` wraps every call, gradient or not, in Python layers and a
second trip through the dispatcher to the device's kernel: 4-8 us a call on a 2-core CPU, paid by
every product of a compiled graph without CUDA graphs (a compiled prefill, compiled training).
This kernel records the gradient through an ``autograd.Function`` when an input requires one.
Otherwise, when the keys below autograd are a backend's key alone (plain tensors: no mode,
subclass, fake tensor or functionalization that must see the call), it calls the kernel that
``ops`` registered for that backend directly; anything else is redispatched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .formats import NESTED_BLOCKSIZE

__all__ = ["linear_4bit_autograd", "register_direct_kernel", "save_for_backward", "saved_tensors"]

_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
#: The schema's arguments before the defaulted ones, and those defaults (bias, nested_absmax,
#: nested_code, nested_offset, nested_blocksize, tiled): the dispatcher leaves out trailing
#: arguments equal to their default.
_REQUIRED = 6
_DEFAULTS = (None, None, None, None, NESTED_BLOCKSIZE, False)
#: Where ``A`` and ``bias`` are among the op's arguments.
_A, _BIAS = 0, 6

#: Whether any argument is a tensor that requires a gradient (in C++ from torch 2.6).
_any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (
    lambda *args: any(isinstance(arg, Tensor) and arg.requires_grad for arg in args)
)

#: Per backend keyset (``DispatchKeySet.raw_repr``), the op's kernel that calls may take directly.
_direct_kernels: dict[int, Callable[..., Tensor]] = {}


def register_direct_kernel(backend: torch._C.DispatchKey, kernel: Callable[..., Tensor]) -> None:
    """``kernel`` (the one registered for ``backend``) serves calls whose keys below autograd are
    ``backend`` alone."""
    _direct_kernels[torch._C.DispatchKeySet(backend).raw_repr()] = kernel


def save_for_backward(ctx: Any, *tensors: Tensor | None) -> None:
    """Saves the weight's tensors for the backward. Inference tensors (a weight quantized or loaded
    under ``torch.inference_mode``) cannot be saved; they cannot change outside inference mode
    either, so they are kept on ``ctx`` without autograd's version check, as bitsandbytes keeps its
    weight."""
    if any(tensor is not None and tensor.is_inference() for tensor in tensors):
        ctx.kept_tensors = tensors
    else:
        ctx.save_for_backward(*tensors)


def saved_tensors(ctx: Any) -> tuple[Tensor | None, ...]:
    """What ``save_for_backward`` kept."""
    kept = getattr(ctx, "kept_tensors", None)
    return kept if kept is not None else ctx.saved_tensors


class _Linear4bit(torch.autograd.Function):
    """The op with its gradient: for ``A`` (grad @ W, W decoded in grad's dtype) and the bias;
    none for the packed weight. The last input is the dispatch keyset."""

    @staticmethod
    def forward(ctx: Any, *arguments: Any) -> Tensor:
        *args, keyset = arguments
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.fourbit.linear_4bit.default.redispatch(keyset & _AFTER_AUTOGRAD, *args)
        (_, packed, absmax, code, blocksize, shape, bias, nested_absmax, nested_code, nested_offset,
         nested_blocksize, tiled) = (*args, *_DEFAULTS[len(args) - _REQUIRED :])  # fmt: skip
        save_for_backward(ctx, packed, absmax, code, nested_absmax, nested_code, nested_offset)
        ctx.blocksize, ctx.shape, ctx.nested_blocksize, ctx.tiled = blocksize, shape, nested_blocksize, tiled
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.arguments = len(args)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        packed, absmax, code, nested_absmax, nested_code, nested_offset = saved_tensors(ctx)
        grads: list[Tensor | None] = [None] * (ctx.arguments + 1)  # the keyset's too
        if ctx.needs_input_grad[_A]:
            weight = torch.ops.fourbit.dequantize_4bit(
                packed, absmax, code, ctx.blocksize, ctx.shape, grad.dtype, nested_absmax, nested_code,
                nested_offset, ctx.nested_blocksize, ctx.tiled,
            )  # fmt: skip
            grads[_A] = grad @ weight
        if ctx.bias_dtype is not None and ctx.needs_input_grad[_BIAS]:
            grads[_BIAS] = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return tuple(grads)


def linear_4bit_autograd(keyset: torch._C.DispatchKeySet, *args: Any) -> Tensor:
    """The op's Autograd kernel (``with_keyset``): the gradient recorded when an input requires
    one, else the backend's kernel called directly where nothing below autograd must see the call."""
    if torch.is_grad_enabled() and _any_requires_grad(*args):
        return _Linear4bit.apply(*args, keyset)
    below = keyset & _AFTER_AUTOGRAD
    kernel = _direct_kernels.get(below.raw_repr())
    if kernel is not None:
        return kernel(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fourbit.linear_4bit.default.redispatch(below, *args)
