"""The plain-PyTorch reference kernels: packing, rounding, ties, special values, products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, describe_dtype, nibbles

from fourbit.formats import NestedStatistics, create_dynamic_map, get_4bit_type
from fourbit.kernels import reference

NF4 = get_4bit_type("nf4")
FP4 = get_4bit_type("fp4")


def test_pack_order_high_nibble_first():
    # The table itself (absmax 1.0) quantizes to indices 0..15 in order.
    packed, absmax = reference.quantize_4bit(NF4.clone(), NF4, 64, torch.uint8)
    assert absmax.tolist() == [1.0]
    assert packed.shape == (8, 1) and packed.dtype == torch.uint8
    assert packed.flatten().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]


def test_fp4_values_map_back_to_their_bit_patterns():
    packed, _ = reference.quantize_4bit(FP4.clone(), FP4, 64, torch.uint8)
    indices = nibbles(packed, 16).tolist()
    # -0.0 equals +0.0 and takes the first zero in sorted order, which is the +0 entry (index 0)
    assert indices == [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("code", [NF4, FP4], ids=["nf4", "fp4"])
def test_a_value_exactly_on_a_midpoint_takes_the_lower_code(code):
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    data = torch.cat([torch.tensor([1.0]), midpoints])
    packed, _ = reference.quantize_4bit(data, code, 64, torch.uint8)
    got = nibbles(packed, data.numel())[1:]
    assert torch.equal(got, order[:-1])


def test_odd_count_is_padded_with_the_code_of_zero():
    for code, zero_index in ((NF4, 7), (FP4, 0)):
        packed, _ = reference.quantize_4bit(torch.tensor([1.0, -1.0, 0.5]), code, 64, torch.uint8)
        assert packed.shape == (2, 1)
        assert int(packed[-1]) & 0x0F == zero_index


def test_zero_blocks_give_zero_absmax_and_exact_zeros_back():
    data = torch.cat([torch.zeros(64), torch.randn(64), torch.zeros(10)])
    packed, absmax = reference.quantize_4bit(data, NF4, 64, torch.uint8)
    assert absmax[0] == 0
    # bitsandbytes clamps a short last block's absmax to 1e-38 and stores the clamped value
    assert absmax[2] == torch.tensor(1e-38, dtype=torch.float32)
    out = reference.dequantize_4bit(packed, absmax, NF4, 64, (138,), torch.float32)
    assert not out.isnan().any()
    assert torch.equal(out[:64], torch.zeros(64)) and torch.equal(out[128:], torch.zeros(10))


def test_zero_codes_decode_to_positive_zero():
    data = torch.tensor([1.0, 0.001, -0.001, 0.0])  # 0.001 lands on FP4's "-0" entry
    packed, absmax = reference.quantize_4bit(data, FP4, 64, torch.uint8)
    assert 8 in nibbles(packed, 4).tolist()
    out = reference.dequantize_4bit(packed, absmax, FP4, 64, (4,), torch.float32)
    assert not torch.signbit(out[1:]).any()


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float32], ids=describe_dtype)
def test_quant_storage_is_a_view_of_the_same_bytes(storage):
    data = torch.randn(256)
    as_bytes, _ = reference.quantize_4bit(data, NF4, 64, torch.uint8)
    viewed, _ = reference.quantize_4bit(data, NF4, 64, storage)
    assert viewed.dtype == storage and viewed.shape == (128 // viewed.element_size(), 1)
    assert torch.equal(viewed.view(torch.uint8).flatten(), as_bytes.flatten())


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_dequantize_is_code_times_absmax_rounded_once(dtype):
    data = torch.randn(3, 100).to(dtype)
    packed, absmax = reference.quantize_4bit(data, NF4, 64, torch.uint8)
    out = reference.dequantize_4bit(packed, absmax, NF4, 64, (3, 100), dtype)
    index = nibbles(packed, 300)
    block = torch.arange(300) // 64
    expected = (NF4[index] * absmax[block]).to(dtype).view(3, 100)
    assert torch.equal(out, expected)


def test_blockwise_picks_the_nearest_code_up_to_the_grid_step():
    code = create_dynamic_map()
    data = torch.randn(5000) * 7
    quantized, absmax = reference.quantize_blockwise(data, code, 256)
    normed = data / absmax.repeat_interleave(256)[:5000]
    chosen = (code[quantized.long()] - normed).abs()
    best = (code.view(1, -1) - normed.view(-1, 1)).abs().min(dim=1).values
    assert torch.all(chosen <= best + 2 / 65535)
    assert (chosen == best).float().mean() > 0.99


def test_blockwise_special_values_follow_bitsandbytes():
    code = create_dynamic_map()
    quantized, absmax = reference.quantize_blockwise(torch.zeros(10), code, 64)
    assert absmax.tolist() == [0.0] and quantized.tolist() == [0] * 10
    data = torch.tensor([1.0, float("nan"), 0.5])
    quantized, absmax = reference.quantize_blockwise(data, code, 64)
    assert absmax.tolist() == [1.0]  # NaN is ignored by the block maximum ...
    assert quantized[1] == 0  # ... and encodes as 0
    assert quantized[0] == 255  # 1.0 is the last code


def test_blockwise_round_trip():
    code = create_dynamic_map()
    data = torch.randn(3, 1000)
    quantized, absmax = reference.quantize_blockwise(data, code, 128)
    assert quantized.shape == data.shape and quantized.dtype == torch.uint8
    out = reference.dequantize_blockwise(quantized, absmax, code, 128, torch.float32)
    assert (out - data).abs().max() < 0.05 * data.abs().max()


def test_nested_absmax_is_decoded_then_offset():
    absmax = torch.rand(1000) + 0.5
    offset = absmax.mean()
    code = create_dynamic_map()
    quantized, scale = reference.quantize_blockwise(absmax - offset, code, 256)
    resolved = reference.resolve_absmax(quantized, NestedStatistics(scale, code, offset, 256))
    expected = reference.dequantize_blockwise(quantized, scale, code, 256, torch.float32) + offset
    assert torch.equal(resolved, expected)
    assert (resolved - absmax).abs().max() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_linear_is_dequantize_then_linear(dtype):
    weight = torch.randn(24, 80)
    packed, absmax = reference.quantize_4bit(weight, NF4, 64, torch.uint8)
    x = torch.randn(2, 3, 80).to(dtype)
    bias = torch.randn(24).to(dtype)
    out = reference.linear_4bit(x, packed, absmax, NF4, 64, (24, 80), bias)
    dense = reference.dequantize_4bit(packed, absmax, NF4, 64, (24, 80), dtype)
    assert torch.equal(out, F.linear(x, dense, bias))
