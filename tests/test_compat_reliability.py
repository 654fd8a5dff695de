"""bitsandbytes' 8-bit behaviours, and faults at the door: clear errors, nothing half-changed."""

from __future__ import annotations

import pytest
import torch

import fourbit
import fourbit.functional as F4
from fourbit import checkpoint
from fourbit.kernels import reference
from fourbit.quant_state import MAX_PACKED_STATE_BYTES

# --------------------------------------------------------------------------- 8-bit blockwise


def test_an_8bit_blockwise_state_round_trips_through_as_dict():
    A = torch.randn(1000)
    codes, state = F4.quantize_blockwise(A)
    assert state.as_dict()["quant_type"] is None
    restored = F4.QuantState.from_dict(state.as_dict(), device="cpu")
    assert restored == state and restored.shape is None
    assert torch.equal(F4.dequantize_blockwise(codes, restored), F4.dequantize_blockwise(codes, state))


def test_a_nested_8bit_state_without_its_shape_is_refused():
    A = torch.randn(1000)
    _, state = F4.quantize_blockwise(A, nested=True)
    entries = state.as_dict()
    with pytest.raises(ValueError, match="'shape'"):
        F4.QuantState.from_dict(entries, device="cpu")


@pytest.mark.parametrize("blocksize", [16384, 100, 7, 1])
def test_8bit_blockwise_takes_any_positive_block_size(blocksize):
    A = torch.randn(128)
    codes, state = F4.quantize_blockwise(A, blocksize=blocksize)
    expected_codes, expected_absmax = reference.quantize_blockwise(A, F4.create_dynamic_map(), blocksize)
    assert torch.equal(codes, expected_codes) and torch.equal(state.absmax, expected_absmax)
    restored = F4.dequantize_blockwise(codes, state)
    assert (restored - A).abs().max() <= A.abs().max() * 0.02


