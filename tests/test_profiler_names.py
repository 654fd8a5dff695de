"""Eager calls that skip the dispatcher still appear under their op's name in a profiler trace.

The prepared product, its training path and the direct quantize/dequantize calls never reach
``torch.ops.fourbit``, so without a label their time would show in ``torch.profiler`` as nobody's.
With a profiler listening they are recorded as ``fourbit::<op>``, and give the same results.
"""

from __future__ import annotations

import pytest
import torch
from helpers import available_devices as devices
from torch.profiler import ProfilerActivity, profile

import fourbit.functional as F4
from fourbit.nn import Linear4bit


def _traced(fn):
    """``fn()`` under a CPU profiler: its result and the names of the events recorded."""
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        result = fn()
    return result, [event.name for event in trace.events()]


def _layer(device: str) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit(256, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4").to(device)


@pytest.mark.parametrize("device", devices())
def test_an_eager_product_is_recorded_as_the_op_and_gives_the_same_output(device):
    layer = _layer(device)
    x = torch.randn(3, 256, device=device)
    with torch.no_grad():
        expected = layer(x)
        out, names = _traced(lambda: layer(x))
    assert names.count("fourbit::linear_4bit") == 1, names
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", devices())
def test_a_training_product_records_its_product_and_its_decode(device):
    layer = _layer(device)
    x = torch.randn(3, 256, device=device, requires_grad=True)

    def step():
        out = layer(x)
        out.sum().backward()
        return out

    _, names = _traced(step)
    assert names.count("fourbit::linear_4bit") == 1, names
    assert names.count("fourbit::dequantize_4bit") == 1, names


@pytest.mark.parametrize("device", devices())
def test_direct_quantize_and_dequantize_are_recorded_as_their_ops(device):
    weight = torch.randn(64, 128, device=device)
    (packed, state), names = _traced(lambda: F4.quantize_4bit(weight, quant_type="nf4"))
    assert "fourbit::quantize_4bit" in names, names
    expected = F4.dequantize_4bit(packed, state)
    decoded, names = _traced(lambda: F4.dequantize_4bit(packed, state))
    assert "fourbit::dequantize_4bit" in names, names
    assert torch.equal(decoded, expected)
