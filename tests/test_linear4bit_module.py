"""Linear4bit and Params4bit beyond upstream's tests: state-dict loading, bad input, dtype
casts, graph breaks, compiled CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    STORAGES,
    TRUE_FALSE,
    available_devices,
    describe_dtype,
    id_formatter,
    make_linear4bit,
    needs_fullgraph,
    torch_load_from_buffer,
    torch_save_to_buffer,
)

import fourbit as bnb
import fourbit.functional as F


@pytest.mark.gpu
def test_compiled_cuda_graphs_read_the_state_in_place_and_follow_a_reload():
    """Under torch.compile's CUDA graphs (transformers' compiled generate uses them), a CUDA
    state's tensors are static inputs: replays read them in place instead of copying them, at
    every batch size, and a reloaded layer is computed with its new statistics."""
    torch.compiler.reset()
    torch.manual_seed(0)

    def layer():
        return bnb.nn.Linear4bit(256, 256, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")

    net = torch.nn.Sequential(layer(), layer(), layer()).cuda()
    for module in net:
        state = module.weight.quant_state
        for tensor in (state.absmax, state.offset, state.state2.absmax, state.state2.code):
            assert getattr(tensor, "_dynamo_static_input_type", None), "a CUDA state tensor is not marked static"
    compiled = torch.compile(net, mode="reduce-overhead")
    with torch.no_grad():
        for rows in (1, 8, 1, 8):
            x = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
            for _ in range(3):
                out = compiled(x).clone()
            torch.testing.assert_close(out, net(x))
        net[1].load_state_dict(layer().cuda().state_dict())
        for _ in range(3):
            out = compiled(x).clone()
        torch.testing.assert_close(out, net(x))


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=describe_dtype)
def test_a_layer_first_called_under_compiled_cuda_graphs_forward_and_backward(compute_dtype):
    """No eager call first: the tables the kernels derive from the code table (the decode table
    of the many-rows path and of the gradient, the float16 table) are built outside the
    CUDA-graph warmup's memory pool, which must hold nothing kept."""
    torch.compiler.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *[bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=compute_dtype, quant_type="nf4") for _ in range(2)]
    ).cuda()
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(16, 256, dtype=compute_dtype, device="cuda", requires_grad=True)
    for _ in range(3):
        x.grad = None  # a gradient kept from the last step would be graph memory, overwritten
        out = compiled(x)
        out.sum().backward()
        out, gradient = out.clone(), x.grad.clone()
    x.grad = None
    expected = net(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gradient, x.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_a_functional_product_first_called_under_compiled_cuda_graphs(compute_dtype, rows):
    """A state straight from ``quantize_4bit``, whose tables nothing built ahead, used first
    inside a compiled call with CUDA graphs: its derived tables are built outside the graph pool."""
    torch.compiler.reset()
    torch.manual_seed(0)
    weight, state = F.quantize_4bit(torch.randn(256, 256, device="cuda", dtype=compute_dtype), quant_type="nf4")
    product = torch.compile(lambda a: bnb.matmul_4bit(a, weight.t(), state), mode="reduce-overhead", fullgraph=True)
    x = torch.randn(rows, 256, dtype=compute_dtype, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = product(x).clone()
        torch.testing.assert_close(out, bnb.matmul_4bit(x, weight.t(), state))


def _quantized_layer(quant_type="nf4", compress_statistics=True, bias=True, device="cpu"):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=bias)
    quantized = bnb.nn.Linear4bit(64, 48, bias=bias, quant_type=quant_type, compress_statistics=compress_statistics)
    quantized.load_state_dict(layer.state_dict())
    return layer, quantized.to(device)


@needs_fullgraph
def test_no_graph_break_in_forward_and_backward():
    _, layer = _quantized_layer()
    x = torch.randn(4, 64, requires_grad=True)

    def step(inp):
        return layer(inp).sum()

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("nested", TRUE_FALSE, ids=id_formatter("nested"))
def test_state_dict_keys_and_weights_only_load(nested):
    _, layer = _quantized_layer(compress_statistics=nested)
    sd = layer.state_dict()
    expected = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    if nested:
        expected += ["weight.nested_absmax", "weight.nested_quant_map"]
    assert list(sd) == [*expected, "weight.quant_state.bitsandbytes__nf4"]
    assert all(type(value) is torch.Tensor for value in sd.values())
    loaded = torch_load_from_buffer(torch_save_to_buffer(sd), weights_only=True)
    fresh = bnb.nn.Linear4bit(64, 48, quant_type="nf4")
    fresh.load_state_dict(loaded)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.weight.quant_state == layer.weight.quant_state


def test_load_state_dict_into_a_meta_layer():
    _, layer = _quantized_layer()
    fresh = bnb.nn.LinearNF4(64, 48, device="meta")
    fresh.load_state_dict(layer.state_dict())
    assert fresh.weight.device.type == "cpu" and fresh.bias.device.type == "cpu"
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def test_float_state_dict_loads_then_quantizes():
    dense, _ = _quantized_layer()
    fresh = bnb.nn.Linear4bit(64, 48, quant_type="nf4")
    fresh.load_state_dict(dense.state_dict())
    assert not fresh.weight.bnb_quantized
    fresh = fresh.to("cpu")
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), dense(x), atol=0.3, rtol=0.1)
    # a float weight loaded into an already quantized layer is quantized with its settings
    again = bnb.nn.Linear4bit(64, 48, quant_type="nf4").to("cpu")
    again.load_state_dict(dense.state_dict())
    assert torch.equal(again(x), fresh(x))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "found neither"),
        (lambda sd: sd.pop("weight.absmax"), "missing \\['absmax'\\]"),
        (
            lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", torch.tensor([1, 2], dtype=torch.uint8)),
            "not valid UTF-8 JSON",
        ),
        (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:-1]), "absmax must have 48 entries"),
        (lambda sd: sd.__setitem__("weight", sd["weight"][:-1]), "packed data holds 1535 bytes"),
    ],
)
def test_corrupt_state_dict_raises_and_leaves_the_layer_unchanged(corrupt, message):
    _, layer = _quantized_layer()
    sd = layer.state_dict()
    corrupt(sd)
    target = bnb.nn.Linear4bit(64, 48, quant_type="nf4").to("cpu")
    before = {key: value.clone() for key, value in target.state_dict().items()}
    weight_before = target.weight
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(sd)
    assert target.weight is weight_before
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_shape_mismatch_in_checkpoint():
    _, layer = _quantized_layer()
    target = bnb.nn.Linear4bit(48, 64, quant_type="nf4")
    with pytest.raises(RuntimeError, match=r"checkpoint weight has shape \(48, 64\) but this layer is \(64, 48\)"):
        target.load_state_dict(layer.state_dict())


