"""The fourbit:: custom ops: schemas, fake implementations, autograd registration, compile."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fourbit.functional as F4
import fourbit.ops as ops_module
from fourbit import layout
from fourbit.formats import create_dynamic_map, get_4bit_type
from fourbit.kernels import triton_support


def _weight_args(nested: bool, storage: torch.dtype = torch.uint8):
    weight = torch.randn(48, 96)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, quant_storage=storage)
    extra = {}
    if nested:
        extra = {
            "nested_absmax": state.state2.absmax,
            "nested_code": state.state2.code,
            "nested_offset": state.offset,
            "nested_blocksize": 256,
        }
    return packed, state, extra


def _cases():
    # Built at collection time, before the autouse seed fixture: seed here so every run checks the same inputs.
    torch.manual_seed(0)
    code = get_4bit_type("nf4")
    dynamic = create_dynamic_map()
    yield "quantize_4bit", (torch.randn(3, 37), code, 64, torch.uint8), {}
    # Packed bytes viewed as float32 can spell NaN, which opcheck's comparison never calls equal. Values <= 0 give
    # NF4 codes 0..7 only, so no packed float32 has an all-ones exponent.
    yield "quantize_4bit", (-torch.rand(64, 8, dtype=torch.bfloat16), code, 128, torch.float32), {}
    yield "quantize_blockwise", (torch.randn(1000), dynamic, 256), {}
    yield "quantize_blockwise", (torch.rand(1000), dynamic, 256, torch.tensor(0.5)), {}
    yield (
        "dequantize_blockwise",
        (torch.randint(0, 256, (1000,), dtype=torch.uint8), torch.rand(4), dynamic, 256, torch.float16),
        {},
    )
    for nested in (False, True):
        packed, state, extra = _weight_args(nested)
        yield "dequantize_4bit", (packed, state.absmax, state.code, 64, [48, 96], torch.bfloat16), extra
        x = torch.randn(5, 96, requires_grad=True)
        yield (
            "linear_4bit",
            (x, packed, state.absmax, state.code, 64, [48, 96], torch.randn(48, requires_grad=True)),
            extra,
        )
    # a weight in fourbit.layout's tiles: the op reads it as the tiles it is
    packed, state = F4.quantize_4bit(torch.randn(48, 128), quant_type="nf4")
    tiled = layout.tile(packed, (48, 128))
    x = torch.randn(5, 128, requires_grad=True)
    yield "linear_4bit", (x, tiled, state.absmax, state.code, 64, [48, 128], None), {"tiled": True}
    yield "dequantize_4bit", (tiled, state.absmax, state.code, 64, [48, 128], torch.float16), {"tiled": True}


@pytest.mark.parametrize("case", list(_cases()), ids=lambda case: case[0])
def test_opcheck(case):
    name, args, kwargs = case
    torch.library.opcheck(getattr(torch.ops.fourbit, name).default, args, kwargs)


def test_fake_shapes_match_real_shapes():
    packed, state, extra = _weight_args(nested=True, storage=torch.bfloat16)
    x = torch.randn(2, 7, 96)
    real = torch.ops.fourbit.linear_4bit(x, packed, state.absmax, state.code, 64, [48, 96], None, **extra)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x = mode.from_tensor(x)
        fake = torch.ops.fourbit.linear_4bit(fake_x, packed, state.absmax, state.code, 64, [48, 96], None, **extra)
        fake_q, fake_absmax = torch.ops.fourbit.quantize_4bit(
            mode.from_tensor(torch.randn(3, 37)), state.code, 32, torch.uint8
        )
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert fake_q.shape == (56, 1) and fake_absmax.shape == (4,)


def test_linear_op_compiles_without_graph_breaks():
    packed, state, extra = _weight_args(nested=True)

    def f(x):
        return torch.ops.fourbit.linear_4bit(x, packed, state.absmax, state.code, 64, [48, 96], None, **extra).relu()

    x = torch.randn(4, 96)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_op_schemas_match_the_golden_file():
    """Compiled graphs and exported programs hold these schemas: they must not change unnoticed."""
    from pathlib import Path

    golden = (Path(__file__).parent / "data" / "op_schemas.txt").read_text().splitlines()
    names = [line.split("(", 1)[0].removeprefix("fourbit::") for line in golden]
    assert names == sorted(names) and len(names) == 5
    assert [str(getattr(torch.ops.fourbit, name).default._schema) for name in names] == golden


def test_eager_calls_skip_the_dispatcher_and_never_import_dynamo():
    """Eager quantize, dequantize and Linear4bit on plain tensors go straight to the kernels: the
    first call costs no import of torch._dynamo (which a custom op's first call makes)."""
    import subprocess
    import sys

    code = """
import sys, torch
import fourbit.functional as F
from fourbit.nn import Linear4bit
packed, state = F.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
F.dequantize_4bit(packed, state)
codes, state8 = F.quantize_blockwise(torch.randn(300))
F.dequantize_blockwise(codes, state8)
with torch.no_grad():
    Linear4bit(64, 32).to("cpu")(torch.randn(2, 64))
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_run_goes_through_the_op_for_fake_tensors_and_gradients():
    code = get_4bit_type("nf4")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        packed, absmax = ops_module.run("quantize_4bit", mode.from_tensor(torch.randn(4, 64)), code, 64, torch.uint8)
    assert packed.shape == (128, 1) and absmax.shape == (4,)
    calls = []
    original = ops_module._kernels[("quantize_4bit", "cpu")]
    try:
        ops_module._kernels[("quantize_4bit", "cpu")] = lambda *args: calls.append(args) or original(*args)
        ops_module.run("quantize_4bit", torch.randn(4, 64), code, 64, torch.uint8)
        assert len(calls) == 1  # plain eager: straight to the kernel
        ops_module.run("quantize_4bit", torch.randn(4, 64, requires_grad=True), code, 64, torch.uint8)
        assert len(calls) == 1  # gradients recorded: through the op (whose kernel is the registered one)
    finally:
        ops_module._kernels[("quantize_4bit", "cpu")] = original


def test_triton_older_than_the_verified_minimum_is_not_used(monkeypatch):
    monkeypatch.delenv("FOURBIT_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(triton_support, "triton_version", lambda: (3, 3))
    assert not ops_module.triton_enabled()
    monkeypatch.setattr(triton_support, "triton_version", lambda: ops_module.MIN_TRITON)
    assert ops_module.triton_enabled()
    monkeypatch.setattr(triton_support, "triton_version", lambda: None)
    assert not ops_module.triton_enabled()
