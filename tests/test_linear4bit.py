"""Params4bit and Linear4bit: every test of upstream test_linear4bit.py, ported (fourbit's own
tests of the module: test_linear4bit_module.py)."""

from __future__ import annotations

import copy
import os
import pickle
import sys
from tempfile import TemporaryDirectory

import pytest
import torch
from helpers import (
    FULLGRAPH_TORCH,
    STORAGES,
    TRUE_FALSE,
    available_devices,
    describe_dtype,
    id_formatter,
    make_linear4bit,
    torch_load_from_buffer,
    torch_save_to_buffer,
)

import fourbit as bnb

STORAGE_NAMES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------- ported from upstream


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_storage", list(STORAGE_NAMES))
@pytest.mark.parametrize("original_dtype", [torch.float16, torch.bfloat16], ids=describe_dtype)
@pytest.mark.parametrize("bias", TRUE_FALSE, ids=id_formatter("bias"))
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("save_before_forward", TRUE_FALSE, ids=id_formatter("save_before_forward"))
def test_linear_serialization(
    device, quant_type, original_dtype, compress_statistics, bias, quant_storage, save_before_forward
):
    layer_shape = (300, 400)
    linear = torch.nn.Linear(*layer_shape, dtype=original_dtype, device="cpu")
    linear_q = make_linear4bit(linear, quant_type, compress_statistics, bias).to(device)

    # restore from the state dict through from_prequantized
    sd = linear_q.state_dict()
    bias_data2 = sd.pop("bias", None)
    weight_data2 = sd.pop("weight")
    weight2 = bnb.nn.Params4bit.from_prequantized(quantized_stats=sd, data=weight_data2, device=device)
    linear_q2 = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=bias,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        device="meta",
    )
    linear_q2.weight = weight2
    if bias:
        linear_q2.bias = torch.nn.Parameter(bias_data2)
    linear_q2 = linear_q2.to(device)

    # the same weights stored as another quant_storage dtype
    linear_qs = make_linear4bit(linear, quant_type, compress_statistics, bias, STORAGE_NAMES[quant_storage]).to(device)

    a, b = linear_q.weight, linear_q2.weight
    assert a.device == b.device and a.dtype == b.dtype
    assert torch.equal(a, b)
    q0, q1 = a.quant_state, b.quant_state
    for attr in ("code", "dtype", "blocksize", "absmax"):
        c, d = getattr(q0, attr), getattr(q1, attr)
        assert torch.equal(c, d) if isinstance(c, torch.Tensor) else c == d
    if q0.state2 is not None:
        for attr in ("code", "dtype", "blocksize", "absmax"):
            c, d = getattr(q0.state2, attr), getattr(q1.state2, attr)
            assert torch.equal(c, d) if isinstance(c, torch.Tensor) else c == d
    if bias:
        assert linear_q.bias.device == linear_q2.bias.device and torch.equal(linear_q.bias, linear_q2.bias)

    if save_before_forward:
        bytes_4bit = torch_save_to_buffer(linear_q)
    x = torch.rand(42, layer_shape[0], device=device)
    a, b, c = linear_q(x), linear_q2(x), linear_qs(x)
    assert a.device == b.device == c.device and a.dtype == b.dtype == c.dtype
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    if not save_before_forward:
        bytes_4bit = torch_save_to_buffer(linear_q)
    linear_q3 = torch_load_from_buffer(bytes_4bit)

    if device != "cpu":  # moving back and forth keeps the layer intact
        linear_q2.to("cpu")
        linear_q2.to(device)
    d = linear_qs(x)
    assert c.dtype == d.dtype and c.device == d.device and torch.equal(c, d)
    d = linear_q3(x)
    assert c.dtype == d.dtype and c.device == d.device and torch.equal(c, d)

    with TemporaryDirectory() as tmpdir:
        state_path_4bit = os.path.join(tmpdir, "state_4bit.pth")
        state_path = os.path.join(tmpdir, "state.pth")
        torch.save(linear.state_dict(), state_path)
        torch.save(linear_q.state_dict(), state_path_4bit)
        size_orig, size_4 = os.path.getsize(state_path), os.path.getsize(state_path_4bit)
        target_compression = 0.143 if original_dtype == torch.float32 else 0.29
        assert size_4 / size_orig < target_compression, (
            f"{size_4:,} is not below {target_compression:.1%} of {size_orig:,}"
        )


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_copy_param(device, quant_type, blocksize, compress_statistics):
    param = bnb.nn.Params4bit(
        data=torch.randn(300, 400),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        requires_grad=False,
    ).to(device)
    shallow_copy_param = copy.copy(param)
    assert param.quant_state is shallow_copy_param.quant_state
    assert param.data.data_ptr() == shallow_copy_param.data.data_ptr()


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_params4bit_torch_chunk_split(device, quant_type):
    """torch.chunk and torch.split keep the Params4bit subclass and its metadata (FSDP2 shards this way).
    As described: on the CPU the parameter is never moved, so its pieces are unquantized; on a GPU
    the move quantizes it first. Upstream skips the CPU (its CPU quantization crashed)."""
    params4bit = bnb.nn.Params4bit(data=torch.randn(8, 4, dtype=torch.float16), quant_type=quant_type)
    if device != "cpu":
        params4bit = params4bit.to(device)
    chunks = torch.chunk(params4bit, 2, dim=0)
    assert isinstance(chunks, tuple)
    splits = torch.split(params4bit, 2, dim=0)
    assert isinstance(splits, tuple) and len(splits) > 0
    for piece in (*chunks, *splits, *params4bit.chunk(2), *params4bit.split(3)):
        assert isinstance(piece, bnb.nn.Params4bit)
        assert piece.quant_type == params4bit.quant_type and piece.blocksize == params4bit.blocksize
        assert piece.quant_state is params4bit.quant_state
        assert piece.bnb_quantized == params4bit.bnb_quantized == (device != "cpu")
    assert torch.equal(torch.cat([c.data for c in chunks]), params4bit.data)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("quant_storage", STORAGES, ids=describe_dtype)
