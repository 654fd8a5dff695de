"""``dequantize_4bit`` of a 2-D weight decodes through the state's prepared product in eager mode.

The decode launch (CUDA) or the native weight's pointers (CPU) are then built once per state,
as ``matmul_4bit`` builds its product; the result must be what the op gives, a fresh tensor each
call, and never stale after the state or the bytes change.
"""

from __future__ import annotations

import pytest
import torch
from helpers import available_devices as devices

import fourbit
import fourbit.functional as F4
import fourbit.ops as ops


def _weight(device: str, seed: int = 0, nested: bool = True, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    weight = torch.randn(96, 256, device=device, dtype=dtype)
    return F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)


def _through_the_op(packed: torch.Tensor, state) -> torch.Tensor:
    """The general path: the op, asked through ``out=``."""
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    return F4.dequantize_4bit(packed, state, out=out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_repeated_decodes_are_prepared_once_and_match_the_op(device, dtype, nested, monkeypatch):
    packed, state = _weight(device, nested=nested, dtype=dtype)
    expected = _through_the_op(packed, state)
    built, decodes = [], []
    prepare, run = F4.prepare_linear, ops.run
    monkeypatch.setattr(F4, "prepare_linear", lambda B, s: built.append(1) or prepare(B, s))
    monkeypatch.setattr(ops, "run", lambda *args, **kwargs: decodes.append(args[0]) or run(*args, **kwargs))
    first = F4.dequantize_4bit(packed, state)
    second = F4.dequantize_4bit(packed, state)
    assert (len(built), decodes) == (1, [])
    assert first.dtype == dtype and first.shape == (96, 256)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    first.zero_()  # each call returns a tensor of its own
    assert torch.equal(F4.dequantize_4bit(packed, state), expected)


@pytest.mark.parametrize("device", devices())
def test_decodes_and_products_share_one_preparation(device, monkeypatch):
    """matmul_4bit takes the transposed view that dequantize_4bit does not: one preparation."""
    packed, state = _weight(device)
    built = []
    prepare = F4.prepare_linear
    monkeypatch.setattr(F4, "prepare_linear", lambda B, s: built.append(1) or prepare(B, s))
    x = torch.randn(3, 256, device=device)
    with torch.no_grad():
        for _ in range(3):
            weight = F4.dequantize_4bit(packed, state)
            torch.testing.assert_close(fourbit.matmul_4bit(x, packed.t(), state), x @ weight.t(), rtol=1e-4, atol=1e-4)
    assert len(built) == 1


@pytest.mark.parametrize("device", devices())
def test_a_changed_state_or_new_bytes_are_decoded_as_they_are_now(device):
    packed, state = _weight(device)
    F4.dequantize_4bit(packed, state)
    other_packed, other_state = _weight(device, seed=1)
    state.state2.absmax = other_state.state2.absmax.clone()
    state.absmax = other_state.absmax.clone()
    state.offset = other_state.offset.clone()
    assert torch.equal(F4.dequantize_4bit(other_packed, state), _through_the_op(other_packed, other_state))
    packed.copy_(other_packed)  # the same memory, new bytes
    assert torch.equal(F4.dequantize_4bit(packed, state), _through_the_op(other_packed, other_state))


def test_a_transposed_packed_view_still_gives_the_transposed_result():
    packed, state = _weight("cpu")
    assert torch.equal(F4.dequantize_4bit(packed.t(), state), F4.dequantize_4bit(packed, state).t())


def test_assigning_a_state_attribute_releases_the_tensors_its_preparation_held():
    import gc
    import weakref

    packed, state = _weight("cpu")
    old_absmax = state.state2.absmax
    F4.dequantize_4bit(packed, state)
    held = weakref.ref(packed)
    state.state2.absmax = old_absmax.clone()  # the nested state's own preparation is not involved
    state.absmax = state.absmax.clone()
    del packed
    gc.collect()
    assert held() is None
