"""fourbit.functional: QuantState, quantize/dequantize (4-bit and 8-bit), gemv, error bounds."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import BLOCKSIZES, DTYPES, STORAGES, assert_same_bits, available_devices, describe_dtype

import fourbit.functional as F4
from fourbit.formats import get_4bit_type
from fourbit.functional import QuantState

# SPEC section 7: mean errors over a 1024x1024 N(0, 1) tensor (plus 1e-3 slack).
ERROR_BOUNDS = {
    "nf4": {64: (0.072792, 0.203299), 128: (0.076835, 0.215252), 256: (0.080326, 0.226044)},
    "fp4": {64: (0.096545, 0.260130), 128: (0.102947, 0.275734), 256: (0.108685, 0.289842)},
}


def errors(original: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    err = (original.float() - restored.float()).abs()
    return err.mean().item(), (err / (original.float().abs() + 1e-8)).mean().item()


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_spec_error_bounds(device, quant_type, blocksize):
    data = torch.randn(1024, 1024).to(device)  # drawn on the CPU: the same numbers on every device
    packed, state = F4.quantize_4bit(data, blocksize=blocksize, quant_type=quant_type)
    abs_err, rel_err = errors(data, F4.dequantize_4bit(packed, state))
    abs_bound, rel_bound = ERROR_BOUNDS[quant_type][blocksize]
    assert abs_err < abs_bound + 1e-3
    assert rel_err < rel_bound + 1e-3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_error_grows_with_blocksize_and_nesting_costs_little(quant_type):
    torch.manual_seed(1)
    data = torch.randn(512, 1024)
    previous = 0.0
    for blocksize in BLOCKSIZES:
        packed, state = F4.quantize_4bit(data, blocksize=blocksize, quant_type=quant_type)
        abs_err, _ = errors(data, F4.dequantize_4bit(packed, state))
        assert abs_err > previous
        previous = abs_err
        packed, nested = F4.quantize_4bit(data, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        nested_err, _ = errors(data, F4.dequantize_4bit(packed, nested))
        assert nested_err < abs_err * 1.01
    assert previous < {"nf4": 0.105, "fp4": 0.14}[quant_type]  # blocksize 4096 stays usable


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("storage", STORAGES, ids=describe_dtype)
def test_round_trip_keeps_shape_dtype_device(dtype, quant_type, nested, storage):
    data = torch.randn(4, 6, 40).to(dtype)
    packed, state = F4.quantize_4bit(data, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    assert packed.dtype == storage and packed.shape == (480 // storage.itemsize, 1)
    assert state.shape == data.shape and state.dtype == dtype and state.nested == nested
    assert state.blocksize == 64 and state.quant_type == quant_type
    restored = F4.dequantize_4bit(packed, state)
    assert restored.shape == data.shape and restored.dtype == dtype
    assert errors(data, restored)[0] < 0.11


def test_defaults_match_bitsandbytes():
    _, state = F4.quantize_4bit(torch.randn(128))
    assert state.quant_type == "fp4" and state.blocksize == 64 and not state.nested
    _, blockwise = F4.quantize_blockwise(torch.randn(5000))
    assert blockwise.blocksize == 4096 and blockwise.absmax.shape == (2,)


def test_wrappers_fix_the_quant_type():
    data = torch.randn(256)
    for quantize, dequantize, name in (
        (F4.quantize_nf4, F4.dequantize_nf4, "nf4"),
        (F4.quantize_fp4, F4.dequantize_fp4, "fp4"),
    ):
        packed, state = quantize(data, blocksize=128)
        assert state.quant_type == name and state.blocksize == 128
        assert torch.equal(dequantize(packed, state), F4.dequantize_4bit(packed, state))
        out = torch.empty(256)
        assert torch.equal(
            dequantize(packed, absmax=state.absmax, out=out, blocksize=128), F4.dequantize_4bit(packed, state)
        )


def test_dequantize_without_state_uses_absmax_and_out():
    data = torch.randn(16, 64, dtype=torch.bfloat16)
    packed, state = F4.quantize_4bit(data, quant_type="nf4", blocksize=128)
    out = torch.empty(16, 64, dtype=torch.bfloat16)
    result = F4.dequantize_4bit(packed, absmax=state.absmax, out=out, blocksize=128, quant_type="nf4")
    assert result is out
    assert torch.equal(out, F4.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="requires both absmax and out"):
        F4.dequantize_4bit(packed, absmax=state.absmax)


def test_out_and_absmax_arguments_receive_the_results():
    data = torch.randn(300)
    out = torch.empty(150, 1, dtype=torch.uint8)
    absmax = torch.empty(5)
    packed, state = F4.quantize_4bit(data, absmax=absmax, out=out)
    assert packed is out and state.absmax is absmax
    expected, expected_state = F4.quantize_4bit(data)
    assert torch.equal(out, expected) and torch.equal(absmax, expected_state.absmax)


def test_transposed_packed_form_gives_the_transposed_result():
    data = torch.randn(32, 48)
    packed, state = F4.quantize_4bit(data, quant_type="nf4")
    regular = F4.dequantize_4bit(packed, state)
    assert torch.equal(F4.dequantize_4bit(packed.t(), state), regular.t())


def test_all_zero_blocks_round_trip_to_exact_zeros():
    data = torch.zeros(3, 100)
    data[1, :] = torch.randn(100)
    for nested in (False, True):
        packed, state = F4.quantize_4bit(data, quant_type="nf4", compress_statistics=nested)
        restored = F4.dequantize_4bit(packed, state)
        assert not restored.isnan().any()
        assert torch.equal(restored[0], torch.zeros(100))
    packed, state = F4.quantize_4bit(torch.zeros(128))
    assert torch.equal(state.absmax, torch.zeros(2))


def test_nan_and_inf_behave_as_in_bitsandbytes():
    """A NaN makes its block's absmax NaN, so the whole block decodes to NaN. An inf makes the
    absmax inf: every finite value of the block scales to 0 and decodes to 0 * inf = NaN, while
    the inf itself decodes to inf. Other blocks are untouched. (Checked against bitsandbytes
    in test_golden.py and test_bnb_compat.py.)"""
    data = torch.randn(3, 64)
    data[0, 5] = float("nan")
    data[1, 9] = float("inf")
    packed, state = F4.quantize_4bit(data, quant_type="nf4")
    restored = F4.dequantize_4bit(packed, state)
    assert state.absmax[0].isnan() and state.absmax[1] == float("inf")
    assert restored[0].isnan().all()
    assert restored[1, 9] == float("inf")
    assert restored[1].isnan().sum() == 63
    assert not restored[2].isnan().any()


def test_quantize_never_modifies_its_input():
    data = torch.randn(5, 77, dtype=torch.bfloat16)
    data[0, 0] = float("nan")
    before = data.clone()
    for nested in (False, True):
        F4.quantize_4bit(data, quant_type="nf4", compress_statistics=nested)
    F4.quantize_blockwise(data, nested=True)
    assert_same_bits(data, before)


def test_empty_tensors_quantize_to_empty_results():
    packed, state = F4.quantize_4bit(torch.empty(0, 5))
    assert packed.shape == (0, 1) and state.absmax.shape == (0,)
    assert F4.dequantize_4bit(packed, state).shape == (0, 5)
    packed, nested = F4.quantize_4bit(torch.empty(0), compress_statistics=True)
    assert nested.offset == 0 and F4.dequantize_4bit(packed, nested).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_blockwise_round_trip(dtype, nested):
    data = torch.randn(10000).to(dtype)
    quantized, state = F4.quantize_blockwise(data, blocksize=256, nested=nested)
    assert quantized.dtype == torch.uint8 and quantized.shape == data.shape and state.nested == nested
    restored = F4.dequantize_blockwise(quantized, state)
    assert restored.dtype == dtype
    assert (restored.float() - data.float()).abs().mean() < 0.01
    plain = F4.dequantize_blockwise(
        quantized,
        absmax=F4.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax,
        blocksize=256,
    )
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain.to(dtype), restored, rtol=0, atol=0)


def test_blockwise_with_a_custom_code():
    code = torch.linspace(-1, 1, 256)
    data = torch.randn(1000)
    quantized, state = F4.quantize_blockwise(data, code=code, blocksize=128)
    assert torch.equal(state.code, code)
    restored = F4.dequantize_blockwise(quantized, state)
    assert (restored - data).abs().max() < data.abs().max() / 200


# --------------------------------------------------------------------------- QuantState


def _state(nested: bool, quant_type: str = "nf4") -> tuple[torch.Tensor, QuantState]:
    return F4.quantize_4bit(
        torch.randn(40, 50, dtype=torch.bfloat16), quant_type=quant_type, compress_statistics=nested
    )


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_as_dict_unpacked_keys_and_values(nested):
    _, state = _state(nested)
    entries = state.as_dict()
    expected = ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
    if nested:
        expected += ["nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"]
    assert list(entries) == expected
    assert entries["dtype"] == "bfloat16" and entries["shape"] == (40, 50) and entries["quant_map"] is state.code
    if nested:
        assert entries["nested_dtype"] == "float32" and entries["nested_blocksize"] == 256
        assert isinstance(entries["nested_offset"], float)
        assert torch.equal(entries["nested_quant_map"], state.state2.code)
        assert entries["nested_quant_map"].data_ptr() != state.state2.code.data_ptr()


def test_each_state_owns_its_code_table():
    """States never share their map (safetensors refuses shared tensors), and changing one state's
    map in place changes neither another state nor later quantization."""
    weight = torch.randn(40, 64)
    packed, first = F4.quantize_4bit(weight, quant_type="nf4")
    _, second = F4.quantize_4bit(weight, quant_type="nf4")
    assert first.code.data_ptr() != second.code.data_ptr()
    first.code.zero_()
    assert torch.equal(second.code, get_4bit_type("nf4"))
    again, _ = F4.quantize_4bit(weight, quant_type="nf4")
    assert torch.equal(again, packed)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_packed_holds_tensors_and_json(nested, quant_type):
    _, state = _state(nested, quant_type)
    entries = state.as_dict(packed=True)
    assert all(isinstance(value, torch.Tensor) for value in entries.values())
    blob = entries[f"quant_state.bitsandbytes__{quant_type}"]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    decoded = json.loads(bytes(blob.tolist()))
    assert decoded["quant_type"] == quant_type and decoded["shape"] == [40, 50]
    assert decoded["blocksize"] == 64 and decoded["dtype"] == "bfloat16"
    assert ("nested_offset" in decoded) == nested
    assert getattr(state, f"bitsandbytes__{quant_type}").tolist() == blob.tolist()
    with pytest.raises(AttributeError):
        _ = state.bitsandbytes__int4


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("prefix", ["", "model.layer.weight."])
def test_from_dict_round_trip(nested, packed, prefix):
    data, state = _state(nested)
    entries = {prefix + key: value for key, value in state.as_dict(packed=packed).items()}
    snapshot = dict(entries)
    restored = QuantState.from_dict(entries, device="cpu")
    assert entries == snapshot  # not modified
    assert restored == state
    assert torch.equal(F4.dequantize_4bit(data, restored), F4.dequantize_4bit(data, state))


def test_equality_compares_every_field():
    _, state = _state(True)
    same = QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert same == state
    for change in (
        lambda s: setattr(s, "blocksize", 128),
        lambda s: setattr(s, "quant_type", "fp4"),
        lambda s: setattr(s, "dtype", torch.float16),
        lambda s: setattr(s, "shape", torch.Size([50, 40])),
        lambda s: setattr(s, "offset", s.offset + 1),
        lambda s: setattr(s.state2, "absmax", s.state2.absmax * 2),
        lambda s: setattr(s, "state2", None),
    ):
        other = copy.deepcopy(state)
        change(other)
        assert other != state
    assert state != "not a state"


def test_to_moves_everything_and_legacy_indexing():
    _, state = _state(True)
    assert state.to("cpu") is state
    assert state.to("meta").absmax.device.type == "meta"
    assert state.code.device.type == "meta" and state.offset.device.type == "meta"
    assert state.state2.absmax.device.type == "meta" and state.state2.code.device.type == "meta"
    assert state[1] == torch.Size([40, 50]) and state[3] == 64 and state[5] == "nf4"
    assert state[4][1] is state.state2


def test_pickle_round_trip_of_a_state():
    _, state = _state(True)
    assert pickle.loads(pickle.dumps(state)) == state


# --------------------------------------------------------------------------- gemv


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gemv_matches_linear_with_the_dequantized_weight(dtype, nested):
    weight = torch.randn(96, 128, dtype=dtype)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
    x = torch.randn(1, 1, 128, dtype=dtype)
    out = F4.gemv_4bit(x, packed.t(), state=state)
    assert out.shape == (1, 1, 96) and out.dtype == dtype
    # the same decoded weights, summed in float32 in another order than torch's GEMM
    expected = F.linear(x, F4.dequantize_4bit(packed, state))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    buffer = torch.empty(1, 1, 96, dtype=dtype)
    assert F4.gemv_4bit(x, packed.t(), out=buffer, state=state) is buffer
    assert torch.equal(buffer, out)


def test_gemv_needs_a_state():
    with pytest.raises(ValueError, match="state cannot be None"):
        F4.gemv_4bit(torch.randn(1, 8), torch.zeros(4, 1, dtype=torch.uint8))
