"""4-bit parametrization: every test of upstream test_parametrize.py (ported), plus loading the
state dict back, per-forward caching, thread safety, memory and torch.compile."""

from __future__ import annotations

import gc
import io
import threading
import weakref

import pytest
import torch
import torch.nn as nn
from helpers import TRUE_FALSE, available_devices, describe_dtype

import fourbit.functional as F
from fourbit.kernels import reference
from fourbit.nn import parametrize
from fourbit.nn.parametrize import (
    Bnb4bitParametrization,
    Dequantize4bitParametrization,
    load_state_dict_4bit,
    replace_parameter_4bit,
    replace_parameter_4bit_prequantized,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXPECTED_ERRORS = {
    "nf4": {64: {"abs": 0.072792, "rel": 0.203299}, 128: {"abs": 0.076835, "rel": 0.215252},
            256: {"abs": 0.080326, "rel": 0.226044}},
    "fp4": {64: {"abs": 0.096545, "rel": 0.260130}, 128: {"abs": 0.102947, "rel": 0.275734},
            256: {"abs": 0.108685, "rel": 0.289842}},
}  # fmt: skip


class ParametrizeTestModule(nn.Module):
    """Upstream's test module. The values are drawn on the CPU and moved, so every device sees the
    same numbers (the error bounds are statistical, and CUDA's generator draws other numbers)."""

    def __init__(self, device="cpu", dtype=torch.float32):
        super().__init__()
        self.weight_2d = nn.Parameter(torch.randn(1024, 1024).to(device=device, dtype=dtype))
        self.expert_weights = nn.Parameter(torch.randn(8, 512, 256).to(device=device, dtype=dtype))
        self.bias_1d = nn.Parameter(torch.randn(1024).to(device=device, dtype=dtype))
        self.not_param = torch.randn(32).to(device=device, dtype=dtype)


def mean_errors(original, reconstructed):
    err = (original - reconstructed.detach()).abs().float()
    return err.mean(), (err / (original.abs().float() + 1e-8)).mean()


# --------------------------------------------------------------------------- ported from upstream


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=lambda v: f"compress_statistics={v}")
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_replace_parameter_4bit(device, dtype, quant_type, compress_statistics, blocksize):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    original_param = module.weight_2d.clone()
    replace_parameter_4bit(
        module, "weight_2d", compress_statistics=compress_statistics, quant_type=quant_type, blocksize=blocksize
    )
    assert hasattr(module, "parametrizations") and "weight_2d" in module.parametrizations
    reconstructed = module.weight_2d
    assert reconstructed.shape == original_param.shape
    assert reconstructed.dtype == dtype
    assert reconstructed.device.type == device
    err_mean, relerr = mean_errors(original_param, reconstructed)
    assert err_mean < EXPECTED_ERRORS[quant_type][blocksize]["abs"] + 1e-3
    assert relerr < EXPECTED_ERRORS[quant_type][blocksize]["rel"] + 1e-3


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_moe_parameter_shape(device, dtype):
    param_shape = (8, 64, 64)

    class MoEModule(nn.Module):
        def __init__(self, device, dtype):
            super().__init__()
            self.param = nn.Parameter(torch.randn(*param_shape, dtype=dtype, device=device))

    module = MoEModule(device=device, dtype=dtype)
    original_param = module.param.clone()
    replace_parameter_4bit(module, "param", quant_type="nf4")
    reconstructed = module.param
    assert reconstructed.shape == param_shape
    assert reconstructed.dtype == dtype and reconstructed.device.type == device
    err_mean, relerr = mean_errors(original_param, reconstructed)
    assert err_mean < 0.085 and relerr < 0.25


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_prequantized_replacement(device, dtype, quant_type):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    original_param = module.weight_2d.clone()
    quantized_data, quant_state = F.quantize_4bit(original_param.data, quant_type=quant_type)
    module.weight_2d = nn.Parameter(quantized_data, requires_grad=False)
    replace_parameter_4bit_prequantized(
        module, "weight_2d", quant_state.as_dict(packed=True), device=torch.device(device)
    )
    reconstructed = module.weight_2d
    assert reconstructed.shape == original_param.shape
    assert reconstructed.dtype == dtype and reconstructed.device.type == device
    assert torch.equal(reconstructed, F.dequantize_4bit(quantized_data, quant_state))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=lambda v: f"compress_statistics={v}")