def test_quant_storage_shard_roundtrip(device, quant_type, quant_storage):
    """Quantized weights survive FSDP's flatten-chunk-reassemble pattern for every quant_storage."""
    M, K = 256, 128
    A = torch.randn(1, K, dtype=torch.float16, device=device)
    B = torch.randn(M, K, dtype=torch.float16, device=device)
    qB, state = bnb.functional.quantize_4bit(B, quant_type=quant_type, quant_storage=quant_storage)
    ref = bnb.functional.gemv_4bit(A, qB.t(), state=state)
    reassembled = torch.cat(qB.flatten().chunk(4)).reshape(qB.shape)
    assert reassembled.dtype == qB.dtype
    assert torch.equal(reassembled.view(torch.uint8), qB.view(torch.uint8))
    torch.testing.assert_close(bnb.functional.gemv_4bit(A, reassembled.t(), state=state), ref)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_deepcopy_param(device, quant_type, blocksize, compress_statistics):
    param = bnb.nn.Params4bit(
        data=torch.randn(300, 400),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        requires_grad=False,
    ).to(device)
    dict_keys_before = set(param.__dict__.keys())
    copy_param = copy.deepcopy(param)
    assert param.quant_state is not copy_param.quant_state
    assert param.quant_state == copy_param.quant_state
    assert param.data.data_ptr() != copy_param.data.data_ptr()
    assert torch.equal(param.data, copy_param.data)
    assert dict_keys_before == set(param.__dict__.keys()) == set(copy_param.__dict__.keys())


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_params4bit_real_serialization(device, quant_type, blocksize, compress_statistics):
    original_param = bnb.nn.Params4bit(
        data=torch.randn(300, 400),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
    )
    dict_keys_before = set(original_param.__dict__.keys())
    original_param.to(device)  # quantizes in place
    deserialized_param = pickle.loads(pickle.dumps(original_param))
    assert type(deserialized_param) is bnb.nn.Params4bit
    assert torch.equal(original_param.data, deserialized_param.data)
    assert original_param.requires_grad == deserialized_param.requires_grad == False  # noqa: E712
    assert original_param.quant_type == deserialized_param.quant_type
    assert original_param.blocksize == deserialized_param.blocksize
    assert original_param.compress_statistics == deserialized_param.compress_statistics
    assert original_param.quant_state == deserialized_param.quant_state
    assert dict_keys_before == set(original_param.__dict__.keys()) == set(deserialized_param.__dict__.keys())


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=describe_dtype)
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
@pytest.mark.parametrize("bias", TRUE_FALSE, ids=id_formatter("bias"))
@pytest.mark.parametrize("fullgraph", TRUE_FALSE, ids=id_formatter("fullgraph"))
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"], ids=id_formatter("mode"))
@pytest.mark.skipif(
    torch.__version__ < (2, 10) and sys.version_info >= (3, 14), reason="Not supported in Python 3.14 until torch 2.10"
)
def test_linear4bit_torch_compile(device, quant_type, compute_dtype, compress_statistics, bias, fullgraph, mode):
    if fullgraph and not FULLGRAPH_TORCH:
        pytest.skip("fullgraph mode requires torch 2.8 or higher")
    dim, batch_size = 256, 16
    torch.compiler.reset()
    net = torch.nn.Sequential(
        *[
            bnb.nn.Linear4bit(
                dim,
                dim,
                bias=bias,
                compute_dtype=compute_dtype,
                compress_statistics=compress_statistics,
                quant_type=quant_type,
            )
            for _ in range(4)
        ]
    ).to(device)
    x = torch.randn(batch_size, dim, dtype=compute_dtype, device=device)
    with torch.no_grad():
        ref_output = net(x)
    compiled_net = torch.compile(net, fullgraph=fullgraph, mode=mode)
    with torch.no_grad():
        compiled_output = compiled_net(x)
    assert compiled_output.shape == ref_output.shape
    assert compiled_output.device == ref_output.device and compiled_output.dtype == ref_output.dtype
    torch.testing.assert_close(compiled_output, ref_output)

    x.requires_grad_(True)
    net(x).sum().backward()
    grad_ref = x.grad.clone()
    x.grad = None
    compiled_net(x).sum().backward()
    torch.testing.assert_close(x.grad, grad_ref)
