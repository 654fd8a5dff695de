"""matmul_4bit: forward against dequantize + linear, gradients, empty inputs, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, available_devices, describe_dtype

import fourbit
import fourbit.functional as F4

SHAPES = {"1d": (64,), "2d": (5, 64), "3d": (2, 3, 64)}


def _weight(dtype, nested, quant_type="nf4"):
    torch.manual_seed(0)
    weight = torch.randn(40, 64, dtype=dtype)
    packed, state = F4.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested)
    return packed, state, F4.dequantize_4bit(packed, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward_and_gradients_match_the_dequantized_weight(dtype, shape, nested, with_bias):
    packed, state, dense = _weight(dtype, nested)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True) if with_bias else None
    out = fourbit.matmul_4bit(x, packed.t(), state, bias=bias)

    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_() if with_bias else None
    expected = F.linear(x_ref, dense, bias_ref)
    assert out.shape == (*shape[:-1], 40) and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


def test_no_gradient_reaches_the_packed_weight():
    packed, state, _ = _weight(torch.float32, nested=True)
    x = torch.randn(3, 64, requires_grad=True)
    fourbit.matmul_4bit(x, packed.t(), state).sum().backward()
    assert packed.grad is None and not packed.requires_grad and x.grad is not None


def test_bias_of_another_dtype_is_cast_to_the_input_dtype():
    packed, state, dense = _weight(torch.bfloat16, nested=False)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    bias = torch.randn(40)
    out = fourbit.matmul_4bit(x, packed.t(), state, bias=bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, dense, bias.to(torch.bfloat16)))


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_empty_inputs(shape):
    packed, state, _ = _weight(torch.float32, nested=True)
    x = torch.randn(shape, requires_grad=True)
    out = fourbit.matmul_4bit(x, packed.t(), state, bias=torch.zeros(40))
    assert out.shape == (*shape[:-1], 40)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_a_weight_without_columns_gives_the_bias(device, dtype, rows):
    """K = 0 is an empty sum: every product path (few rows, many rows, the op, the layer) gives the
    bias, as ``F.linear`` does, and gradients of the right shapes (the CPU kernels divided by K)."""
    layer = fourbit.nn.Linear4bit(0, 8, compute_dtype=dtype, quant_type="nf4").to(device)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(8.0))
    x = torch.randn(rows, 0, dtype=dtype, device=device, requires_grad=True)
    expected = torch.arange(8.0, device=device).to(dtype).expand(rows, 8)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert x.grad.shape == (rows, 0) and layer.bias.grad.tolist() == [float(rows)] * 8
    state = layer.weight.quant_state
    with torch.no_grad():
        functional = fourbit.matmul_4bit(x.detach(), layer.weight.t(), state, bias=layer.bias)
        compiled = torch.compile(lambda a: fourbit.matmul_4bit(a, layer.weight.t(), state, bias=layer.bias))
        through_op = compiled(x.detach())
    torch.testing.assert_close(functional, expected, rtol=0, atol=0)
    torch.testing.assert_close(through_op, expected, rtol=0, atol=0)


def test_out_argument_and_missing_state():
    packed, state, dense = _weight(torch.float32, nested=False)
    x = torch.randn(4, 64)
    out = torch.empty(4, 40)
    assert fourbit.matmul_4bit(x, packed.t(), state, out=out) is out
    torch.testing.assert_close(out, x @ dense.t())
    with pytest.raises(ValueError, match="quant_state is required"):
        fourbit.matmul_4bit(x, packed.t(), None)
    with pytest.raises(ValueError, match="out must be a float32 tensor of shape \\(4, 40\\)"):
        fourbit.matmul_4bit(x, packed.t(), state, out=torch.empty(4, 41))


def test_compiled_forward_and_backward_equal_eager():
    packed, state, _ = _weight(torch.float32, nested=True)
    bias = torch.randn(40, requires_grad=True)

    def model(x):
        return fourbit.matmul_4bit(x, packed.t(), state, bias=bias).sigmoid()

    x = torch.randn(6, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    out_c.sum().backward()
    grad_c, bias_grad_c = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    out_e = model(x)
    out_e.sum().backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(grad_c, x.grad)
    torch.testing.assert_close(bias_grad_c, bias.grad)