def test_forward_input_of_the_wrong_width():
    _, layer = _quantized_layer()
    with pytest.raises(ValueError, match="last dimension in_features=64, got 63"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match=r"in_features=64, got a 0-d input \(input shape \(\)\)"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_input_that_is_not_floating_point_is_an_error(dtype, compute_dtype):
    """With a compute dtype the input is cast to it and the output back to the input's dtype, which
    for integer inputs truncated the product to integers without a word (bitsandbytes does); an
    error now says so, as nn.Linear's does."""
    _, layer = _quantized_layer()
    layer.compute_dtype = compute_dtype
    x = torch.ones(2, 64).to(dtype)
    with pytest.raises(TypeError, match=f"takes floating-point inputs, got {dtype}"):
        layer(x)
    assert layer(x.float()).dtype == torch.float32


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=str)
def test_float64_inputs_multiply_the_decoded_weight_widened(device, compute_dtype):
    """A float64 input (gradcheck's dtype) is multiplied by the weight ``dequantize_4bit`` gives,
    widened, in every entry point; with a compute dtype it is cast to it and the output back.
    The layer's bias keeps its dtype (bitsandbytes converts it in place, and its CPU product of
    float64 inputs returned wrong values in our runs: docs/performance.md)."""
    _, layer = _quantized_layer(device=device)
    layer.compute_dtype, layer.compute_type_is_set = compute_dtype, compute_dtype is not None
    weight, state = layer.weight, layer.weight.quant_state
    x = torch.randn(5, 64, dtype=torch.float64, device=device)
    decoded = F.dequantize_4bit(weight.data, state)
    with torch.no_grad():
        if compute_dtype is None:
            expected = torch.nn.functional.linear(x, decoded.double(), layer.bias.double())
        else:  # the layer's own product of the cast input, cast back
            expected = layer(x.to(compute_dtype)).double()
        assert torch.equal(layer(x), expected)
        assert layer.bias.dtype == torch.float32
        plain = torch.nn.functional.linear(x, decoded.double())
        for packed in (weight.t(), weight):  # bitsandbytes' (1, bytes) form and the column of bytes
            assert torch.equal(bnb.matmul_4bit(x, packed, state), plain)
        assert torch.equal(
            F.gemv_4bit(x[:1], weight.t(), state=state), torch.nn.functional.linear(x[:1], decoded.double())
        )
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: bnb.matmul_4bit(x, weight.t(), state), (x,))