def test_state_dict_functionality(device, dtype, quant_type, compress_statistics):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    replace_parameter_4bit(module, "expert_weights", quant_type=quant_type, compress_statistics=compress_statistics)
    state_dict = module.state_dict()
    assert "expert_weights" in state_dict
    assert "expert_weights.absmax" in state_dict
    assert "expert_weights.quant_map" in state_dict
    assert f"expert_weights.quant_state.bitsandbytes__{quant_type}" in state_dict
    assert "parametrizations.expert_weights.original" not in state_dict
    reconstructed = module.expert_weights
    assert reconstructed.shape == (8, 512, 256) and reconstructed.dtype == dtype


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_moe_realistic_forward(device, dtype):
    class SimpleMoE(nn.Module):
        def __init__(self, device, dtype):
            super().__init__()
            self.expert_weights = nn.Parameter(torch.randn(4, 32, 64, dtype=dtype, device=device))

        def forward(self, x, expert_idx=0):
            return torch.matmul(x, self.expert_weights[expert_idx])

    module = SimpleMoE(device=device, dtype=dtype)
    x = torch.randn(8, 32, dtype=dtype, device=device)
    with torch.no_grad():
        reference_output = module(x, expert_idx=1)
    replace_parameter_4bit(module, "expert_weights", quant_type="nf4")
    with torch.no_grad():
        quantized_output = module(x, expert_idx=1)
    assert quantized_output.shape == reference_output.shape
    err_mean, relerr = mean_errors(reference_output, quantized_output)
    assert err_mean < 0.5
    assert relerr < 2.0


def test_error_conditions():
    module = ParametrizeTestModule()
    with pytest.raises(AttributeError, match="Module does not have parameter 'nonexistent'"):
        replace_parameter_4bit(module, "nonexistent")
    with pytest.raises(TypeError, match="Parameter 'not_param' is not an instance of nn\\.Parameter"):
        replace_parameter_4bit(module, "not_param")
    with pytest.raises(AttributeError, match="Module does not have parameter 'nonexistent'"):
        replace_parameter_4bit_prequantized(module, "nonexistent", {}, torch.device("cpu"))
    with pytest.raises(TypeError, match="Parameter 'not_param' is not an instance of nn\\.Parameter"):
        replace_parameter_4bit_prequantized(module, "not_param", {}, torch.device("cpu"))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_quant_state_preservation(device, dtype):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    blocksize = 64
    replace_parameter_4bit(module, "weight_2d", quant_type="nf4", compress_statistics=True, blocksize=blocksize)
    parametrization = module.parametrizations.weight_2d[0]
    assert isinstance(parametrization, Bnb4bitParametrization)
    quant_state = parametrization.quant_state
    assert isinstance(quant_state, F.QuantState)
    assert quant_state.quant_type == "nf4" and quant_state.blocksize == blocksize
    state_dict = module.state_dict()
    for key in quant_state.as_dict(packed=True):
        assert f"weight_2d.{key}" in state_dict


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_multiple_parameters(device, dtype):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    original_2d = module.weight_2d.clone()
    original_3d = module.expert_weights.clone()
    replace_parameter_4bit(module, "weight_2d", quant_type="nf4", blocksize=128)
    replace_parameter_4bit(module, "expert_weights", quant_type="fp4", blocksize=256)
    assert module.weight_2d.shape == original_2d.shape
    assert module.expert_weights.shape == original_3d.shape
    state_dict = module.state_dict()
    for key in ("weight_2d", "expert_weights", "weight_2d.absmax", "expert_weights.absmax"):
        assert key in state_dict
    assert "weight_2d.quant_state.bitsandbytes__nf4" in state_dict
    assert "expert_weights.quant_state.bitsandbytes__fp4" in state_dict


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_different_blocksizes(device, dtype, blocksize):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    original_param = module.expert_weights.clone()
    replace_parameter_4bit(module, "expert_weights", quant_type="nf4", blocksize=blocksize)
    reconstructed = module.expert_weights
    assert reconstructed.shape == original_param.shape and reconstructed.device.type == device
    err_mean, relerr = mean_errors(original_param, reconstructed)
    assert err_mean < EXPECTED_ERRORS["nf4"][blocksize]["abs"] + 0.01
    assert relerr < EXPECTED_ERRORS["nf4"][blocksize]["rel"] + 0.02


