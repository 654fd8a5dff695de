"""The native CPU kernels (fourbit.kernels.cpu.native): each variant bit-exact in dequantize and
quantize and within the reference's tolerance in the product, odd shapes, threads and rows.
Which path a product takes: test_cpu_native_paths.py. Building them (cache, fallback,
switches): test_cpu_build.py."""

from __future__ import annotations

import threading

import pytest
import torch
from cpu_native_cases import VARIANTS, bits, each_variant, prepared_of, sample_weight
from helpers import describe_dtype

import fourbit.functional as F4
from fourbit.kernels import cpu, reference
from fourbit.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no working C++ compiler here")

variant = pytest.fixture(params=VARIANTS)(each_variant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_dequantize_is_bit_identical_for_every_variant(variant, quant_type, nested, blocksize):
    for shape in [(64, 256), (33, 77), (1, 4096 + 5)]:  # whole blocks, a short last block, an odd count
        packed, arguments = sample_weight(shape, quant_type, blocksize, nested)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            expected = reference.dequantize_4bit(packed, blocksize=blocksize, shape=shape, dtype=dtype, **arguments)
            got = cpu.dequantize_4bit(packed, blocksize=blocksize, shape=shape, dtype=dtype, **arguments)
            assert torch.equal(bits(got), bits(expected)), (shape, dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_the_widened_decode_gives_the_16_bit_values_as_float32(variant, nested, blocksize):
    """The many-rows path's decode for a float32 GEMM of 16-bit rows: each range's values rounded
    to bfloat16 or float16 as the reference decodes them, then widened, bit for bit, for ranges
    over several runs of a thread, from the weight's start or from a later block."""
    shape = (96, 4096)  # 24 nested groups of blocksize 64: runs of 16384 elements and a short one
    packed, arguments = sample_weight(shape, "nf4", blocksize, nested)
    arguments["absmax"] = arguments["absmax"].clone()
    if not nested:
        arguments["absmax"][3] = float("nan")  # a block of NaN
    prepared = prepared_of(packed, blocksize, shape, arguments)
    numel = shape[0] * shape[1]
    for dtype in (torch.bfloat16, torch.float16):
        expected = reference.dequantize_4bit(packed, blocksize=blocksize, shape=shape, dtype=dtype, **arguments)
        for first, count in [(0, numel), (blocksize * 3, numel - blocksize * 3), (8192, 3 * 16384 + blocksize)]:
            if first % blocksize or ((first + count) % blocksize and first + count != numel):
                continue
            out = torch.full((count,), 7.0)
            prepared._dequantize_range_widened(
                prepared._pointer, first, count, out.data_ptr(), native.dtype_code(dtype), native.isa(), 2
            )
            wanted = expected.reshape(-1)[first : first + count].float()
            assert torch.equal(bits(out), bits(wanted)), (dtype, first, count)


def test_dequantize_of_nan_and_infinite_statistics_matches_the_reference(variant):
    packed, arguments = sample_weight((8, 128), "nf4", 64, False)
    arguments["absmax"] = arguments["absmax"].clone()
    arguments["absmax"][1] = float("nan")
    arguments["absmax"][2] = float("inf")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = reference.dequantize_4bit(packed, blocksize=64, shape=(8, 128), dtype=dtype, **arguments)
        got = cpu.dequantize_4bit(packed, blocksize=64, shape=(8, 128), dtype=dtype, **arguments)
        assert torch.equal(bits(got), bits(expected)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_products_of_nan_and_infinite_statistics_match_the_reference(variant, dtype):
    """A block whose scale is NaN (of any payload, which rounding must not carry into the sign)
    or infinite (infinity times the table's zero is NaN) gives the NaN and infinite outputs the
    reference's decoded weight gives, and leaves the other weight rows alone, in the one-row
    kernels and those of several rows."""
    shape = (8, 256)  # four blocks a row: rows 0-2 hold the bad blocks
    packed, arguments = sample_weight(shape, "nf4", 64, False)
    arguments["absmax"] = arguments["absmax"].clone()
    arguments["absmax"][1] = float("nan")
    arguments["absmax"][9] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # all payload bits
    arguments["absmax"][6] = float("inf")
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=dtype, **arguments)
    for rows in (1, 3, 8):
        x = torch.rand(rows, shape[1]).add(0.5).to(dtype)  # positive: no inf - inf from the inputs
        out = cpu.linear_4bit(x, packed, blocksize=64, shape=shape, **arguments)
        truth = x.double() @ weight.double().t()
        assert torch.equal(out.isnan(), truth.isnan()), rows
        assert torch.equal(out.isinf(), truth.isinf()), rows
        assert out[:, 3:].isfinite().all()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[:, 3:].double(), truth[:, 3:], rtol=tolerance, atol=tolerance * 4)


@pytest.mark.parametrize("entries", [256, 200], ids=["full-table", "short-table"])
def test_every_nested_code_decodes_as_the_reference(variant, entries):
    """Each 8-bit code of the nested statistics, through the kernels' table lookup (a permute tree
    on AVX-512), including a table shorter than 256 entries (codes stay below its length)."""
    packed, arguments = sample_weight((64, 512), "nf4", 64, True)  # 512 blocks: two nested groups
    generator = torch.Generator().manual_seed(1)
    arguments["nested_code"] = torch.randn(entries, generator=generator)
    arguments["absmax"] = (torch.arange(512) * 7 % entries).to(torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        expected = reference.dequantize_4bit(packed, blocksize=64, shape=(64, 512), dtype=dtype, **arguments)
        got = cpu.dequantize_4bit(packed, blocksize=64, shape=(64, 512), dtype=dtype, **arguments)
        assert torch.equal(bits(got), bits(expected)), dtype
        for rows in (1, 3):  # the one-row kernel and the kernel of several
            x = torch.randn(rows, 512, generator=generator).to(dtype)
            product = cpu.linear_4bit(x, packed, blocksize=64, shape=(64, 512), **arguments)
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            truth = x.double() @ expected.double().t()
            torch.testing.assert_close(product.double(), truth, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 256), (1, 512), (40, 77), (7, 4096)], ids=str)
