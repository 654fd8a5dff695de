"""Prepared products: a weight's product is prepared once, reused, and never serves stale state.

``Linear4bit`` keeps ``functional.prepare_linear(weight, state)`` and rebuilds it when
``functional.prepared_key`` changes. On CUDA the prepared Triton weight keeps one launch per
input signature and launches compiled kernels directly; split-K products finish in the kernel
and leave their shared workspace zeroed. Without a GPU the Triton parts run in the interpreter.
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
from fourbit.formats import nested_op_arguments
from fourbit.nn import Linear4bit, Params4bit
from fourbit.prepared import weight_arguments
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


# --------------------------------------------------------------------------- Triton launches

triton = pytest.importorskip("triton", minversion="3.6")  # fourbit.ops.MIN_TRITON
from fourbit.kernels import triton as kernels  # noqa: E402
from fourbit.kernels.triton import launch  # noqa: E402

TRITON_DEVICE = "cuda" if ON_GPU else "cpu"


def _prepared_weight(n: int, k: int, nested: bool = True):
    weight = torch.randn(n, k, device=TRITON_DEVICE)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
    prepared = kernels.PreparedWeight(packed, blocksize=64, shape=(n, k), **weight_arguments(state, packed.device))
    return prepared, F4.dequantize_4bit(packed, state)


@pytest.mark.parametrize("rows", [1, 3])
def test_split_k_products_finish_in_the_kernel_and_leave_the_workspace_zeroed(rows):
    n, k = 48, 512
    prepared, dense = _prepared_weight(n, k)
    bias = torch.randn(n, device=TRITON_DEVICE)
    config = (4, 16, 64, 4, 4, "gather")  # ROWS, BLOCK_N, BLOCK_K, four K splits, warps, lookup
    for seed in range(3):  # the same workspace serves each call
        x = torch.randn(rows, k, device=TRITON_DEVICE, generator=torch.Generator(TRITON_DEVICE).manual_seed(seed))
        out = prepared.linear(x, bias, config=config)
        torch.testing.assert_close(out, x @ dense.t() + bias, rtol=1e-4, atol=1e-4)
        workspace, counters = launch.split_buffers(torch.device(TRITON_DEVICE), 1, 1)
        assert not workspace.any() and not counters.any()


def test_launches_are_kept_per_input_signature():
    prepared, dense = _prepared_weight(40, 256)
    for rows in (1, 2, 1, 2, 1):
        x = torch.randn(rows, 256, device=TRITON_DEVICE)
        torch.testing.assert_close(prepared.linear(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert len(prepared._launches) == 2
    x = torch.randn(4, 257, device=TRITON_DEVICE)[:, :256]  # another stride: another launch
    torch.testing.assert_close(prepared.linear(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert len(prepared._launches) == 3


def test_the_op_shares_launches_between_weights_of_one_layout_and_binds_each_weight():
    first, first_dense = _prepared_weight(40, 256)
    second, second_dense = _prepared_weight(40, 256)
    x = torch.randn(2, 256, device=TRITON_DEVICE)
    first.share_launches()
    second.share_launches()
    assert first._launches is second._launches
    torch.testing.assert_close(first.linear(x), x @ first_dense.t(), rtol=1e-4, atol=1e-4)
    (launch,) = first._launches.values()
    assert launch.before is None and launch.pointers is None  # the shared launch keeps no weight alive
    torch.testing.assert_close(second.linear(x), x @ second_dense.t(), rtol=1e-4, atol=1e-4)
    assert len(second._launches) == 1
    other_layout, _ = _prepared_weight(40, 512)
    other_layout.share_launches()
    assert other_layout._launches is not first._launches


def test_weights_share_launches_only_when_their_tensors_match_in_dtype_and_alignment():
    """A shared launch is launched directly with another weight's pointers, so the layout key
    holds everything Triton specializes a pointer on: dtype and 16-byte alignment."""
    prepared, _ = _prepared_weight(40, 256, nested=False)
    args = (prepared.packed, prepared.absmax, prepared.code, 64, (40, 256))
    assert kernels.PreparedWeight(*args).layout() == prepared.layout()
    other_dtype = kernels.PreparedWeight(prepared.packed, prepared.absmax.bfloat16(), *args[2:])
    assert other_dtype.layout() != prepared.layout()
    shifted = torch.cat([prepared.absmax.new_zeros(1), prepared.absmax])[1:]  # 4 bytes off
    assert kernels.PreparedWeight(prepared.packed, shifted, *args[2:]).layout() != prepared.layout()


def test_the_op_serves_each_weight_its_own_product_through_shared_launches():
    weights = [_prepared_weight(40, 256) for _ in range(3)]
    x = torch.randn(3, 256, device=TRITON_DEVICE)
    for prepared, dense in weights * 2:
        out = kernels.linear_4bit(x, prepared.packed, blocksize=64, shape=(40, 256), **_op_arguments(prepared))
        torch.testing.assert_close(out, x @ dense.t(), rtol=1e-4, atol=1e-4)


def test_a_chunked_product_chooses_its_path_once_per_input_signature(monkeypatch):
    """Inputs that take the chunked path (decode + cuBLAS; 300 rows take it on every device) are
    remembered like a kernel's launch: the next call with the same signature neither chooses
    nor prepares a configuration again, and gives the same product."""
    from fourbit.kernels.triton import dispatch

    chosen: list[int] = []
    choose = dispatch.choose_config
    monkeypatch.setattr(dispatch, "choose_config", lambda x, *args: chosen.append(x.shape[0]) or choose(x, *args))
    prepared, dense = _prepared_weight(40, 256)
    x = torch.randn(300, 256, device=TRITON_DEVICE)
    first = prepared.linear(x)
    assert chosen == [300] and kernels.linear.CHUNKED in prepared._launches.values()
    torch.testing.assert_close(first, x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert torch.equal(prepared.linear(x), first) and chosen == [300]
    assert torch.equal(prepared.linear(x.view(3, 100, 256)), first.view(3, 100, 40)) and chosen == [300, 300]
    assert torch.equal(prepared.linear(x[:299]), first[:299]) and chosen == [300, 300, 299]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_chunked_path_plans_its_decodes_once_per_dtype(dtype, monkeypatch):
    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 64 * 256 * dtype.itemsize)  # 64 rows a chunk
    prepared, dense = _prepared_weight(200, 256)
    bias = torch.randn(200, device=TRITON_DEVICE, dtype=dtype)
    for seed in range(2):
        x = torch.randn(3, 256, device=TRITON_DEVICE, generator=torch.Generator(TRITON_DEVICE).manual_seed(seed))
        out = prepared.linear(x.to(dtype), bias, config="chunked")
        expected = x.to(dtype).float() @ dense.to(dtype).float().t() + bias.float()
        assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
        if seed == 0:
            plan = prepared._chunk_plans[dtype]
    assert prepared._chunk_plans[dtype] is plan  # the second call decoded with the first call's plan
    assert [(start, stop) for start, stop, _ in plan] == [(0, 64), (64, 128), (128, 192), (192, 200)]


def _op_arguments(prepared) -> dict:
    return dict(absmax=prepared.absmax, code=prepared.code, **nested_op_arguments(prepared.nested_statistics))


# --------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _kernels_launched(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_an_eager_batch_one_call_launches_one_kernel(shape, dtype):
    n, k = shape
    layer = Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4").cuda()
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    with torch.no_grad():
        for _ in range(2):
            layer(x)  # compiles, prepares, launches once through the JIT
        names = _kernels_launched(lambda: layer(x))
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=2e-2, atol=2e-2)
    assert len(names) == 1, names


@gpu
def test_direct_launches_match_the_jit_launch_bit_for_bit():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    first = prepared.linear(x)  # through the JIT
    (entry,) = prepared._launches.values()
    assert entry.launch.compiled is not None
    again = prepared.linear(x)  # direct
    assert torch.equal(first, again)
    unaligned = torch.randn(1, 4104, device="cuda", dtype=torch.bfloat16)[:, 1:4097]
    torch.testing.assert_close(prepared.linear(unaligned), prepared.linear(unaligned.clone()), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_the_op_launches_shared_products_directly_for_each_weight(rows):
    """The op path (one launch kept per weight layout, each call binding its weight): after the
    first call, every weight of the layout launches directly with its own pointers, and each
    result is that weight's own product (split K sums in any order: equal up to rounding)."""
    weights = [_prepared_weight(4096, 4096)[0] for _ in range(3)]
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    own = [prepared.linear(x) for prepared in weights]  # each through the JIT, launches of its own
    for _ in range(2):
        for prepared, expected in zip(weights, own, strict=True):
            out = kernels.linear_4bit(x, prepared.packed, blocksize=64, shape=(4096, 4096), **_op_arguments(prepared))
            assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
    shared = next(
        launches for layout, launches in kernels.linear._layout_launches.items() if layout[1:3] == (4096, 4096)
    )
    kernel_launches = [launch for launch in shared.values() if launch is not kernels.linear.CHUNKED]
    assert all(launch.launch.compiled is not None for launch in kernel_launches)


@gpu
def test_chunked_decodes_launch_directly_and_match_the_jit_bit_for_bit():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    first = prepared.linear(x, config="chunked")  # decodes through the JIT
    (decode,) = [decode for _, _, decode in prepared._chunk_plans[torch.bfloat16]]
    assert decode.launch.compiled is not None
    assert torch.equal(prepared.linear(x, config="chunked"), first)  # direct


@gpu
def test_launches_on_another_stream_use_their_own_workspace():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    expected = prepared.linear(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        results = [prepared.linear(x) for _ in range(20)]
    plain = [prepared.linear(x) for _ in range(20)]
    torch.cuda.synchronize()
    for result in results + plain:
        torch.testing.assert_close(result, expected, rtol=1e-2, atol=1e-2)


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