def test_parametrization_forward_method():
    original_tensor = torch.randn(64, 64, dtype=torch.float32)
    quantized_data, quant_state = F.quantize_4bit(original_tensor, quant_type="nf4")
    parametrization = Bnb4bitParametrization(quant_state)
    dequantized = parametrization.forward(quantized_data)
    assert dequantized.shape == original_tensor.shape
    assert dequantized.dtype == torch.float32 and dequantized.device == original_tensor.device
    err_mean, relerr = mean_errors(original_tensor, dequantized)
    assert err_mean < 0.08 and relerr < 0.25
    assert Bnb4bitParametrization is Dequantize4bitParametrization


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
def test_gradient_behavior(device, dtype):
    module = ParametrizeTestModule(device=device, dtype=dtype)
    module.weight_2d.requires_grad_(True)
    assert module.weight_2d.requires_grad
    replace_parameter_4bit(module, "weight_2d", quant_type="nf4")
    assert not module.weight_2d.requires_grad


# --------------------------------------------------------------------------- loading back


class Experts(nn.Module):
    """A small MoE block: reads its expert tensor twice per forward."""

    def __init__(self, experts=4, width=32, height=48):
        super().__init__()
        self.expert_weights = nn.Parameter(torch.randn(experts, width, height))
        self.gate = nn.Parameter(torch.randn(width, experts))

    def forward(self, x):
        chosen = (x @ self.gate).argmax(dim=-1)
        first = torch.einsum("bw,bwh->bh", x, self.expert_weights[chosen])
        return first + self.expert_weights.mean()


def _quantized_experts(**options):
    torch.manual_seed(0)
    module = Experts()
    replace_parameter_4bit(module, "expert_weights", **options)
    return module


@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=lambda v: f"nested={v}")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_round_trip_into_a_fresh_module(compress_statistics, quant_type):
    module = _quantized_experts(compress_statistics=compress_statistics, quant_type=quant_type)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = Experts()
    result = load_state_dict_4bit(fresh, loaded)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.expert_weights, module.expert_weights)
    assert fresh.parametrizations.expert_weights[0].quant_state == module.parametrizations.expert_weights[0].quant_state
    assert list(fresh.state_dict()) == list(module.state_dict())
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), module(x))