def test_the_product_is_within_the_reference_tolerance(variant, dtype, shape):
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.float64, **arguments)
    for rows in (1, 3, 4, 9, 17, 130):  # register rows of one, several passes; decode + GEMM past fused_max_rows
        x = torch.randn(rows, shape[1]).to(dtype)
        bias = torch.randn(shape[0]).to(dtype)
        out = cpu.linear_4bit(x, packed, blocksize=64, shape=shape, bias=bias, **arguments)
        assert out.dtype == dtype and out.shape == (rows, shape[0])
        # float64 truth from the weight decoded in the input's dtype, as the reference multiplies it
        truth = x.double() @ weight.to(dtype).double().t() + bias.double()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), truth, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.skipif("amx" not in VARIANTS, reason="this CPU has no AMX tiles (or Linux does not grant them)")
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_the_amx_product_is_within_the_reference_tolerance(monkeypatch, blocksize, nested):
    """bfloat16 rows on the tile unit: one input tile or several (the last padded), passes of four
    tiles, and weight rows beyond the last whole group of 16 (the vector kernel's)."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", "amx")
    native.refresh_isa()
    try:
        for shape in [(40, 512), (64, 1024)]:
            packed, arguments = sample_weight(shape, "nf4", blocksize, nested)
            weight = reference.dequantize_4bit(
                packed, blocksize=blocksize, shape=shape, dtype=torch.bfloat16, **arguments
            ).double()
            prepared = prepared_of(packed, blocksize, shape, arguments)
            for rows in (2, 5, 16, 17, 70, cpu.AMX_MAX_ROWS):
                x = torch.randn(rows, shape[1]).to(torch.bfloat16)
                bias = torch.randn(shape[0]).to(torch.bfloat16)
                out = prepared.linear(x, bias)
                assert out.dtype == torch.bfloat16 and out.shape == (rows, shape[0])
                truth = x.double() @ weight.t() + bias.double()
                torch.testing.assert_close(out.double(), truth, rtol=2e-2, atol=8e-2)
                # each row's result does not depend on the rows beside it
                assert torch.equal(prepared.linear(x[-2:], bias), out[-2:])
    finally:
        monkeypatch.undo()
        native.refresh_isa()


@pytest.mark.skipif("amx" not in VARIANTS, reason="this CPU has no AMX tiles (or Linux does not grant them)")
def test_float32_products_use_bfloat16_parts_only_where_torch_allows_them(monkeypatch):
    """float32 rows go to the tile unit (three bfloat16 products each) only when
    ``torch.get_float32_matmul_precision()`` is not "highest"; then within float32 GEMM's tolerance."""
    shape = (48, 1024)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.float64, **arguments)
    prepared = prepared_of(packed, 64, shape, arguments)
    x = torch.randn(70, shape[1])
    x[0, 0] = float("inf")  # a row that is not finite stays so, and leaves the others alone
    bias = torch.randn(shape[0])
    monkeypatch.setenv("FOURBIT_CPU_ISA", "avx512_bf16")
    native.refresh_isa()
    vector = prepared.linear(x, bias)
    monkeypatch.setenv("FOURBIT_CPU_ISA", "amx")
    native.refresh_isa()
    precision = torch.get_float32_matmul_precision()
    try:
        # "highest": float32 throughout, the vector kernel's results to the bit
        torch.testing.assert_close(prepared.linear(x, bias), vector, rtol=0, atol=0, equal_nan=True)
        torch.set_float32_matmul_precision("high")
        split = prepared.linear(x, bias)
    finally:
        torch.set_float32_matmul_precision(precision)
        monkeypatch.undo()
        native.refresh_isa()
    assert not torch.equal(split[1:], vector[1:])  # the tile unit ran
    assert torch.equal(split[0].isfinite(), vector[0].isfinite())
    truth = x[1:].double() @ weight.t() + bias.double()
    torch.testing.assert_close(split[1:].double(), truth, rtol=1e-4, atol=4e-4)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_float32_products_use_one_bfloat16_product_only_at_medium_precision(variant, rows):
    """At torch's "medium" float32 matmul precision the AVX512-BF16 kernels round float32 inputs
    and decoded weights to bfloat16 and sum their products in float32 (the output stays float32);
    "high" and "highest" keep float32 products, and so do the variants without AVX512-BF16."""
    shape = (40, 1024)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.float32, **arguments)
    prepared = prepared_of(packed, 64, shape, arguments)
    x = torch.randn(rows, shape[1])
    bias = torch.randn(shape[0])
    precision = torch.get_float32_matmul_precision()
    try:
        results = {}
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            results[setting] = prepared.linear(x, bias)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert results["medium"].dtype == torch.float32
    if variant == "amx" and rows >= 4:  # the tile unit's three products (the test above)
        return
    assert torch.equal(results["high"], results["highest"])
    if variant not in ("avx512_bf16", "amx"):
        assert torch.equal(results["medium"], results["highest"])
        return
    rounded = x.bfloat16().double() @ weight.bfloat16().double().t() + bias.double()
    exact = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(results["medium"].double(), rounded, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(results["medium"].double(), exact, rtol=1e-5, atol=1e-4)  # bfloat16 parts ran
    torch.testing.assert_close(results["highest"].double(), exact, rtol=1e-5, atol=1e-4)


def test_an_empty_batch_gives_an_empty_output():
    packed, arguments = sample_weight((16, 64), "nf4", 64, False)
    out = cpu.linear_4bit(torch.empty(0, 64), packed, blocksize=64, shape=(16, 64), **arguments)
    assert out.shape == (0, 16)


def test_results_do_not_depend_on_threads_and_concurrent_calls_agree():
    packed, arguments = sample_weight((512, 1024), "nf4", 64, True)
    prepared = prepared_of(packed, 64, (512, 1024), arguments)
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = prepared.linear(x)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(prepared.linear(x), single)
    finally:
        torch.set_num_threads(threads)
    results: list[torch.Tensor] = []
    workers = [threading.Thread(target=lambda: results.append(prepared.linear(x))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4 and all(torch.equal(result, single) for result in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_inputs_of_any_rank_and_layout_give_the_rows_of_a_2d_input(dtype):
    """A contiguous input of any rank is read in place, a strided one copied, many rows chunked:
    each gives, row for row, what its rows as one contiguous 2-D input give, in its own shape."""
    packed, arguments = sample_weight((64, 256), "nf4", 64, True)
    prepared = prepared_of(packed, 64, (64, 256), arguments)
    bias = torch.randn(64).to(dtype)
    base = torch.randn(4, 2, 3, 512).to(dtype)
    inputs = [
        base[..., :256].contiguous(),  # 3 leading dimensions, contiguous
        base[..., ::2],  # strided rows
        base[..., :256].transpose(0, 1),  # leading dimensions out of order
        base[0, 0, 0, :256].contiguous(),  # one row, 1-D
        torch.randn(2, cpu.AMX_MAX_ROWS + 1, 256).to(dtype),  # past the fused kernels: chunked
    ]
    for x in inputs:
        out = prepared.linear(x, bias)
        expected = prepared.linear(x.reshape(-1, 256).contiguous(), bias)
        assert out.shape == (*x.shape[:-1], 64) and out.is_contiguous()
        torch.testing.assert_close(out.reshape(-1, 64), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_a_row_gives_the_same_result_whatever_rows_come_with_it(variant, dtype):
    """The vector kernels (up to ``cpu.fused_max_rows`` rows, in passes of up to four or eight)
    sum every row the same way, so a row's result does not depend on the batch it came in.
    bfloat16 batches of two rows and more run on the tile unit (AMX) or take two or four weight
    rows a pass (AVX512-BF16), with one sum per row instead of two, and are compared from two
    rows on."""
    packed, arguments = sample_weight((64, 1024), "nf4", 64, True)
    prepared = prepared_of(packed, 64, (64, 1024), arguments)
    x = torch.randn(cpu.fused_max_rows(native.isa(), dtype), 1024).to(dtype)
    together = prepared.linear(x)
    smallest = 2 if variant in ("amx", "avx512_bf16") and dtype == torch.bfloat16 else 1
    for rows in (smallest, 3, 5, 8, 9):
        assert torch.equal(prepared.linear(x[:rows]), together[:rows]), rows
    assert torch.equal(prepared.linear(x[-smallest:]), together[-smallest:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_a_weight_row_gives_the_same_result_whatever_rows_come_with_it(variant, dtype):
    """Weight rows taken four at a time (AVX-512; two from eight bfloat16 rows with AVX512-BF16)
    or one: dropping the first rows regroups the others, and every row keeps its bits, for one
    input row and several."""
    k, blocksize = 1024, 64
    packed, arguments = sample_weight((7, k), "nf4", blocksize, False)
    rows = packed.view(7, k // 2)
    absmax = arguments["absmax"].view(7, k // blocksize)
    for inputs in (1, 5, 9):
        x = torch.randn(inputs, k).to(dtype)
        seven = prepared_of(packed, blocksize, (7, k), arguments).linear(x)
        for dropped in (1, 2, 3):
            left = 7 - dropped
            state = {**arguments, "absmax": absmax[dropped:].reshape(-1).clone()}
            rest = prepared_of(rows[dropped:].reshape(-1, 1).clone(), blocksize, (left, k), state).linear(x)
            assert torch.equal(seven[:, dropped:], rest), (inputs, dropped)


@pytest.mark.parametrize("first_block", [0, 3, 256, 300])
def test_a_range_decodes_like_the_same_slice_of_the_whole(first_block):
    shape = (40, 1024)  # 640 blocks of 64: nested groups of 256 blocks
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    whole = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.float32, **arguments).view(-1)
    count = 64 * 100
    out = torch.empty(count)
    prepared._dequantize_range(prepared._pointer, first_block * 64, count, out.data_ptr(), 0, native.isa(), 1)
    assert torch.equal(bits(out), bits(whole[first_block * 64 : first_block * 64 + count]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_quantize_is_bit_identical_with_the_reference(variant, quant_type, dtype, blocksize):
    code = F4.get_4bit_type(quant_type)
    torch.manual_seed(1)
    data = torch.randn(16, 4096) * torch.logspace(-3, 3, 16).view(-1, 1)
    data[0, :6] = torch.tensor([0.0, -0.0, 1e-40, float("inf"), -3.0, float("-inf")])
    data[1, :blocksize] = 0  # a zero block
    data[3, 11] = float("nan")
    data = data.to(dtype)
    packed, absmax = cpu.quantize_4bit(data, code, blocksize, torch.uint8)
    expected_packed, expected_absmax = reference.quantize_4bit(data, code, blocksize, torch.uint8)
    assert torch.equal(packed, expected_packed)
    assert torch.equal(absmax.isnan(), expected_absmax.isnan())
    assert torch.equal(absmax.nan_to_num(), expected_absmax.nan_to_num())


def test_quantize_threads_storage_and_partial_blocks():
    code = F4.get_4bit_type("nf4")
    data = torch.randn(300, 512)
    expected = reference.quantize_4bit(data, code, 64, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            got = cpu.quantize_4bit(data, code, 64, torch.bfloat16)
            assert got[0].dtype == torch.bfloat16 and torch.equal(
                got[0].view(torch.uint8), expected[0].view(torch.uint8)
            )
            assert torch.equal(got[1], expected[1])
    finally:
        torch.set_num_threads(threads)
    odd = torch.randn(3, 37)  # a short last block takes the compiled/reference path, with the same result
    got, expected = cpu.quantize_4bit(odd, code, 64, torch.uint8), reference.quantize_4bit(odd, code, 64, torch.uint8)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
