"""Bad input gets a clear, typed error naming the problem, before any kernel runs, and the
caller's tensors are left as they were."""

from __future__ import annotations

import pytest
import torch

import fourbit
import fourbit.functional as F4
from fourbit.functional import QuantState
from fourbit.kernels import reference

KERNELS = ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "linear_4bit"]


@pytest.fixture
def no_kernel(monkeypatch):
    """Make every reference kernel fail loudly, so a test proves the error came first."""

    def reached(*args, **kwargs):
        raise AssertionError("a kernel was reached with invalid arguments")

    for name in KERNELS:
        monkeypatch.setattr(reference, name, reached)


@pytest.fixture
def weight():
    packed, state = F4.quantize_4bit(torch.randn(16, 64), quant_type="nf4", compress_statistics=True)
    return packed, state


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool, torch.uint8, torch.int8])
def test_unsupported_input_dtype(no_kernel, dtype):
    data = torch.zeros(64, dtype=dtype)
    with pytest.raises(ValueError, match=f"dtype {str(dtype).removeprefix('torch.')}; 4-bit quantization supports"):
        F4.quantize_4bit(data)
    with pytest.raises(ValueError, match="8-bit blockwise quantization supports float16, bfloat16, float32"):
        F4.quantize_blockwise(data)


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 100, 8192, 64.0, "64", True])
def test_blocksize_not_allowed(no_kernel, blocksize):
    with pytest.raises(ValueError, match=r"blocksize=.* is not supported; allowed: 32, 64, 128"):
        F4.quantize_4bit(torch.randn(64), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int4", "NF4", "af4", None, 4])
def test_unknown_quant_type(no_kernel, quant_type):
    with pytest.raises(ValueError, match=r"quant_type=.* is not supported; allowed: 'nf4', 'fp4'"):
        F4.quantize_4bit(torch.randn(64), quant_type=quant_type)


@pytest.mark.parametrize("storage", [torch.int32, torch.float64, torch.int8, "uint8"])
def test_quant_storage_not_allowed(no_kernel, storage):
    with pytest.raises(
        ValueError, match=r"quant_storage=.* is not supported; allowed: uint8, float16, bfloat16, float32"
    ):
        F4.quantize_4bit(torch.randn(64), quant_storage=storage)


def test_quant_storage_that_does_not_divide_the_bytes(no_kernel):
    with pytest.raises(ValueError, match=r"10 elements pack into 5 bytes.*float32"):
        F4.quantize_4bit(torch.randn(10), quant_storage=torch.float32)


def test_not_a_tensor(no_kernel):
    with pytest.raises(TypeError, match=r"A must be a torch\.Tensor, got list"):
        F4.quantize_4bit([1.0, 2.0])


def test_prepared_product_and_dict_packing_name_a_wrong_argument(weight, no_kernel):
    packed, _ = weight
    with pytest.raises(TypeError, match="quant_state must be a QuantState, got NoneType"):
        F4.prepared_product(packed, None)
    with pytest.raises(TypeError, match="quant_state must be a QuantState, got dict"):
        F4.prepared_product(packed, {"absmax": None})
    with pytest.raises(TypeError, match="pack_dict_to_tensor takes a dict, got list"):
        F4.pack_dict_to_tensor([("quant_type", "nf4")])


def test_state_shape_does_not_match_the_packed_data(weight, no_kernel):
    packed, state = weight
    state.shape = torch.Size([16, 66])
    with pytest.raises(ValueError, match=r"packed data holds 512 bytes but quant_state.shape=\(16, 66\)"):
        F4.dequantize_4bit(packed, state)
    with pytest.raises(ValueError, match="packed data holds 511 bytes"):
        F4.dequantize_4bit(packed[:-1], weight[1])


def test_state_with_wrong_absmax_or_settings(weight, no_kernel):
    packed, state = weight
    broken = QuantState.from_dict(state.as_dict(packed=True), "cpu")
    broken.absmax = broken.absmax[:-1]
    with pytest.raises(ValueError, match="absmax must have 16 entries"):
        F4.dequantize_4bit(packed, broken)
    for field, value, message in (
        ("quant_type", "nf5", "quant_type='nf5'"),
        ("blocksize", 96, "blocksize=96"),
        ("dtype", torch.int8, "dtype=torch.int8"),
    ):
        broken = QuantState.from_dict(state.as_dict(packed=True), "cpu")
        setattr(broken, field, value)
        with pytest.raises(ValueError, match=message):
            F4.dequantize_4bit(packed, broken)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        F4.dequantize_4bit(packed, {"absmax": state.absmax})


def test_state_on_another_device(weight, no_kernel):
    packed, state = weight
    with pytest.raises(ValueError, match="quant_state is on meta but the packed data is on cpu"):
        F4.dequantize_4bit(packed, QuantState.from_dict(state.as_dict(packed=True), "meta"))


@pytest.fixture
def weight3d():
    return F4.quantize_4bit(torch.randn(2, 8, 64))


def test_matmul_input_of_the_wrong_width_or_dtype(weight, weight3d, no_kernel):
    packed, state = weight
    with pytest.raises(ValueError, match="last dimension 63 but the 4-bit weight \\(16, 64\\) expects in_features=64"):
        fourbit.matmul_4bit(torch.randn(2, 63), packed.t(), state)
    with pytest.raises(ValueError, match="A is a 0-d tensor; a product with the 4-bit weight \\(16, 64\\) needs"):
        fourbit.matmul_4bit(torch.tensor(1.0), packed.t(), state)
    with pytest.raises(ValueError, match="dtype int64"):
        fourbit.matmul_4bit(torch.ones(2, 64, dtype=torch.long), packed.t(), state)
    with pytest.raises(ValueError, match="bias must have shape \\(16,\\)"):
        fourbit.matmul_4bit(torch.randn(2, 64), packed.t(), state, bias=torch.zeros(15))
    packed3, state3 = weight3d
    with pytest.raises(ValueError, match="must be 2-D"):
        fourbit.matmul_4bit(torch.randn(2, 64), packed3.t(), state3)


def test_blockwise_bad_arguments(no_kernel):
    with pytest.raises(ValueError, match="A must be uint8"):
        F4.dequantize_blockwise(torch.randn(10), absmax=torch.ones(1))
    with pytest.raises(ValueError, match="requires either quant_state or absmax"):
        F4.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax has 1 entries but 5000 codes in blocks of 4096 need 2"):
        F4.dequantize_blockwise(torch.zeros(5000, dtype=torch.uint8), absmax=torch.ones(1))
    with pytest.raises(ValueError, match="code must be a 1-D floating tensor"):
        F4.quantize_blockwise(torch.randn(10), code=torch.zeros(3, 3))
    table = F4.create_dynamic_map()
    for unsorted in (table.flip(0), torch.tensor([0.0, float("nan"), 1.0])):
        with pytest.raises(ValueError, match="code must be sorted in ascending order, without NaN"):
            F4.quantize_blockwise(torch.randn(10), code=unsorted)
    # a decode only looks entries up: any order serves it, and the quantizer takes the table sorted
    codes, state = F4.quantize_blockwise(torch.randn(10), code=table)
    reordered = table.flip(0)
    torch.testing.assert_close(
        F4.dequantize_blockwise(255 - codes, absmax=state.absmax, code=reordered, blocksize=state.blocksize),
        F4.dequantize_blockwise(codes, state),
    )
    with pytest.raises(ValueError, match="out must be a uint8 tensor of shape \\(10,\\)"):
        F4.quantize_blockwise(torch.randn(10), out=torch.empty(11, dtype=torch.uint8))


# --------------------------------------------------------------------------- corrupt dicts


@pytest.fixture
def packed_dict(weight):
    return {f"weight.{key}": value for key, value in weight[1].as_dict(packed=True).items()}


def test_from_dict_with_neither_form(packed_dict):
    with pytest.raises(ValueError, match=r"found neither; keys: \['weight\.absmax'"):
        QuantState.from_dict({"weight.absmax": packed_dict["weight.absmax"]}, "cpu")


def test_from_dict_with_two_packed_entries(packed_dict):
    extra = dict(packed_dict)
    extra["other.quant_state.bitsandbytes__fp4"] = packed_dict["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="exactly one packed quant_state entry"):
        QuantState.from_dict(extra, "cpu")


def test_from_dict_with_an_unknown_packed_entry(packed_dict):
    renamed = dict(packed_dict)
    renamed["weight.quant_state.bitsandbytes__int4"] = renamed.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match=r"unknown packed quant_state entry 'weight\.quant_state\.bitsandbytes__int4'"):
        QuantState.from_dict(renamed, "cpu")


def test_from_dict_with_unknown_keys(packed_dict):
    with pytest.raises(ValueError, match="unknown quant_state entries \\['scales'\\]"):
        QuantState.from_dict({**packed_dict, "weight.scales": torch.ones(1)}, "cpu")


@pytest.mark.parametrize("payload", [b"\xff\xfe not utf8", b'{"quant_type": "nf4", ', b"[1, 2, 3]"])
def test_from_dict_with_garbled_json(packed_dict, payload):
    garbled = dict(packed_dict)
    garbled["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(payload), dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed quant_state"):
        QuantState.from_dict(garbled, "cpu")


def test_from_dict_with_a_packed_entry_of_the_wrong_dtype(packed_dict):
    garbled = dict(packed_dict)
    garbled["weight.quant_state.bitsandbytes__nf4"] = torch.zeros(3)
    with pytest.raises(ValueError, match="1-D uint8 tensor of JSON bytes"):
        QuantState.from_dict(garbled, "cpu")


@pytest.mark.parametrize("missing", ["weight.absmax", "weight.quant_map", "weight.nested_absmax"])
def test_from_dict_with_missing_entries(packed_dict, missing):
    incomplete = dict(packed_dict)
    del incomplete[missing]
    with pytest.raises(ValueError, match=missing.split(".")[-1]):
        QuantState.from_dict(incomplete, "cpu")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("blocksize", "64", "'blocksize' must be an integer"),
        ("blocksize", 96, "blocksize=96 is not supported"),
        ("shape", [16, -1], "'shape' must be a list of non-negative integers"),
        ("shape", [16, 65], r"absmax must have 17 entries \(one per block of 64\), got 16"),
        ("dtype", "float64", "dtype=torch.float64 is not supported"),
        ("dtype", "float128", "'dtype' must name a torch dtype"),
        ("quant_type", "nf5", "'quant_type' must be one of"),
        ("nested_offset", "zero", "'nested_offset' must be a number"),
    ],
)
def test_from_dict_with_wrong_types(weight, key, value, message):
    entries = weight[1].as_dict()
    entries[key] = value
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(entries, "cpu")


