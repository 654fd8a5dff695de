"""The Autograd kernel of ``fourbit::linear_4bit`` (``ops_autograd``): gradients with the
dispatcher's trailing defaults left out, and the direct call of the backend's kernel only where
nothing below autograd must see the call."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fourbit.functional as F4
from fourbit import ops_autograd


def _weight(device: str = "cpu"):
    torch.manual_seed(0)
    dense = torch.randn(48, 96, device=device)
    packed, state = F4.quantize_4bit(dense, quant_type="nf4", blocksize=64)
    return packed, state, F4.dequantize_4bit(packed, state)


@pytest.fixture
def weight():
    return _weight()


def _product(A, packed, state, *rest):
    return torch.ops.fourbit.linear_4bit(A, packed, state.absmax, state.code, 64, [48, 96], *rest)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_with_the_defaulted_arguments_left_out(weight, with_bias):
    """The dispatcher drops trailing arguments equal to their defaults: the gradient of ``A`` (and
    of a bias given positionally) is right whichever arguments came."""
    packed, state, dense = weight
    A = torch.randn(5, 96, requires_grad=True)
    bias = torch.randn(48, requires_grad=True) if with_bias else None
    out = _product(A, packed, state, *([bias] if with_bias else []))
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(A.grad, grad @ dense, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad, grad.sum(0))
    A.grad = None
    full = _product(A, packed, state, bias, None, None, None, 256, False)  # every argument given
    full.backward(grad)
    torch.testing.assert_close(A.grad, grad @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plain_calls_take_the_backend_kernel_and_modes_still_see_the_op(device, monkeypatch):
    """A plain call without a gradient reaches the kernel registered for its backend directly
    (on CUDA too: its keys below autograd are the backend's alone); under a dispatch mode the
    call is redispatched, so the mode sees the op."""
    packed, state, dense = _weight(device)
    backend = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, device.upper())).raw_repr()
    registered = ops_autograd._direct_kernels[backend]
    direct = []

    def counted(*args):
        direct.append(len(args))
        return registered(*args)

    monkeypatch.setitem(ops_autograd._direct_kernels, backend, counted)
    A = torch.randn(3, 96, device=device)
    expected = A @ dense.t()
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-3}  # TF32 dots
    torch.testing.assert_close(_product(A, packed, state), expected, **tolerance)
    assert direct == [6]

    seen = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Recording():
        torch.testing.assert_close(_product(A, packed, state), expected, **tolerance)
    assert torch.ops.fourbit.linear_4bit.default in seen and direct == [6]  # redispatched, not direct

    with torch.no_grad():
        _product(A.requires_grad_(), packed, state)  # nothing recorded: direct again
    assert direct == [6, 6]
