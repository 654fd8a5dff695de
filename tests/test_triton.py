"""The Triton kernels against the reference: bit-exact quantize/dequantize, matmul within tolerance.

On a machine with a GPU these run the compiled kernels on CUDA over the large awkward shapes.
Without one (CI) they run the same kernels through Triton's interpreter (TRITON_INTERPRET=1) on
CPU tensors over small shapes, which checks the kernels' indexing and arithmetic. The
interpreter rounds float32 -> bfloat16 by truncation and has a broken half-precision dot, so
there bf16 outputs are compared within one bf16 step and products are computed in float32.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from helpers import DTYPES, STORAGES, assert_same_bits, describe_dtype

ON_GPU = torch.cuda.is_available()  # without a GPU, conftest.py turns on TRITON_INTERPRET
pytest.importorskip("triton")

from fourbit.formats import create_dynamic_map, get_4bit_type  # noqa: E402
from fourbit.kernels import reference  # noqa: E402
from fourbit.kernels import triton as kernels  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not ON_GPU and not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")

# (300, 64): at blocksize 32 more than 256 blocks, so nested statistics span several groups
QUANT_SHAPES = [(1,), (7,), (3, 37), (130,), (2, 97), (5, 7, 9), (300, 64)]
if ON_GPU:
    QUANT_SHAPES += [(4099,), (255, 4097), (11008, 4096), (1, 14337)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096] if ON_GPU else [32, 64, 256, 4096]


def _table(quant_type: str) -> torch.Tensor:
    return get_4bit_type(quant_type, device=DEVICE)


def _data(shape, dtype, special: bool) -> torch.Tensor:
    data = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    flat = data.view(-1)
    flat[::7] = 0
    if special and flat.numel() > 70:
        flat[:64] = 0  # a whole zero block for small blocksizes
        flat[65] = float("nan")
        flat[-2] = float("inf")
    return data


def _statistics(absmax: torch.Tensor, nested: bool) -> tuple[torch.Tensor, dict]:
    """The absmax argument and nested-statistics keyword arguments of a (nested) 4-bit state."""
    if not nested:
        return absmax, {}
    dynamic = create_dynamic_map().to(DEVICE)
    offset = absmax.mean()
    codes, scale = reference.quantize_blockwise(absmax - offset, dynamic, 256)
    return codes, dict(nested_absmax=scale, nested_code=dynamic, nested_offset=offset, nested_blocksize=256)


def _close_or_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if INTERPRETED and expected.dtype == torch.bfloat16:
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=0, equal_nan=True)
    else:
        assert_same_bits(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("special", [False, True], ids=["normal", "special"])
def test_quantize_is_bit_exact(dtype, quant_type, special):
    code = _table(quant_type)
    for shape, blocksize in itertools.product(QUANT_SHAPES, BLOCKSIZES):
        data = _data(shape, dtype, special)
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
        data = _data(shape, dtype, special)
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
def test_quantize_programs_loop_over_many_tiles(monkeypatch, blocksize):
    """Each program of the persistent quantizer codes every programs-th tile while the next one
    loads: with one-block tiles and three programs per multiprocessor, every program takes five
    tiles (the last one partial), which the small default-configured inputs never do."""
    from fourbit.kernels.triton import quantize as triton_quantize

    monkeypatch.setattr(triton_quantize, "QUANTIZE_TILE_ELEMENTS", blocksize)
    monkeypatch.setattr(triton_quantize, "QUANTIZE_WARPS", 1)
    monkeypatch.setattr(triton_quantize, "QUANTIZE_PROGRAMS_PER_SM", 3)
    programs = triton_quantize._program_limit(torch.device(DEVICE))
    code = _table("nf4")
    data = _data((blocksize * (5 * programs - 2) + 5,), torch.float16, special=True)
    expected_packed, expected_absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
    packed, absmax = kernels.quantize_4bit(data, code, blocksize, torch.uint8)
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
    code = _table(quant_type)
    for shape, blocksize in itertools.product(QUANT_SHAPES, BLOCKSIZES):
        data = _data(shape, dtype, special=False)
        packed, absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
        absmax, extra = _statistics(absmax, nested)
        expected = reference.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, **extra)
        _close_or_exact(kernels.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, **extra), expected)


@pytest.mark.parametrize("storage", STORAGES, ids=describe_dtype)
def test_every_quant_storage(storage):
    code = _table("nf4")
    data = _data((4, 64), torch.float32, special=False)
    packed, absmax = kernels.quantize_4bit(data, code, 64, storage)
    expected, _ = reference.quantize_4bit(data, code, 64, storage)
    assert packed.dtype == storage and packed.shape == expected.shape
    assert torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    assert_same_bits(
        kernels.dequantize_4bit(packed, absmax, code, 64, (4, 64), torch.float32),
        reference.dequantize_4bit(packed, absmax, code, 64, (4, 64), torch.float32),
    )


if ON_GPU:
    ROWS = [1, 3, 17, 64, 255, 2048]
    WEIGHTS = [(64, 64), (100, 100), (4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336),
               (100, 4096), (4096, 100)]  # fmt: skip
else:
    ROWS = [1, 3, 17]
    # (300, 64) has more than 256 blocks at blocksize 32; (8, 2304) has several K tiles of every kernel
    WEIGHTS = [(64, 64), (33, 100), (40, 96), (17, 128), (300, 64), (8, 2304)]


@pytest.mark.parametrize("dtype", DTYPES, ids=describe_dtype)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("rows", ROWS)
def test_linear_matches_a_float64_reference(dtype, nested, rows):
    code = _table("nf4")
    for (n, k), blocksize in itertools.product(WEIGHTS, [64, 128] if ON_GPU else [32, 64]):
        weight = torch.randn(n, k, device=DEVICE)
        packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
        absmax, extra = _statistics(absmax, nested)
        x = torch.randn(rows, k, device=DEVICE).to(dtype)
        bias = torch.randn(n, device=DEVICE).to(dtype)
        out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        expected = x.double() @ dense.t() + bias.double()
        assert out.shape == (rows, n) and out.dtype == dtype
        assert not out.isnan().any()
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < (1e-3 if dtype == torch.float32 else 1e-2), (rows, n, k, blocksize, error)


def test_linear_handles_leading_dimensions_and_empty_inputs():
    code = _table("fp4")
    packed, absmax = reference.quantize_4bit(torch.randn(24, 64, device=DEVICE), code, 64, torch.uint8)
    x = torch.randn(2, 3, 64, device=DEVICE)
    out = kernels.linear_4bit(x, packed, absmax, code, 64, (24, 64))
    torch.testing.assert_close(out, reference.linear_4bit(x, packed, absmax, code, 64, (24, 64)), rtol=1e-2, atol=1e-2)
    assert kernels.linear_4bit(x[:0], packed, absmax, code, 64, (24, 64)).shape == (0, 3, 24)
    strided = torch.randn(64, 4, device=DEVICE).t()  # last dimension not contiguous
    torch.testing.assert_close(
        kernels.linear_4bit(strided, packed, absmax, code, 64, (24, 64)),
        reference.linear_4bit(strided, packed, absmax, code, 64, (24, 64)),
        rtol=1e-2,
        atol=1e-2,
    )


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


@pytest.mark.parametrize(
    "config",
    [
        (1, 32, 64, 1, 4, "gather"),
        (4, 16, 128, 3, 4, "gather"),
        (2, 64, 256, 0, 4, "select"),
        (16, 16, 64, 1, 4, "half"),
        "chunked",
    ],
    ids=str,
)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_every_kernel_configuration_is_correct(config, nested, monkeypatch):
    """The multiply-accumulate kernels (word and any-K, with and without split-K, gather and select
    lookups) and the chunked decode + matmul path (chunks forced small) on the same inputs."""
    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 2048)
    code = _table("nf4")
    rows = 3 if config == "chunked" else min(config[0], 3)
    for n, k, blocksize in [(40, 96, 32), (33, 100, 64), (64, 256, 64), (300, 64, 32)]:
        weight = torch.randn(n, k, device=DEVICE)
        packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
        absmax, extra = _statistics(absmax, nested)
        x = torch.randn(rows, k, device=DEVICE)
        bias = torch.randn(n, device=DEVICE)
        out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
        expected = reference.linear_4bit(x.double(), packed, absmax, code, blocksize, (n, k), bias.double(), **extra)
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < (2e-3 if "half" in config else 1e-5), (config, n, k, error)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        ("fused", 128, 16, 64, 1, 4, 4, False),
        ("fused", 128, 16, 64, 4, 4, 3, False),
        ("fused", 64, 32, 128, 1, 4, 3, False),  # two absmax blocks per K tile
        ("fused", 128, 64, 64, 2, 4, 4, True),
        ("fused", 64, 16, 256, 3, 4, 3, True),
        kernels.linear.WIDE_CONFIG,
        ("wide", 64, 64, 128, 4, 3),  # two absmax blocks per K tile, input rows beyond one tile
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_tensor_core_kernel_configurations(config, dtype, nested):
    """The byte-permute + tensor-core kernel, forced, over partial tiles in every dimension, every
    K-tile/absmax-block relation, split K, both scaling modes and batch-wide tiles, against a
    float64 reference."""
    for quant_type, (n, k, blocksize) in itertools.product(
        ["nf4", "fp4"], [(300, 256, 64), (100, 4096, 128), (4096, 64, 32), (17, 512, 256), (130, 4096, 4096)]
    ):
        code = _table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = _statistics(absmax, nested)
        for rows in (70, 200) if config[0] == "wide" else (1, 17, 70):  # the table routes more rows to "wide"
            x = torch.randn(rows, k, device=DEVICE).to(dtype)
            bias = torch.randn(n, device=DEVICE).to(dtype)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
            dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and not out.isnan().any()
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (quant_type, n, k, blocksize, rows, error)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [("fragments", 4, 1), ("fragments", 2, 3), ("fragments", 8, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_register_fragment_kernel_configurations(config, dtype, nested):
    """The register-fragment kernel, forced, over 1 to 16 input rows (one and two tiles, partial
    ones), weight rows that fill no warp, blocksizes from 64 to 4096, K splits that do and do not
    divide K, nested statistics whose blocks span rows, and strided inputs, against a float64
    reference."""
    for quant_type, (n, k, blocksize) in itertools.product(
        ["nf4", "fp4"],
        [
            (300, 256, 64),
            (100, 4096, 128),
            (17, 512, 256),
            (130, 4096, 4096),
            (33, 768, 64),
            (4096, 11008, 64),
        ],
    ):
        code = _table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = _statistics(absmax, nested)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        for rows in (1, 3, 8, 9, 16):
            # rows 2k apart; for 3 rows 2k + 8, which the kernel cannot read in place (it copies)
            x = torch.randn(rows, 2 * k + (8 if rows == 3 else 0), device=DEVICE).to(dtype)[:, -k:]
            bias = torch.randn(n, device=DEVICE).to(dtype)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and out.shape == (rows, n)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (quant_type, n, k, blocksize, rows, error)
            assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), "an element is off"


def test_register_fragment_kernel_refuses_unaligned_k():
    """Forced onto a K it cannot take (not a multiple of 256, or blocks shorter than 64 columns),
    the register-fragment kernel says so instead of reading the wrong absmax."""
    from fourbit.kernels.triton import fragments

    x = torch.zeros(1, 320, dtype=torch.bfloat16)
    for k, blocksize in [(320, 64), (256, 32)]:
        with pytest.raises(ValueError, match="multiple of 256"):
            weight = kernels.linear.PreparedWeight(
                torch.zeros(k // 2, dtype=torch.uint8), torch.zeros(k // blocksize), _table("nf4"), blocksize, (1, k)
            )
            fragments.fragment_launch(weight, x[:, :k], False, (4, 0), 1)


def test_kernel_choice_follows_rows_dtype_and_device():
    """16-bit inputs with K a multiple of the blocksize go to the tensor-core kernel on a GPU (up
    to the table's rows); float32, other K and the interpreter take the CUDA-core kernels."""
    choose = kernels.linear.choose_config
    bf16 = torch.zeros(8, 256, dtype=torch.bfloat16, device=DEVICE)
    if ON_GPU:
        assert choose(bf16, 512, 256, 64)[0] == "fragments"
        assert choose(bf16, 512, 256, 32)[0] == "fused"  # blocks shorter than the kernel's 64-column step
        assert choose(torch.zeros(17, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64)[0] == "fused"
        assert choose(torch.zeros(8, 320, dtype=torch.bfloat16, device=DEVICE), 512, 320, 64)[0] == "fused"  # K % 256
        assert choose(torch.zeros(65, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64) == "chunked"
    else:
        assert not kernels.linear.fused_supported(bf16, 256, 64)  # PTX does not run in the interpreter
        assert choose(bf16, 512, 256, 64) == "chunked"
    assert choose(bf16[:1], 512, 100, 64)[-1] == "half"  # K not a multiple of the blocksize
    assert choose(bf16[:2].float(), 512, 256, 64)[0] == 2


@pytest.mark.parametrize("processors", [66, 132])
def test_many_rows_take_wide_tiles_only_on_weights_that_fill_the_gpu(processors, monkeypatch):
    """Beyond the tensor-core table, up to WIDE_ROWS rows run the batch-wide tiles when their
    programs occupy WIDE_MIN_COVERAGE of the multiprocessors, and decode + cuBLAS otherwise; more
    rows always decode + cuBLAS. (The kernel's support is forced, so this runs without a GPU.)"""
    linear = kernels.linear
    monkeypatch.setattr(linear, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(linear, "_processors", lambda device: processors)
    most_fused = linear.FUSED_TABLE[-1][0]
    enough = math.ceil(linear.WIDE_MIN_COVERAGE * processors) * linear.WIDE_CONFIG[1]  # weight rows that fill it
    for rows in (most_fused + 1, linear.WIDE_ROWS):
        x = torch.zeros(rows, 4096, dtype=torch.bfloat16)
        assert linear.choose_config(x, enough, 4096, 64) == linear.WIDE_CONFIG
        assert linear.choose_config(x, enough - linear.WIDE_CONFIG[1], 4096, 64) == "chunked"
        assert linear.choose_config(x, 8 * enough, 4096, 64) == linear.WIDE_CONFIG
    assert linear.choose_config(torch.zeros(linear.WIDE_ROWS + 1, 4096), 8 * enough, 4096, 64) == "chunked"
    assert linear.choose_config(torch.zeros(most_fused, 4096), 8 * enough, 4096, 64)[0] == "fused"


def test_covering_splits_are_powers_of_two_that_cover_the_gpu_at_most_twice(monkeypatch):
    """Automatic K splits: the power of two at or below what gives every multiprocessor two programs."""
    monkeypatch.setattr(kernels.linear, "_processors", lambda device: 132)
    splits = {programs: kernels.linear._covering_splits(programs, torch.device("cpu")) for programs in range(1, 600)}
    for programs, split in splits.items():
        assert split & (split - 1) == 0, (programs, split)
        assert split <= max(1, -(-264 // programs)) < 2 * split, (programs, split)
    assert (splits[32], splits[112], splits[224], splits[448]) == (8, 2, 2, 1)


def test_derived_tables_follow_the_code_tensor():
    """A table derived from a code tensor is reused for that tensor, rebuilt after an in-place
    change, and never handed to another tensor (not even one at a freed table's address)."""
    from fourbit.kernels.triton.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    nf4 = _table("nf4")
    first = derived(nf4, "test-double", build)
    assert derived(nf4, "test-double", build) is first and len(builds) == 1
    nf4.mul_(1.0)  # bumps the version
    derived(nf4, "test-double", build)
    assert len(builds) == 2
    del nf4, first
    fp4 = _table("fp4")  # may reuse the freed address and id
    assert torch.equal(derived(fp4, "test-double", build), fp4 * 2)


@pytest.mark.gpu
def test_derived_tables_are_not_kept_from_a_graph_capture():
    from fourbit.kernels.triton.derived import _entries, derived

    code = _table("nf4")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        derived(code, "test-capture", lambda table: table * 2)
    assert (id(code), "test-capture") not in _entries


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_with_a_new_code_table_can_be_captured_in_a_graph(quant_type):
    """The quantizer's tables, built from a code tensor it has not seen, are made on the device
    inside the capture (no host copies), and the replay equals an eager call."""
    data = _data((257, 320), torch.bfloat16, special=True)
    expected = kernels.quantize_4bit(data, _table(quant_type), 64, torch.uint8)  # compiles the kernels
    fresh = _table(quant_type).clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = kernels.quantize_4bit(data, fresh, 64, torch.uint8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0])
    assert_same_bits(captured[1], expected[1])
