"""Triton quantize and dequantize against the reference, bit for bit.

The shared cases and the interpreter's limits: ``triton_cases.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DTYPES, STORAGES, assert_same_bits, describe_dtype

pytest.importorskip("triton")

from triton_cases import (
    BLOCKSIZES,
    DEVICE,
    NEEDS_TRITON,
    ON_GPU,
    QUANT_SHAPES,
    close_or_exact,
    code_table,
    nested_statistics,
    sample,
)

from fourbit import layout
from fourbit.formats import create_dynamic_map, get_4bit_type
from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import tuning

pytestmark = NEEDS_TRITON


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("special", [False, True], ids=["normal", "special"])
def test_quantize_is_bit_exact(dtype, quant_type, special):
    code = code_table(quant_type)
    for shape, blocksize in itertools.product(QUANT_SHAPES, BLOCKSIZES):
        data = sample(shape, dtype, special)
        expected_packed, expected_absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
        packed, absmax = kernels.quantize_4bit(data, code, blocksize, torch.uint8)
        assert torch.equal(packed, expected_packed), (shape, blocksize)
        assert_same_bits(absmax, expected_absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("special", [False, True], ids=["normal", "special"])
def test_blockwise_quantize_is_bit_exact(dtype, special):
    """The 8-bit quantizer of nested statistics (and of quantize_blockwise) matches the reference."""
    dynamic = create_dynamic_map().to(DEVICE)
    for shape, blocksize in itertools.product(QUANT_SHAPES, [256, 4096] if not ON_GPU else [64, 256, 1024, 4096]):
        data = sample(shape, dtype, special)
        if special and data.numel() > 200:
            data.view(-1)[130:140] = float("-inf")
            data.view(-1)[-1] = float("nan")
        expected_codes, expected_absmax = reference.quantize_blockwise(data, dynamic, blocksize)
        codes, absmax = kernels.quantize_blockwise(data, dynamic, blocksize)
        assert codes.shape == data.shape and torch.equal(codes, expected_codes), (shape, blocksize)
        assert_same_bits(absmax, expected_absmax)


@pytest.mark.parametrize("special", [False, True], ids=["normal", "special"])
def test_blockwise_quantize_subtracts_the_offset_like_the_reference(special):
    """Nested statistics are quantized around their mean: the kernel subtracts the offset itself
    (zero padding of a short block included) and matches ``quantize_blockwise(A - offset)``."""
    dynamic = create_dynamic_map().to(DEVICE)
    for n in (1, 200, 257, 1000):
        absmax = torch.rand(n, device=DEVICE) * 4 + 0.5
        if special and n > 100:
            absmax[3] = float("nan")
        offset = absmax[: n // 2 + 1].mean()  # not the mean of all: codes then differ from zero-centred ones
        expected = reference.quantize_blockwise(absmax - offset, dynamic, 256)
        assert torch.equal(reference.quantize_blockwise(absmax, dynamic, 256, offset)[0], expected[0])
        codes, scale = kernels.quantize_blockwise(absmax, dynamic, 256, offset)
        assert torch.equal(codes, expected[0]), n
        assert_same_bits(scale, expected[1])


def _edge_values(code: torch.Tensor) -> torch.Tensor:
    """Every value in [-1, 1] where the 4-bit quantizer's answer can change: each midpoint and its
    float32 neighbours, both ends of every cell of the quantizer's table, signed zeros, tiny and
    subnormal values, +-1."""
    from fourbit.kernels.triton.quantize import cell_bounds

    midpoints, _ = reference.sorted_code(code.float())
    ends = torch.cat(cell_bounds())
    near = torch.cat([midpoints, torch.nextafter(midpoints, midpoints + 1), torch.nextafter(midpoints, midpoints - 1)])
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 1.0, -1.0])
    values = torch.cat([near, ends, special])
    return values[values.abs() <= 1]


@pytest.mark.parametrize("blocksize", [32, 64])
def test_quantize_programs_loop_over_many_tiles(blocksize):
    """Each program of the persistent quantizer codes every programs-th tile while the next one
    loads: with one-block tiles and three programs per multiprocessor, every program takes five
    tiles (the last one partial), which the small default-configured inputs never do."""
    from fourbit.kernels.triton import quantize as triton_quantize
    from fourbit.kernels.triton.tuning import QuantizeConfig

    config = QuantizeConfig(tile_elements=blocksize, warps=1, programs_per_sm=3)
    programs = triton_quantize.program_limit(torch.device(DEVICE), config)
    code = code_table("nf4")
    data = sample((blocksize * (5 * programs - 2) + 5,), torch.float16, special=True)
    expected_packed, expected_absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
    packed, absmax = triton_quantize.quantize_4bit(data, code, blocksize, torch.uint8, config)
    assert torch.equal(packed, expected_packed)
    assert_same_bits(absmax, expected_absmax)


@pytest.mark.parametrize("table", ["nf4", "fp4", "uniform", "clustered"])
def test_quantize_codes_every_edge_like_the_reference(table):
    """Scaled values at every midpoint and cell boundary get the reference's code. NF4, FP4 and a
    uniform table take the cell table; a clustered table, whose close midpoints share cells,
    takes the comparison path; both are checked."""
    from fourbit.kernels.triton.quantize import _quantizer_tables

    if table in ("nf4", "fp4"):
        code = get_4bit_type(table)
    elif table == "uniform":  # with two -0.0 entries: a midpoint at -0.0
        code = torch.cat([torch.linspace(-1, 1, 14), torch.tensor([-0.0, -0.0])])
    else:  # unordered, eight values in each of [-0.6, -0.5] and [0.5, 0.6]
        spread = torch.rand(16, generator=torch.Generator().manual_seed(0)) / 10 + 0.5
        code = torch.where(torch.arange(16) % 2 == 0, spread, -spread)
    assert int(_quantizer_tables(code)[1]) == (table != "clustered")
    blocksize = 64
    # each block starts with 1.0: absmax 1, so the scaled value is the value itself; a last block
    # scaled by 1.0000001 puts a value one rounding above 1, and one holds NaN
    blocks = [torch.cat([torch.ones(1), block]) for block in _edge_values(code).split(blocksize - 1)]
    blocks += [torch.tensor([1.0000001, -1.0000001, 1.0, -1.0]), torch.tensor([float("nan"), 0.5])]
    data = torch.cat([torch.nn.functional.pad(block, (0, blocksize - block.numel())) for block in blocks])
    code = code.to(DEVICE)
    expected, _ = reference.quantize_4bit(data.to(DEVICE), code, blocksize, torch.uint8)
    packed, absmax = kernels.quantize_4bit(data.to(DEVICE), code, blocksize, torch.uint8)
    assert torch.equal(packed, expected)
    # decoding with the table: its -0.0 entries decode to +0.0, as in the reference
    shape = (data.numel(),)
    decoded = kernels.dequantize_4bit(packed, absmax, code, blocksize, shape, torch.float32)
    assert_same_bits(decoded, reference.dequantize_4bit(packed, absmax, code, blocksize, shape, torch.float32))
    if table == "uniform":
        assert not torch.signbit(decoded[decoded == 0]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_is_bit_exact(dtype, quant_type, nested):
    code = code_table(quant_type)
    for shape, blocksize in itertools.product(QUANT_SHAPES, BLOCKSIZES):
        data = sample(shape, dtype, special=False)
        packed, absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        expected = reference.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, **extra)
        close_or_exact(kernels.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, **extra), expected)


#: Every word-kernel program size in the tables, and one of 16 words a thread.
DEQUANTIZE_CONFIGS = sorted(
    {tables.dequantize for tables in tuning.TABLES.values()} | {tuning.DequantizeConfig(1024, 2)}
)


@pytest.mark.parametrize("config", DEQUANTIZE_CONFIGS, ids=lambda config: "{}x{}".format(*config))
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_is_bit_exact_with_every_tuned_program_size(config, nested, monkeypatch):
    """The word kernel's program size and warps (``tuning.KernelTables.dequantize``, per GPU)
    change only how the words are spread: rows and tiles decode to the reference's values."""
    tables = tuning.HOPPER._replace(dequantize=config)
    monkeypatch.setattr(tuning, "for_device", lambda device: tables)
    code = code_table("nf4")
    n, k = (1040, 4160) if ON_GPU else (48, 320)  # words for a partial last program of 256 and more
    for dtype in (torch.bfloat16, torch.float32):
        data = sample((n, k), dtype, special=False)
        packed, absmax = reference.quantize_4bit(data, code, 64, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        expected = reference.dequantize_4bit(packed, absmax, code, 64, (n, k), dtype, **extra)
        close_or_exact(kernels.dequantize_4bit(packed, absmax, code, 64, (n, k), dtype, **extra), expected)
        tiled = layout.tile(packed, (n, k))
        close_or_exact(kernels.dequantize_4bit(tiled, absmax, code, 64, (n, k), dtype, **extra, tiled=True), expected)


@pytest.mark.parametrize("storage", STORAGES, ids=describe_dtype)
def test_every_quant_storage(storage):
    code = code_table("nf4")
    data = sample((4, 64), torch.float32, special=False)
    packed, absmax = kernels.quantize_4bit(data, code, 64, storage)
    expected, _ = reference.quantize_4bit(data, code, 64, storage)
    assert packed.dtype == storage and packed.shape == expected.shape
    assert torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    assert_same_bits(
        kernels.dequantize_4bit(packed, absmax, code, 64, (4, 64), torch.float32),
        reference.dequantize_4bit(packed, absmax, code, 64, (4, 64), torch.float32),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_with_a_new_code_table_can_be_captured_in_a_graph(quant_type):
    """The quantizer's tables, built from a code tensor it has not seen, are made on the device
    inside the capture (no host copies), and the replay equals an eager call."""
    data = sample((257, 320), torch.bfloat16, special=True)
    expected = kernels.quantize_4bit(data, code_table(quant_type), 64, torch.uint8)  # compiles the kernels
    fresh = code_table(quant_type).clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = kernels.quantize_4bit(data, fresh, 64, torch.uint8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0])
    assert_same_bits(captured[1], expected[1])


@pytest.mark.gpu
def test_cuda_ops_dispatch_to_triton(monkeypatch):
    import fourbit
    import fourbit.functional as F4

    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    cpu_packed, cpu_state = F4.quantize_4bit(weight.cpu(), quant_type="nf4", compress_statistics=True)
    cpu_restored = F4.dequantize_4bit(cpu_packed, cpu_state)

    def reached(*args, **kwargs):
        raise AssertionError("the reference kernel ran for a CUDA tensor")

    for name in ("quantize_4bit", "dequantize_4bit", "linear_4bit"):
        monkeypatch.setattr(reference, name, reached)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.cpu(), cpu_packed)  # CUDA and CPU give the same bytes
    assert_same_bits(F4.dequantize_4bit(packed, state).cpu(), cpu_restored)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    assert fourbit.matmul_4bit(x, packed.t(), state).shape == (3, 256)