@pytest.mark.parametrize("blocksize", [0, -64, 64.0, True])
def test_8bit_blockwise_refuses_block_sizes_that_are_not_positive_integers(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        F4.quantize_blockwise(torch.randn(64), blocksize=blocksize)


def test_fp8_maps_are_sorted_normalized_256_entry_tables():
    for signed, exponent, precision, total in [(True, 5, 2, 8), (True, 4, 3, 8), (False, 4, 4, 8), (True, 2, 1, 4)]:
        code = F4.create_fp8_map(signed, exponent, precision, total)
        assert code.shape == (256,) and code.dtype == torch.float32
        assert torch.equal(code, code.sort().values) and code.max() == 1
        assert (code < 0).any() == signed
    # e4m3 without sign handling: 1.75 * 2**8 is the largest magnitude, 2**-8 * 1/8 the smallest step
    code = F4.create_fp8_map(True, 4, 3, 8)
    assert code[code > 0].min() == pytest.approx((1 / 8) * 2.0**-8 / (1.875 * 2.0**8))
    with pytest.raises(ValueError, match="total_bits"):
        F4.create_fp8_map(True, 4, 4, 8)


def test_the_normal_map_is_what_nf4_is_built_from():
    """Its 15 non-zero quantiles, with NF4's zero, are NF4's table exactly; without the extra
    value there are 14, symmetric; both maps are sorted, normalized and 256 entries long."""
    code = F4.create_normal_map()
    assert code.shape == (256,) and code.dtype == torch.float32 and torch.equal(code, code.sort().values)
    quantiles = code[code != 0]
    assert code.max() == 1 and quantiles.numel() == 15
    assert torch.equal(torch.cat([quantiles[:7], torch.zeros(1), quantiles[7:]]), F4.get_4bit_type("nf4"))
    symmetric = F4.create_normal_map(use_extra_value=False)
    assert symmetric[symmetric != 0].numel() == 14 and torch.equal(symmetric, -symmetric.flip(0))
    with pytest.raises(ValueError, match=r"offset must lie between 0\.5 and 1"):
        F4.create_normal_map(offset=0.4)


def test_linear_maps_are_evenly_spaced_with_zero_on_the_grid():
    code = F4.create_linear_map()  # signed, 8 bits, zero added: 255 values from -1 to 1 and one 0
    assert code.shape == (256,) and code.min() == -1 and code.max() == 1 and (code.abs() < 1e-6).sum() == 2
    four = F4.create_linear_map(signed=True, total_bits=4)  # 15 values from -1 to 1, zeros between
    assert torch.equal(torch.cat([four[:7], four[-8:]]), torch.linspace(-1, 1, 15))
    assert not four[7:-8].any()
    unsigned = F4.create_linear_map(signed=False, total_bits=8)
    assert torch.equal(unsigned, torch.linspace(0, 1, 256))
    codes, state = F4.quantize_blockwise(torch.rand(512), code=unsigned, blocksize=256)
    assert (F4.dequantize_blockwise(codes, state) >= 0).all()
    with pytest.raises(ValueError, match="total_bits must be a whole number from 1 to 8"):
        F4.create_linear_map(total_bits=9)


def test_an_fp8_map_quantizes_through_quantize_blockwise():
    A = torch.randn(4096)
    code = F4.create_fp8_map()
    codes, state = F4.quantize_blockwise(A, code=code, blocksize=256)
    assert torch.equal(state.code, code)
    # e5m2: two mantissa bits, so each value within an eighth of itself (plus the smallest step)
    error = (F4.dequantize_blockwise(codes, state) - A).abs()
    assert (error <= 0.125 * A.abs() + 1e-3).all()


def test_codes_beyond_a_short_code_table_are_named():
    code = torch.linspace(-1, 1, 16)
    codes = torch.tensor([0, 3, 200], dtype=torch.uint8)
    with pytest.raises(ValueError, match="code 200, beyond the 16-entry code table"):
        F4.dequantize_blockwise(codes, absmax=torch.ones(1), code=code, blocksize=64)


# --------------------------------------------------------------------------- QuantState entries


def test_a_multi_element_nested_offset_is_named():
    _, state = F4.quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    entries = state.as_dict()
    entries["nested_offset"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="'nested_offset' must be one number"):
        F4.QuantState.from_dict(entries, device="cpu")


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_non_contiguous_2d_absmax_with_the_right_count_is_read_in_order(native, monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_NATIVE", native)
    packed, state = F4.quantize_4bit(torch.randn(64, 128), compress_statistics=False)
    expected = F4.dequantize_4bit(packed, state)
    state.absmax = state.absmax.reshape(64, 2).t().contiguous().t()  # same logical order, strided
    assert not state.absmax.is_contiguous()
    assert torch.equal(F4.dequantize_4bit(packed, state), expected)


def test_an_oversized_packed_state_is_refused_before_it_is_decoded():
    blob = torch.zeros(MAX_PACKED_STATE_BYTES + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed quant_state holds"):
        F4.unpack_tensor_to_dict(blob)
    assert F4.unpack_tensor_to_dict(F4.pack_dict_to_tensor({"a": [1, 2]})) == {"a": [1, 2]}


# --------------------------------------------------------------------------- Linear4bit loading


def _layer(out_features: int = 32, seed: int = 0) -> fourbit.nn.Linear4bit:
    torch.manual_seed(seed)
    return fourbit.nn.Linear4bit(64, out_features).to("cpu")


def test_a_rejected_load_leaves_the_layer_unchanged():
    layer, wrong = _layer(32), _layer(16, seed=1)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"checkpoint weight has shape \(16, 64\)"):
        layer.load_state_dict(wrong.state_dict())
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert layer.quant_state is layer.weight.quant_state


@pytest.mark.parametrize("entry", [None, [1, 2], "weights"])
def test_a_weight_entry_that_is_not_a_tensor_is_named(entry):
    layer = _layer()
    state_dict = dict(layer.state_dict())
    state_dict["weight"] = entry
    with pytest.raises(RuntimeError, match="the weight entry must be a tensor"):
        layer.load_state_dict(state_dict)


def test_a_loaded_layer_does_not_share_tensors_with_the_dict():
    layer = _layer()
    state_dict = _layer(seed=1).state_dict()
    layer.load_state_dict(state_dict)
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = layer(x)
        for value in state_dict.values():
            value.zero_()
        assert torch.equal(layer(x), expected)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.complex64])
def test_checkpoints_hold_every_dtype_safetensors_and_torch_share(tmp_path, dtype):
    from safetensors.torch import load_file

    tensor = torch.arange(6).to(dtype)
    path = tmp_path / "model.safetensors"
    checkpoint.save_state_dict({"t": tensor}, path)
    loaded = load_file(str(path))["t"]
    assert loaded.dtype == dtype and torch.equal(loaded.view(torch.uint8), tensor.view(torch.uint8))


def test_a_tensor_named_like_the_metadata_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="'__metadata__' is reserved"):
        checkpoint.save_state_dict({"__metadata__": torch.zeros(1)}, path)
    assert not path.exists()


# --------------------------------------------------------------------------- orientation, parametrize, convert


