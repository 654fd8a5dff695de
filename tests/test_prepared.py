"""Prepared products: a weight's product is prepared once, reused, and never serves stale state.

``Linear4bit`` keeps ``functional.prepare_linear(weight, state)`` and rebuilds it when
``functional.prepared_key`` changes. The prepared Triton weight's launches:
``test_prepared_launches.py``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import available_devices as devices

import fourbit
import fourbit.functional as F4
import fourbit.ops as ops
from fourbit.nn import Linear4bit, Params4bit
from fourbit.quant_state import PREPARED_ATTRIBUTE

ON_GPU = torch.cuda.is_available()


def _layer(device: str, seed: int = 0, nested: bool = True, bias: bool = True) -> Linear4bit:
    torch.manual_seed(seed)
    layer = Linear4bit(256, 96, bias=bias, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    return layer.to(device)


def _expected(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    weight = F4.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return torch.nn.functional.linear(x, weight, bias)


def _check(layer: Linear4bit, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_the_prepared_product_is_built_once_and_reused(device):
    layer = _layer(device)
    x = torch.randn(3, 256, device=device)
    _check(layer, x)
    prepared = layer._prepared[1]
    _check(layer, x)
    assert layer._prepared[1] is prepared


@pytest.mark.parametrize("device", devices())
def test_a_reloaded_weight_is_never_served_from_the_old_preparation(device):
    layer, other = _layer(device, seed=0), _layer(device, seed=1)
    x = torch.randn(2, 256, device=device)
    _check(layer, x)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x))
    _check(layer, x)


@pytest.mark.parametrize("device", devices())
def test_a_replaced_state_or_statistics_tensor_rebuilds_the_preparation(device):
    layer, other = _layer(device, seed=0), _layer(device, seed=1)
    x = torch.randn(2, 256, device=device)
    _check(layer, x)
    # a new state object on the same packed bytes
    layer.weight.quant_state = other.weight.quant_state
    layer.quant_state = other.weight.quant_state
    _check(layer, x)
    # one statistics tensor of the state replaced
    state = layer.weight.quant_state
    state.state2.absmax = state.state2.absmax * 2
    _check(layer, x)
    state.offset = state.offset + 0.01
    _check(layer, x)


@pytest.mark.parametrize("device", devices())
def test_statistics_changed_in_place_are_seen(device):
    layer = _layer(device, nested=False)
    x = torch.randn(2, 256, device=device)
    _check(layer, x)
    layer.weight.quant_state.absmax.mul_(0.5)
    _check(layer, x)
    layer.weight.quant_state.code.mul_(-1)  # derived tables follow the code table's version
    _check(layer, x)


@pytest.mark.parametrize("device", devices())
def test_packed_bytes_replaced_in_the_parameter_rebuild_the_preparation(device):
    layer, other = _layer(device, seed=0), _layer(device, seed=1)
    x = torch.randn(2, 256, device=device)
    _check(layer, x)
    layer.weight.data = other.weight.data.clone()
    _check(layer, x)


def test_a_move_drops_and_rebuilds_the_preparation():
    layer = _layer("cpu")
    x = torch.randn(2, 256)
    _check(layer, x)
    layer.to("cpu")
    assert layer._prepared is None
    _check(layer, x)
    if ON_GPU:
        layer.cuda()
        _check(layer, x.cuda())


def test_copies_and_pickles_do_not_carry_the_preparation():
    layer = _layer("cpu")
    x = torch.randn(2, 256)
    _check(layer, x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._prepared is None
        with torch.no_grad():
            assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("device", devices())
def test_the_prepared_and_the_dispatched_product_agree_with_and_without_grad(device):
    """Both skip the dispatcher: inference calls the kernel, an input that needs gradients the
    kernel's autograd function (tests/test_eager_autograd.py)."""
    layer = _layer(device)
    x = torch.randn(4, 256, device=device)
    with torch.no_grad():
        fast = layer(x)
    leaf = x.clone().requires_grad_()
    slow = layer(leaf)
    torch.testing.assert_close(fast, slow.detach())
    slow.sum().backward()
    assert leaf.grad is not None


def test_prepare_linear_checks_the_weight_once():
    weight = torch.randn(8, 64)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4")
    with pytest.raises(ValueError, match="packed data holds"):
        F4.prepare_linear(packed[:-1], state)
    prepared = F4.prepare_linear(packed, state)
    torch.testing.assert_close(prepared(torch.ones(1, 64)), torch.ones(1, 64) @ F4.dequantize_4bit(packed, state).t())
    assert F4.prepared_key(packed, state) == F4.prepared_key(packed, state)
    assert isinstance(Params4bit(weight), torch.nn.Parameter)


def _functional_case(device: str, seed: int = 0):
    torch.manual_seed(seed)
    packed, state = F4.quantize_4bit(torch.randn(96, 256, device=device), quant_type="nf4", compress_statistics=True)
    return packed, state