def test_from_dict_with_a_non_tensor_absmax(weight):
    entries = weight[1].as_dict()
    entries["absmax"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="'absmax' must be a tensor, got list"):
        QuantState.from_dict(entries, "cpu")
    with pytest.raises(TypeError, match="qs_dict must be a mapping"):
        QuantState.from_dict([("absmax", 1)], "cpu")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: setattr(s, "absmax", s.absmax[:-1]), r"absmax must have 16 entries \(one per block of 64\)"),
        (lambda s: setattr(s.state2, "absmax", torch.ones(2)), "state2.absmax must have 1 entries"),
        (lambda s: setattr(s, "absmax", s.absmax.float()), "nested but lacks uint8 absmax codes"),
        (lambda s: setattr(s, "blocksize", 48), "blocksize=48 is not supported"),
    ],
)
def test_one_validation_serves_dicts_and_operations(weight, no_kernel, corrupt, message):
    """``QuantState.validate`` is the one check: a state read by ``from_dict`` and a state handed to
    an operation fail alike, before any kernel runs."""
    packed, state = weight
    corrupt(state)
    with pytest.raises(ValueError, match=message):
        state.validate()
    with pytest.raises(ValueError, match=message):
        F4.check_4bit_state(packed, state)
    with pytest.raises(ValueError, match=message):
        F4.dequantize_4bit(packed, state)
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(state.as_dict(), "cpu")


@pytest.mark.parametrize("missing", ["nested_code", "nested_offset", "nested_absmax"])
def test_an_op_given_part_of_the_nested_statistics_names_what_is_missing(missing):
    """The raw ops take nested statistics as three tensors that come together: a call with one left
    out is refused by name, on every device's kernel, before anything reads it."""
    packed, state = F4.quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)
    arguments = F4.op_arguments(state, packed.device)
    arguments[missing] = None
    with pytest.raises(ValueError, match=f"together; \\['{missing}'\\] missing"):
        torch.ops.fourbit.linear_4bit(torch.randn(2, 64), packed, blocksize=64, shape=[64, 64], **arguments)
    with pytest.raises(ValueError, match=f"\\['{missing}'\\] missing"):
        torch.ops.fourbit.dequantize_4bit(packed, blocksize=64, shape=[64, 64], dtype=torch.float32, **arguments)
    with pytest.raises(ValueError, match=f"\\['{missing}'\\] missing"):
        reference.dequantize_4bit(packed, blocksize=64, shape=[64, 64], dtype=torch.float32, **arguments)
