"""The compiled CPU fast path (fourbit.kernels.cpu): bit-identical with the reference, compiled
once per dtype (no recompilation for new batch sizes), and a clean fallback to the reference."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from helpers import DTYPES, assert_same_bits, describe_dtype

import fourbit
import fourbit.functional as F4
from fourbit.kernels import reference
from fourbit.kernels.cpu import compiled as cpu


@pytest.fixture
def small_tensors_compile(monkeypatch):
    """Let small test tensors take the compiled path (it is shape-independent)."""
    if not cpu.SUPPORTED:
        pytest.skip(f"the compiled CPU path needs torch 2.6 or newer (torch {torch.__version__} runs the reference)")
    monkeypatch.setenv("FOURBIT_CPU_NATIVE", "0")  # this file tests the compiled path the native one precedes
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    monkeypatch.setattr(cpu, "_failed", False)
    monkeypatch.setattr(cpu, "_succeeded", set())
    monkeypatch.setattr(cpu, "_warned", set())


def _weights(dtype: torch.dtype, shape=(96, 256)) -> torch.Tensor:
    data = (torch.randn(shape) * 2).to(dtype)
    flat = data.view(-1)
    flat[::13] = 0
    flat[:64] = 0  # a zero block
    flat[100] = float("nan")
    flat[-3] = float("-inf")
    return data


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_compiled_quantize_and_dequantize_are_bit_identical(small_tensors_compile, dtype, quant_type):
    code = F4.get_4bit_type(quant_type)
    for blocksize in (32, 64, 256):
        data = _weights(dtype)
        expected_packed, expected_absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
        packed, absmax = cpu.quantize_4bit(data, code, blocksize, torch.uint8)
        assert torch.equal(packed, expected_packed), blocksize
        assert_same_bits(absmax, expected_absmax)
        expected = reference.dequantize_4bit(packed, absmax, code, blocksize, data.shape, dtype)
        assert_same_bits(cpu.dequantize_4bit(packed, absmax, code, blocksize, data.shape, dtype), expected)
    assert cpu.compile_enabled()


def test_compiled_path_through_the_public_api(small_tensors_compile, monkeypatch):
    """quantize_4bit / dequantize_4bit / matmul_4bit on CPU tensors run it, nested statistics included."""
    calls = []
    run = cpu._run_compiled
    monkeypatch.setattr(cpu, "_run_compiled", lambda name, *args: calls.append(name) or run(name, *args))
    weight = _weights(torch.bfloat16).nan_to_num(posinf=0.0, neginf=0.0)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    restored = F4.dequantize_4bit(packed, state)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    out = fourbit.matmul_4bit(x, packed.t(), state)
    assert calls == ["quantize_4bit", "dequantize_4bit_torch.bfloat16", "dequantize_4bit_torch.bfloat16"]
    monkeypatch.setenv("FOURBIT_CPU_COMPILE", "0")
    reference_packed, reference_state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, reference_packed) and state == reference_state
    assert_same_bits(restored, F4.dequantize_4bit(packed, state))
    assert torch.equal(out, fourbit.matmul_4bit(x, packed.t(), state))
    assert len(calls) == 3  # nothing compiled while disabled


def test_small_or_uneven_tensors_take_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_run_compiled", lambda *args: pytest.fail("compiled path used"))
    code = F4.get_4bit_type("nf4")
    cpu.quantize_4bit(torch.randn(64, 64), code, 64, torch.uint8)  # below MIN_NUMEL
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    cpu.quantize_4bit(torch.randn(1000), code, 64, torch.uint8)  # not a multiple of the blocksize


def test_every_dtype_table_and_mode_compiles(small_tensors_compile, monkeypatch):
    """From a fresh compile cache, every input dtype with both tables (sorted NF4, unsorted FP4),
    in training and in inference mode, compiles: no variant hits torch.compile's limit on
    graphs per function (the path would warn and use the reference for it)."""
    torch._dynamo.reset()
    monkeypatch.setattr(cpu, "_compiled", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for quant_type, dtype, inference in itertools.product(("nf4", "fp4"), DTYPES, (False, True)):
            code = F4.get_4bit_type(quant_type)
            with torch.inference_mode(inference):
                data = torch.randn(32, 128).to(dtype)
                packed, absmax = cpu.quantize_4bit(data, code, 64, torch.uint8)
                restored = cpu.dequantize_4bit(packed, absmax, code, 64, data.shape, dtype)
            assert_same_bits(restored, reference.dequantize_4bit(packed, absmax, code, 64, data.shape, dtype))
    assert cpu._succeeded == {"quantize_4bit", "quantize_4bit_ordered"} | {
        f"dequantize_4bit_{dtype}" for dtype in DTYPES
    }


def test_a_variant_that_fails_later_uses_the_reference_for_that_call_only(small_tensors_compile, monkeypatch):
    data = _weights(torch.float32)
    code = F4.get_4bit_type("nf4")
    cpu.quantize_4bit(data, code, 64, torch.uint8)  # compiles and runs
    compiled = cpu._compiled["quantize_4bit"]

    def limit_hit(*args):
        raise RuntimeError("recompile limit")

    monkeypatch.setitem(cpu._compiled, "quantize_4bit", limit_hit)
    with pytest.warns(RuntimeWarning, match="quantize_4bit.*recompile limit.*such calls use the slower reference"):
        packed, _ = cpu.quantize_4bit(data, code, 64, torch.uint8)
    assert torch.equal(packed, reference.quantize_4bit(data, code, 64, torch.uint8)[0])
    assert cpu.compile_enabled()
    monkeypatch.setitem(cpu._compiled, "quantize_4bit", compiled)
    assert torch.equal(cpu.quantize_4bit(data, code, 64, torch.uint8)[0], packed)


def test_torch_before_2_6_runs_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "SUPPORTED", False)
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    monkeypatch.setattr(cpu, "_compiled_function", lambda name, function: pytest.fail("compiled on old torch"))
    assert not cpu.compile_enabled()
    data = _weights(torch.bfloat16)
    code = F4.get_4bit_type("nf4")
    packed, absmax = cpu.quantize_4bit(data, code, 64, torch.uint8)
    expected_packed, expected_absmax = reference.quantize_4bit(data, code, 64, torch.uint8)
    assert torch.equal(packed, expected_packed)
    assert_same_bits(absmax, expected_absmax)


def test_failed_compilation_falls_back_to_the_reference(small_tensors_compile, monkeypatch):
    def broken(name, function):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu, "_compiled_function", broken)
    data = _weights(torch.float32)
    code = F4.get_4bit_type("fp4")
    with pytest.warns(RuntimeWarning, match="compiled CPU path failed.*no C\\+\\+ compiler"):
        packed, absmax = cpu.quantize_4bit(data, code, 64, torch.uint8)
    expected_packed, expected_absmax = reference.quantize_4bit(data, code, 64, torch.uint8)
    assert torch.equal(packed, expected_packed)
    assert_same_bits(absmax, expected_absmax)
    assert not cpu.compile_enabled()
    assert_same_bits(
        cpu.dequantize_4bit(packed, absmax, code, 64, data.shape, torch.float32),
        reference.dequantize_4bit(packed, absmax, code, 64, data.shape, torch.float32),
    )


def test_no_recompilation_across_batch_sizes_and_shapes(small_tensors_compile):
    from torch._dynamo.utils import counters

    layer = fourbit.nn.Linear4bit(256, 128, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(torch.nn.Linear(256, 128).state_dict())
    layer = layer.to("cpu")
    layer(torch.randn(1, 256))
    other = fourbit.nn.Linear4bit(512, 192, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    other(torch.randn(1, 512))  # a second shape may specialise once more (0/1 sizes), not per batch
    graphs = counters["stats"]["unique_graphs"]
    for batch in range(1, 65):
        layer(torch.randn(batch, 256))
        other(torch.randn(batch, 512))
    third = fourbit.nn.Linear4bit(384, 320, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    third(torch.randn(7, 384))
    assert counters["stats"]["unique_graphs"] == graphs