def test_state_dict_round_trip_into_a_parametrized_module():
    module = _quantized_experts(compress_statistics=True)
    other = _quantized_experts(quant_type="fp4", blocksize=256)
    with torch.no_grad():
        other.gate.zero_()
    other.load_state_dict(module.state_dict())
    assert torch.equal(other.expert_weights, module.expert_weights)
    assert torch.equal(other.gate, module.gate)
    assert other.parametrizations.expert_weights[0].quant_state.quant_type == "nf4"


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    module = _quantized_experts(compress_statistics=True)
    path = tmp_path / "experts.safetensors"
    safetensors_torch.save_file(module.state_dict(), path)
    fresh = Experts()
    load_state_dict_4bit(fresh, safetensors_torch.load_file(path))
    assert torch.equal(fresh.expert_weights, module.expert_weights)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd.pop("expert_weights.absmax"), "missing \\['absmax'\\]"),
        (lambda sd: sd.__setitem__("expert_weights", sd["expert_weights"][:-1]), "packed data holds"),
        (lambda sd: sd.pop("expert_weights"), "not its packed data"),
        (
            lambda sd: sd.__setitem__(
                "expert_weights.quant_state.bitsandbytes__nf4", torch.tensor([1], dtype=torch.uint8)
            ),
            "JSON",
        ),
    ],
)
def test_corrupt_state_dict_raises_and_leaves_the_module_unchanged(corrupt, message):
    sd = _quantized_experts().state_dict()
    corrupt(sd)
    target = _quantized_experts(quant_type="fp4")
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_prequantized_replacement_rejects_a_mismatched_dict():
    module = ParametrizeTestModule()
    _, state = F.quantize_4bit(torch.randn(64, 64))
    module.weight_2d = nn.Parameter(torch.zeros(10, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="packed data holds 10 bytes"):
        replace_parameter_4bit_prequantized(module, "weight_2d", state.as_dict(packed=True), "cpu")
    assert not hasattr(module, "parametrizations")


def test_a_parameter_that_is_not_floating_point_is_named_in_the_error():
    module = nn.Module()
    module.steps = nn.Parameter(torch.ones(64, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="parameter 'steps' has dtype int64; 4-bit quantization supports"):
        replace_parameter_4bit(module, "steps")
    assert not hasattr(module, "parametrizations") and module.steps.dtype == torch.int64


def test_replacing_twice_is_a_clear_error():
    module = _quantized_experts()
    with pytest.raises(TypeError, match="already parametrized"):
        replace_parameter_4bit(module, "expert_weights")


# --------------------------------------------------------------------------- caching


@pytest.fixture
def dequantize_calls(monkeypatch):
    """Records (thread id, weakref to the result) for every reference dequantize_4bit call."""
    calls: list[tuple[int, weakref.ref]] = []
    monkeypatch.setenv("FOURBIT_CPU_NATIVE", "0")  # CPU dequantize then runs the reference
    original = reference.dequantize_4bit

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((threading.get_ident(), weakref.ref(result)))
        return result

    monkeypatch.setattr(reference, "dequantize_4bit", counting)
    return calls


def test_dequantized_once_per_forward(dequantize_calls):
    module = _quantized_experts()
    x = torch.randn(5, 32)
    with torch.no_grad():
        module(x)
        assert len(dequantize_calls) == 1  # read twice, decoded once
        module(x)
        assert len(dequantize_calls) == 2  # a new forward decodes again
    _ = module.expert_weights  # outside a forward nothing is cached
    _ = module.expert_weights
    assert len(dequantize_calls) == 4


def test_nothing_is_kept_after_the_forward(dequantize_calls):
    module = _quantized_experts()
    x = torch.randn(5, 32)
    with torch.no_grad():
        for _ in range(100):
            module(x)
    gc.collect()
    assert len(dequantize_calls) == 100
    alive = sum(ref() is not None for _, ref in dequantize_calls)
    assert alive == 0, f"{alive} dequantized tensors outlived their forward"
    assert parametrize._forward_cache.depth == 0 and not parametrize._forward_cache.values


def test_cache_is_released_when_the_forward_raises(dequantize_calls):
    module = _quantized_experts()
    with pytest.raises(RuntimeError):
        module(torch.randn(5, 31))
    assert parametrize._forward_cache.depth == 0 and not parametrize._forward_cache.values


def test_concurrent_forwards_of_different_modules_do_not_interfere(dequantize_calls):
    """Thread A finishes its forward while thread B is inside its own. B must still decode its
    weight once, and A's dequantized weight must be freed at the end of A's forward, not kept
    alive by B's (a process-global cache, as in bitsandbytes, keeps it until every thread is out)."""
    first, second = _quantized_experts(), _quantized_experts(quant_type="fp4")
    both_inside = threading.Barrier(2)
    first_done = threading.Event()
    outputs, errors, idents = {}, [], {}
    first_alive_during_second = []

    def reads_twice(module, wait_for_first):
        def forward(x):
            total = module.expert_weights.sum()
            both_inside.wait(timeout=10)
            if wait_for_first:
                first_done.wait(timeout=10)
                gc.collect()
                first_alive_during_second.append(
                    sum(ref() is not None for ident, ref in dequantize_calls if ident == idents["first"])
                )
            return total + module.expert_weights.sum() + x.sum()

        return forward

    def run(name, module, wait_for_first):
        idents[name] = threading.get_ident()
        try:
            module.forward = reads_twice(module, wait_for_first)
            with torch.no_grad():
                outputs[name] = module(torch.ones(1))
        except Exception as error:  # surfaced below
            errors.append(error)
        finally:
            if not wait_for_first:
                first_done.set()

    threads = [
        threading.Thread(target=run, args=("first", first, False)),
        threading.Thread(target=run, args=("second", second, True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    per_thread = {}
    for ident, _ in dequantize_calls:
        per_thread[ident] = per_thread.get(ident, 0) + 1
    assert per_thread == {idents["first"]: 1, idents["second"]: 1}
    assert first_alive_during_second == [0]
    assert torch.equal(outputs["first"], 2 * first.expert_weights.sum() + 1)
    assert torch.equal(outputs["second"], 2 * second.expert_weights.sum() + 1)


@pytest.mark.cpu_only  # inductor's C++ code: a minute and more on a GPU machine's shared cores, no CUDA in it
def test_compiled_module_matches_eager():
    module = _quantized_experts(compress_statistics=True)
    x = torch.randn(5, 32)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))
