"""Eager training products: an input that needs gradients runs the prepared kernel, not the op.

``ops.PreparedLinear`` sends such a call through ``ops._PreparedProduct``, the op's gradient
formula on the prepared kernel (its product, and a decode of the weight built once for the
backward). Its outputs and gradients must be the op's, and calls under a dispatch mode must
still reach the op.
"""

from __future__ import annotations

import pytest
import torch
from helpers import available_devices as devices

import fourbit.functional as F4
import fourbit.ops as ops
from fourbit.nn import Linear4bit


def _layer(device: str, nested: bool = True, bias: bool = True, dtype: torch.dtype = torch.float32) -> Linear4bit:
    torch.manual_seed(0)
    layer = Linear4bit(256, 96, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=nested)
    return layer.to(device)


def _through_the_op(layer: Linear4bit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Output and gradients of the op path for ``layer`` on ``x`` (a leaf) and the bias."""
    prepared = layer._prepared_product(layer.weight)
    bias = None if layer.bias is None else layer.bias.detach().to(x.dtype).requires_grad_()
    out = ops.linear_4bit(x, prepared.packed, bias=bias, **prepared.arguments)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device, dtype=x.dtype).reshape(out.shape))
    return out.detach(), x.grad, None if bias is None else bias.grad


class _Counted:
    """Wraps an op and counts its calls."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_a_training_product_skips_the_op_and_gives_its_output_and_gradients(device, dtype, nested, rows, monkeypatch):
    layer = _layer(device, nested=nested, dtype=dtype)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(rows, 256, device=device, dtype=dtype)
    expected_out, expected_grad, expected_bias_grad = _through_the_op(layer, x.clone().requires_grad_())

    products, decodes = _Counted(ops.linear_4bit), _Counted(ops.dequantize_4bit)
    monkeypatch.setattr(ops, "linear_4bit", products)
    monkeypatch.setattr(ops, "dequantize_4bit", decodes)
    leaf = x.clone().requires_grad_()
    out = layer(leaf)
    out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).reshape(out.shape))
    assert (products.calls, decodes.calls) == (0, 0)
    assert out.grad_fn.name().endswith("_PreparedProductBackward")
    if device == "cuda":  # K splits may add partial sums in another order
        torch.testing.assert_close(out.detach(), expected_out, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out.detach(), expected_out)
    assert torch.equal(leaf.grad, expected_grad)
    assert torch.equal(layer.bias.grad, expected_bias_grad)


@pytest.mark.parametrize("device", devices())
def test_only_the_gradients_asked_for_are_computed(device):
    layer = _layer(device)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 256, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None
    layer.bias.requires_grad_(True)
    frozen = torch.randn(3, 256, device=device)
    layer(frozen).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((96,), 3.0, device=device))


def test_a_packed_tensor_changed_in_place_before_the_backward_is_refused():
    weight = torch.randn(96, 256)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4")
    x = torch.randn(2, 256, requires_grad=True)
    out = F4.linear_4bit(x, packed, state)
    assert out.grad_fn.name().endswith("_PreparedProductBackward")
    packed.bitwise_not_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_dispatch_mode_still_sees_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = _layer("cpu")
    x = torch.randn(2, 256, requires_grad=True)
    with Seen() as seen:
        layer(x).sum().backward()
    assert "fourbit.linear_4bit.default" in seen.names
    assert x.grad is not None


def test_packed_bytes_moved_before_the_backward_are_decoded_where_they_are_now():
    """FSDP2 frees a gathered weight after the forward and gathers it again, elsewhere, for the
    backward, without a version change: the backward must not decode the forward's memory."""
    weight = torch.randn(96, 256)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4")
    x = torch.randn(2, 256, requires_grad=True)
    out = F4.linear_4bit(x, packed, state)
    old = packed.untyped_storage()
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(packed):
        packed.set_(packed.clone().untyped_storage(), 0, packed.shape, packed.stride())
    old.fill_(0)  # what another layer's gather might leave there
    out.sum().backward()
    torch.testing.assert_close(x.grad, F4.dequantize_4bit(packed, state).sum(0).expand(2, 256))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("wrap", ["checkpoint", "save_on_cpu"])
def test_checkpointed_and_offloaded_activations_give_the_same_gradients(device, wrap):
    """Activation checkpointing recomputes the forward in the backward; ``save_on_cpu`` hands the
    backward copies of what the forward saved (the packed bytes elsewhere)."""
    layer = _layer(device)
    x = torch.randn(6, 256, device=device)
    plain = x.clone().requires_grad_()
    layer(plain).square().sum().backward()
    expected_bias_grad, layer.bias.grad = layer.bias.grad, None
    leaf = x.clone().requires_grad_()
    if wrap == "checkpoint":
        out = torch.utils.checkpoint.checkpoint(layer, leaf, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            out = layer(leaf)
    out.square().sum().backward()
    assert torch.equal(leaf.grad, plain.grad)
    assert torch.equal(layer.bias.grad, expected_bias_grad)


@pytest.mark.parametrize("device", devices())
def test_a_batched_non_contiguous_input_gets_the_op_gradients(device):
    layer = _layer(device, dtype=torch.bfloat16)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    x = torch.randn(256, 3, 4, device=device, dtype=torch.bfloat16).permute(1, 2, 0)  # (3, 4, 256), strided
    expected_out, expected_grad, expected_bias_grad = _through_the_op(layer, x.detach().requires_grad_())
    layer.bias.grad = None
    leaf = x.detach().requires_grad_()
    out = layer(leaf)
    out.backward(torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).reshape(out.shape))
    assert out.shape == (3, 4, 96) and leaf.grad.shape == (3, 4, 256)
    torch.testing.assert_close(out.detach(), expected_out, rtol=1e-2, atol=1e-2)
    assert torch.equal(leaf.grad, expected_grad)
    assert torch.equal(layer.bias.grad, expected_bias_grad)