@pytest.mark.cpu_only  # inductor's C++ code: a minute and more on a GPU machine's shared cores, no CUDA in it
@needs_fullgraph
def test_float64_inputs_compile_without_a_graph_break():
    _, layer = _quantized_layer()
    x = torch.randn(3, 64, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


@needs_fullgraph
@pytest.mark.parametrize("device", available_devices())
def test_compiled_calls_pass_the_weight_to_the_op_without_its_torch_function(device, monkeypatch):
    """The compiled graph hands the op a view of the packed bytes: the weight itself would run
    ``Params4bit.__torch_function__`` in Python on every call of the graph (torch 2.11 does)."""
    torch.compiler.reset()
    _, layer = _quantized_layer(device=device)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        expected = layer(x)
        compiled(x)
        seen = []
        dispatch = bnb.nn.Params4bit.__torch_function__.__func__

        def spy(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return dispatch(cls, func, types, args, kwargs)

        monkeypatch.setattr(bnb.nn.Params4bit, "__torch_function__", classmethod(spy))
        out = compiled(x)
    assert torch.equal(out, expected)
    assert not [func for func in seen if "fourbit" in str(func)]


@pytest.mark.parametrize("compute_dtype", [torch.int8, torch.bool, torch.complex64, "bfloat16"], ids=str)
def test_a_compute_dtype_that_is_not_a_floating_dtype_is_refused_up_front(compute_dtype):
    """Refused where it is given (a layer, quantize_model, load_quantized), before anything
    changes, instead of at the first forward."""
    from fourbit.convert import load_quantized, quantize_model

    message = "compute_dtype must be a floating torch.dtype or None"
    with pytest.raises(TypeError, match=message):
        bnb.nn.Linear4bit(64, 48, compute_dtype=compute_dtype)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    with pytest.raises(TypeError, match=message):
        quantize_model(model, compute_dtype=compute_dtype)
    assert type(model[0]) is torch.nn.Linear
    with pytest.raises(TypeError, match=message):
        load_quantized(model, {}, compute_dtype=compute_dtype)
    assert type(model[0]) is torch.nn.Linear


def test_quantizing_a_weight_that_is_not_floating_point_names_it():
    weight = bnb.nn.Params4bit(torch.ones(8, 64, dtype=torch.int32), quant_type="nf4")
    with pytest.raises(ValueError, match="the weight to quantize has dtype int32; 4-bit quantization supports"):
        weight.to("cpu")
    assert not weight.bnb_quantized and weight.dtype == torch.int32


def test_unquantized_weight_in_forward_is_an_error():
    layer = bnb.nn.Linear4bit(64, 48)
    with pytest.raises(RuntimeError, match="not quantized yet: move the module to a device first"):
        layer(torch.randn(2, 64))


def test_compute_dtype_from_the_first_input_and_output_in_the_input_dtype():
    _, layer = _quantized_layer()
    out = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64)).dtype == torch.float32  # computed in bf16, returned as fp32
    assert layer.bias.dtype == torch.float32  # the bias parameter is not modified


def test_fp16_input_warns_once():
    _, layer = _quantized_layer()
    with pytest.warns(UserWarning, match="inference will be slow"):
        layer(torch.randn(2, 64, dtype=torch.float16))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 64, dtype=torch.float16))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "to_bf16"])
@pytest.mark.parametrize("quant_storage", STORAGES, ids=describe_dtype)
def test_dtype_casts_of_the_module_keep_the_packed_weight(cast, quant_storage):
    layer = make_linear4bit(torch.nn.Linear(64, 48), "nf4", True, True, quant_storage).to("cpu")
    packed = layer.weight.data.view(torch.uint8).clone()
    x = torch.randn(2, 64)
    before = layer(x)
    layer = layer.to(torch.bfloat16) if cast == "to_bf16" else getattr(layer, cast)()
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == quant_storage
    assert torch.equal(layer.weight.data.view(torch.uint8), packed)
    torch.testing.assert_close(layer(x.to(layer.bias.dtype)).float(), before, atol=0.05, rtol=0.02)


def test_params4bit_reads_through_to_its_quant_state():
    param = bnb.nn.Params4bit(torch.randn(32, 64), compress_statistics=True, quant_type="nf4")
    with pytest.raises(AttributeError, match="absmax"):
        _ = param.absmax
    param = param.to("cpu")
    state = param.quant_state
    assert param.absmax is state.absmax and param.code is state.code and param.quant_map is state.code
    assert param.offset is state.offset and param.state2 is state.state2
    assert param.nested_absmax is state.state2.absmax and param.nested_blocksize == 256
    assert param.nested_quant_map is state.state2.code and param.nested_dtype == torch.float32
    assert param.nested_offset is state.offset
    plain = bnb.nn.Params4bit(torch.randn(32, 64), compress_statistics=False).to("cpu")
    with pytest.raises(AttributeError, match="nested_absmax"):
        _ = plain.nested_absmax