def _check_functional(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    expected = x @ F4.dequantize_4bit(packed, state).to(x.dtype).t()
    with torch.no_grad():
        result = fourbit.matmul_4bit(x, packed.t(), state)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    return result


@pytest.mark.parametrize("device", devices())
def test_functional_products_are_prepared_once_per_state_and_rebuilt_when_it_changes(device, monkeypatch):
    """matmul_4bit keeps its prepared product on the state, as Linear4bit keeps its own."""
    built = []
    prepare = F4.prepare_linear
    monkeypatch.setattr(F4, "prepare_linear", lambda B, state: built.append(1) or prepare(B, state))
    packed, state = _functional_case(device)
    x = torch.randn(3, 256, device=device)
    _check_functional(x, packed, state)
    _check_functional(x, packed, state)  # a fresh .t() view of the same bytes
    assert len(built) == 1
    other_packed, other_state = _functional_case(device, seed=1)
    state.absmax = other_state.absmax  # a replaced statistics tensor
    _check_functional(x, packed, state)
    _check_functional(x, other_packed, state)  # other packed bytes
    state.state2.absmax = state.state2.absmax * 2
    _check_functional(x, other_packed, state)
    assert len(built) == 4
    state.blocksize = 4096  # a changed setting is checked again when rebuilt
    with pytest.raises(ValueError):
        fourbit.matmul_4bit(x, other_packed.t(), state)


def test_the_functional_preparation_is_not_copied_pickled_or_compared():
    packed, state = _functional_case("cpu")
    x = torch.randn(2, 256)
    result = _check_functional(x, packed, state)
    assert PREPARED_ATTRIBUTE in state.__dict__
    for clone in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert PREPARED_ATTRIBUTE not in clone.__dict__
        assert clone == state
        with torch.no_grad():
            assert torch.equal(fourbit.matmul_4bit(x, packed.t(), clone), result)


def test_the_key_changes_with_every_assignment_to_the_state_or_its_nested_state():
    """Assignments are counted per state; copies and pickles are new states and carry no count."""
    packed, state = _functional_case("cpu")
    keys = [F4.prepared_key(packed, state)]
    state.blocksize = state.blocksize  # the same value: still an assignment
    keys.append(F4.prepared_key(packed, state))
    state.state2.absmax = state.state2.absmax.clone()
    keys.append(F4.prepared_key(packed, state))
    state.code.mul_(1)  # in place: the code table's version
    keys.append(F4.prepared_key(packed, state))
    assert len(set(keys)) == len(keys)
    assert F4.prepared_key(packed, state) == keys[-1]
    for clone in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert "_generation" not in clone.__dict__ and clone == state


def test_an_input_on_another_device_than_the_weight_is_refused_with_a_clear_error():
    """Not a crash in the kernel, which would read the other device's pointer."""
    layer = _layer("cpu")
    packed, state = _functional_case("cpu")
    on_meta = torch.randn(2, 256, device="meta")
    with torch.no_grad(), pytest.raises(ValueError, match=r"input is on meta.*weight is on cpu"):
        layer(on_meta)
    with torch.no_grad(), pytest.raises(ValueError, match=r"input is on meta.*weight is on cpu"):
        fourbit.matmul_4bit(on_meta, packed.t(), state)
    with pytest.raises(ValueError, match="bias on meta"):
        fourbit.matmul_4bit(torch.randn(2, 256), packed.t(), state, bias=torch.zeros(96, device="meta"))


@pytest.mark.parametrize("device", devices())
def test_a_bias_of_the_wrong_length_is_refused_before_a_kernel_reads_it(device):
    """The prepared kernels read out_features bias values wherever the bias lies."""
    layer = _layer(device)
    layer.bias.data = torch.randn(5, device=device)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"bias must have shape \(96,\), got \(5,\)"):
            layer(torch.randn(2, 256, device=device, requires_grad=grad))


@pytest.mark.parametrize("device", devices())
def test_weights_quantized_in_inference_mode_work_in_and_out_of_it(device):
    """Inference tensors have no version counter; a prepared product keyed on one must not need it."""
    x = torch.randn(2, 96, device=device)
    with torch.inference_mode():
        layer = Linear4bit(96, 48, compute_dtype=torch.float32, quant_type="nf4").to(device)
        packed, state = F4.quantize_4bit(torch.randn(48, 96, device=device), quant_type="nf4")
        inside = layer(x), fourbit.matmul_4bit(x, packed.t(), state), F4.dequantize_4bit(packed, state)
    with torch.no_grad():
        outside = layer(x), fourbit.matmul_4bit(x, packed.t(), state), F4.dequantize_4bit(packed, state)
    for a, b in zip(inside, outside, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [1, 5])
def test_weights_quantized_in_inference_mode_train_outside_it(device, rows):
    """A LoRA step on a base quantized under ``torch.inference_mode`` (as bitsandbytes allows; an
    ``nn.Linear`` made there refuses): the weight's inference tensors are never saved for backward."""
    with torch.inference_mode():
        layer = Linear4bit(96, 48, compute_dtype=torch.float32, quant_type="nf4").to(device)
    weight = F4.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    through_layer = torch.randn(rows, 96, device=device, requires_grad=True)
    through_matmul = through_layer.detach().clone().requires_grad_()
    through_op = through_layer.detach().clone().requires_grad_()
    prepared = layer._prepared_product(layer.weight)
    for out in (
        layer(through_layer),
        fourbit.matmul_4bit(through_matmul, layer.weight.t(), layer.weight.quant_state, bias=layer.bias),
        ops.linear_4bit(through_op, prepared.packed, bias=layer.bias, **prepared.arguments),
    ):
        out.square().sum().backward()
    expected = (2 * F.linear(through_layer.detach(), weight, layer.bias)) @ weight
    for leaf in (through_layer, through_matmul, through_op):
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-4, atol=1e-4)


def test_a_layer_builds_its_derived_tables_when_moved():
    """Moving a Linear4bit to a device builds the tables its products and gradient derive from
    the code table, so that no compiled call builds them inside a CUDA graph's memory pool."""
    from fourbit.kernels import derived as cache

    def never(code):
        raise AssertionError("not built ahead")

    layer = Linear4bit(64, 32, compute_dtype=torch.float16).to("cpu")
    code = layer.weight.quant_state.code
    assert torch.equal(cache.derived(code, "decode", never), code + 0.0)
    assert torch.equal(cache.derived(code, "float16", never), code.half())