def test_a_weight_quantized_as_k_by_n_still_multiplies_with_a_deprecation_warning():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)  # (in, out): quantized the wrong way round
    packed, state = F4.quantize_4bit(weight)
    A = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(32)
    with pytest.warns(DeprecationWarning, match="Re-quantize from the weight"):
        out = fourbit.matmul_4bit(A, packed.t(), state, bias=bias)
    expected = A.detach() @ F4.dequantize_4bit(packed, state) + bias
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    assert A.grad is not None and A.grad.shape == A.shape
    with pytest.raises(ValueError, match="expects in_features=32"):
        fourbit.matmul_4bit(torch.randn(3, 50), packed.t(), state)


def test_a_parametrized_checkpoint_of_another_shape_is_refused():
    from fourbit.nn.parametrize import load_state_dict_4bit, replace_parameter_4bit

    source = torch.nn.Linear(16, 16)
    replace_parameter_4bit(source, "weight")
    fresh = torch.nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"size mismatch for 'weight'.*\(16, 16\).*\(8, 16\)"):
        load_state_dict_4bit(fresh, source.state_dict())
    assert fresh.weight.shape == (8, 16)
    parametrized = torch.nn.Linear(16, 8)
    replace_parameter_4bit(parametrized, "weight")
    with pytest.raises(ValueError, match="size mismatch"):
        parametrized.load_state_dict(source.state_dict())
    assert parametrized.weight.shape == (8, 16)


def test_quantize_model_skips_layers_it_cannot_quantize_and_says_why():
    from fourbit import convert

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8))
    report = convert.quantize_model(model)
    assert report.converted == ["0", "2"]
    assert "float64" in report.skipped["1"]
    assert type(model[1]) is torch.nn.Linear and model[1].weight.dtype == torch.float64


def test_an_unquantized_params4bit_splits_and_its_shard_fails_clearly_at_the_first_forward():
    from fourbit.nn import Linear4bit, Params4bit

    param = Params4bit(torch.randn(8, 4), quant_type="fp4", blocksize=32)
    pieces = torch.chunk(param, 2) + torch.split(param, 3)
    assert all(
        isinstance(piece, Params4bit) and piece.quant_type == "fp4" and piece.blocksize == 32 for piece in pieces
    )
    assert not any(piece.bnb_quantized for piece in pieces)
    layer = Linear4bit(4, 8, quant_type="nf4")
    layer.weight = torch.nn.Parameter(layer.weight.data.chunk(2)[0], requires_grad=False)  # a float shard
    with pytest.raises(RuntimeError, match="sharded before it was quantized"):
        layer(torch.randn(1, 4))


def test_a_params4bit_assigned_as_the_weight_records_its_state_on_the_layer():
    from fourbit.nn import Linear4bit, Params4bit

    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    layer = Linear4bit(64, 32, quant_type="nf4")
    layer.weight = Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    # FSDP2 replaces the weight by a shard and then computes with the layer's copy of the state
    assert layer.quant_state is not None and layer.quant_state is layer.weight.quant_state
    assert layer.quant_storage == layer.weight.quant_storage
    packed = layer.weight.data
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)  # what a gathered shard looks like
    x = torch.randn(2, 64)
    expected = x @ F4.dequantize_4bit(packed, layer.quant_state).t() + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_quantize_model_names_layers_that_already_hold_4bit_weights():
    from fourbit import convert
    from fourbit.nn import Params4bit

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32))
    packed = Params4bit(model[1].weight.data, requires_grad=False).to("cpu")
    model[1].weight = packed  # a plain Linear holding a quantized parameter
    report = convert.quantize_model(model)
    assert report.converted == ["0"] and report.skipped["1"] == "already holds a 4-bit weight"


def test_a_failed_move_to_meta_leaves_the_layer_working():
    """``Module.to("meta")`` cannot wrap a 4-bit weight in a ``Parameter`` (as in bitsandbytes);
    the layer's QuantState must not have gone to the meta device on the way. The parameter's own
    move gives a meta copy of the state."""
    layer = fourbit.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64)
    expected = layer(x)
    state = layer.weight.quant_state
    with pytest.raises(RuntimeError, match="Parameter"):
        layer.to("meta")
    assert layer.weight.quant_state is state and state.absmax.device.type == "cpu"
    assert state.state2.absmax.device.type == "cpu"
    assert torch.equal(layer(x), expected)
    moved = layer.weight.to("meta")
    assert moved.device.type == "meta" and moved.quant_state is not state
    assert moved.quant_state.absmax.device.type == "meta" and moved.quant_state.state2.absmax.device.type == "meta"
    assert moved.quant_state.shape == state.shape and state.absmax.device.type == "cpu"
    assert torch.equal(layer(x), expected)