def test_params4bit_rejects_bad_settings():
    with pytest.raises(ValueError, match="blocksize=48"):
        bnb.nn.Params4bit(torch.randn(4), blocksize=48)
    with pytest.raises(ValueError, match="quant_type='int4'"):
        bnb.nn.Linear4bit(4, 4, quant_type="int4")
    with pytest.raises(ValueError, match=r"quant_storage=torch\.int32"):
        bnb.nn.Linear4bit(4, 4, quant_storage=torch.int32)


def test_from_prequantized_rejects_a_mismatched_dict():
    _, layer = _quantized_layer()
    sd = layer.state_dict()
    stats = {key.removeprefix("weight."): value for key, value in sd.items() if key.startswith("weight.")}
    with pytest.raises(ValueError, match="packed data holds 1000 bytes"):
        bnb.nn.Params4bit.from_prequantized(torch.zeros(1000, 1, dtype=torch.uint8), stats, device="cpu")


def test_nf4_and_fp4_subclasses_fix_the_quant_type():
    assert bnb.nn.LinearNF4(8, 8).weight.quant_type == "nf4"
    assert bnb.nn.LinearFP4(8, 8).weight.quant_type == "fp4"
    assert bnb.nn.Linear4bit(8, 8).weight.quant_type == "fp4"
    layer = bnb.nn.Linear4bit(8, 8)
    assert layer.weight.compress_statistics and layer.weight.blocksize == 64 and not layer.weight.requires_grad


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear4bit_is_linear_with_the_dequantized_weight_and_its_bias(device, bias):
    torch.manual_seed(3)
    layer = bnb.nn.Linear4bit(64, 48, bias=bias, compute_dtype=torch.float32, quant_type="nf4").to(device)
    if bias:
        layer.bias.data.normal_()  # a bias far from zero, so that dropping it shows
    x = torch.randn(5, 64, device=device)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    expected = torch.nn.functional.linear(x, weight, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_keep_every_module_prefix():
    model = torch.nn.Sequential(torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4")), torch.nn.ReLU())
    model = model.to("cpu")
    keys = list(model.state_dict())
    assert "0.0.weight" in keys and "0.0.bias" in keys
    assert "0.0.weight.quant_state.bitsandbytes__nf4" in keys and "0.0.weight.absmax" in keys
    assert all(key.startswith("0.0.") for key in keys)
    fresh = torch.nn.Sequential(torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4")), torch.nn.ReLU())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh[0][0].weight.data, model[0][0].weight.data)


def test_a_zero_block_packs_to_the_code_of_zero():
    weight = torch.randn(4, 128)
    weight[1] = 0  # two whole blocks of 64
    packed, _ = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    row = packed.view(-1)[64:128]  # the packed bytes of row 1
    assert torch.equal(row, torch.full_like(row, 0x77))  # NF4's zero is code 7, in both nibbles


@pytest.fixture
def flushed_denormals():
    """Denormals flushed to zero, as ``torch.set_flush_denormal(True)`` (or a library built with
    fast math) leaves a process; skipped where the CPU cannot."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch-ops"])
@pytest.mark.parametrize("numel", [4 * 128, 4 * 128 + 40], ids=["whole-blocks", "short-last-block"])
def test_zero_blocks_code_to_zero_where_denormals_are_flushed(flushed_denormals, monkeypatch, native, numel):
    """The absmax floor of an all-zero block is a denormal, read as 0 there: the block must still
    code to zero (it coded to 15, NaN's code, on every CPU path), and the others as before."""
    monkeypatch.setenv("FOURBIT_CPU_NATIVE", native)
    torch.manual_seed(0)
    weight = torch.randn(numel)
    weight[128:256] = 0  # two whole blocks of 64
    weight[512:] = 0  # the short last block, where there is one
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    zeros = torch.cat([packed.view(-1)[64:128], packed.view(-1)[256:]])
    assert torch.equal(zeros, torch.full_like(zeros, 0x77))
    torch.set_flush_denormal(False)
    expected, expected_state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, expected)
    # (the short block stores the floor itself, which flushed reads 0: it decodes to zeros alike)
    assert torch.equal(state.absmax[:8], expected_state.absmax[:8]) and bool((state.absmax[8:] <= 1e-38).all())
