"""Which path a native CPU product takes (fused register kernels, chunks of decode + GEMM, the
16-bit GEMMs oneDNN has), by rows, dtype and variant, and that each gives the reference's product
and changes nothing the user can read."""

from __future__ import annotations

import math

import pytest
import torch
from cpu_native_cases import BEST, VARIANTS, each_variant, prepared_of, sample_weight
from helpers import describe_dtype

import fourbit.functional as F4
from fourbit.kernels import cpu, reference
from fourbit.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no working C++ compiler here")

variant = pytest.fixture(params=VARIANTS)(each_variant)


def test_the_fast_path_changes_nothing_the_user_can_read():
    layer = torch.nn.Linear(256, 128, dtype=torch.bfloat16)
    from fourbit.nn import Linear4bit

    quantized = Linear4bit(256, 128, compute_dtype=torch.bfloat16, quant_type="nf4")
    quantized.load_state_dict(layer.state_dict())
    quantized = quantized.to("cpu").eval()
    before_state = {key: value.clone() for key, value in quantized.state_dict().items()}
    before_weight = F4.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    with torch.no_grad():
        quantized(torch.randn(1, 256, dtype=torch.bfloat16))
    after = quantized.state_dict()
    assert list(after) == list(before_state)
    assert all(torch.equal(after[key], before_state[key]) for key in after)
    assert torch.equal(F4.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state), before_weight)


@pytest.mark.parametrize(
    "rows", [cpu.fused_max_rows(BEST, torch.bfloat16) + 8, cpu.AMX_MAX_ROWS + 20, cpu.COLUMN_SLICE_ROWS + 20]
)
def test_many_rows_decode_chunk_by_chunk_into_the_gemm(monkeypatch, rows):
    """Rows past the fused kernels' limits (``cpu.fused_max_rows``, or ``cpu.amx_max_rows`` with
    AMX): transposed chunk outputs below COLUMN_SLICE_ROWS, column slices from it."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1 << 21)
    calls = []
    chunked = cpu.PreparedWeight._chunked
    monkeypatch.setattr(cpu.PreparedWeight, "_chunked", lambda self, *args: calls.append(1) or chunked(self, *args))
    shape = (600, 4096)  # three chunks of decoded bfloat16 weight (256 rows each)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    bias = torch.randn(shape[0], dtype=torch.bfloat16)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.bfloat16, **arguments)
    expected = torch.nn.functional.linear(x, weight, bias)
    out = prepared.linear(x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, shape[0])
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)
    # the chunked path ran unless the rows fit the AMX kernel
    assert calls == ([] if native.isa() == native.AMX and rows <= cpu.amx_max_rows(*shape, x.dtype) else [1])


def test_the_amx_limits_follow_the_weight_and_the_input_size():
    """bfloat16: large weights stay on the tile unit for more rows; float32 rows (in bfloat16
    parts) have no limit; each call takes whole tiles of rows whose input fits
    ``AMX_PIECE_BYTES``, float32 rows counting their two parts."""
    assert cpu.amx_max_rows(1024, 1024, torch.bfloat16) == cpu.AMX_MAX_ROWS
    assert cpu.amx_max_rows(4096, 4096, torch.bfloat16) == cpu.AMX_LARGE_WEIGHT_MAX_ROWS > cpu.AMX_MAX_ROWS
    assert cpu.amx_max_rows(4096, 4096, torch.float32) == math.inf
    assert cpu.amx_piece_rows(4096, torch.bfloat16) == cpu.AMX_PIECE_BYTES // 8192 == 128
    assert cpu.amx_piece_rows(11008, torch.bfloat16) == 32  # 47 rows fit: whole tiles of 16
    assert cpu.amx_piece_rows(1 << 20, torch.bfloat16) == 16
    assert cpu.amx_piece_rows(4096, torch.float32) == 64


@pytest.mark.skipif(native.isa() != native.AMX, reason="this CPU has no AMX tiles (or Linux does not grant them)")
@pytest.mark.parametrize("rows", [32, 80])
def test_a_long_input_runs_on_the_tile_unit_a_piece_at_a_time(rows):
    """K of 16384 in bfloat16: 32 rows (1 MiB of input) in one call, 80 in calls of 32, 32 and
    16 rows, whose outputs are each piece's own product bit for bit, and the reference's."""
    shape = (32, 16384)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    calls, kernel = [], prepared._linear
    prepared._linear = lambda *args: calls.append(args[4]) or kernel(*args)
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    bias = torch.randn(shape[0], dtype=torch.bfloat16)
    out = prepared.linear(x, bias)
    assert calls == ([32] if rows == 32 else [32, 32, 16])
    pieces = [prepared.linear(x[start : start + 32], bias) for start in range(0, rows, 32)]
    assert torch.equal(out, torch.cat(pieces))
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.bfloat16, **arguments)
    truth = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(out.double(), truth, rtol=2e-2, atol=8e-2)


def test_the_register_decoding_limit_follows_the_variant_and_dtype():
    """The AVX-512 kernels take more rows than the AVX2 and portable ones before decode + GEMM;
    bfloat16 only with AVX512-BF16. AVX2 takes more 16-bit rows than float32 ones."""
    assert cpu.AVX512_FUSED_MAX_ROWS > cpu.AVX2_16_BIT_FUSED_MAX_ROWS > cpu.FUSED_MAX_ROWS
    assert cpu.fused_max_rows(native.ISA_NAMES.index("avx2"), torch.float32) == cpu.FUSED_MAX_ROWS
    for dtype in (torch.bfloat16, torch.float16):
        assert cpu.fused_max_rows(native.ISA_NAMES.index("avx2"), dtype) == cpu.AVX2_16_BIT_FUSED_MAX_ROWS
    assert cpu.fused_max_rows(native.ISA_NAMES.index("portable"), torch.float16) == cpu.FUSED_MAX_ROWS
    assert cpu.fused_max_rows(native.AVX512, torch.bfloat16) == cpu.FUSED_MAX_ROWS
    for isa in (native.AVX512, native.AVX512_BF16, native.AMX):
        for dtype in (torch.float32, torch.float16):
            assert cpu.fused_max_rows(isa, dtype) == cpu.AVX512_FUSED_MAX_ROWS
    assert cpu.fused_max_rows(native.AVX512_BF16, torch.bfloat16) == cpu.AVX512_FUSED_MAX_ROWS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=describe_dtype)
@pytest.mark.parametrize("chunk_bytes", [cpu.CHUNK_BYTES, 1 << 16], ids=["one-chunk", "chunks"])
def test_16_bit_rows_past_the_register_limit_multiply_in_float32_without_16_bit_gemms(monkeypatch, dtype, chunk_bytes):
    """Decode + GEMM of 16-bit rows: the chunk decoded in the input's dtype (the reference's
    weights) and, where oneDNN has no GEMM of that dtype, multiplied in float32; the output has
    the input's dtype either way (written by columns in one chunk, transposed from several)."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", chunk_bytes)
    shape = (300, 512)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=dtype, **arguments)
    x = torch.randn(40, shape[1]).to(dtype)
    bias = torch.randn(shape[0]).to(dtype)
    truth = x.double() @ weight.double().t() + bias.double()
    seen = []  # the dtype each GEMM multiplied in (F.linear's weight, addmm's first factor)
    addmm, linear = torch.addmm, torch.nn.functional.linear

    def spy(gemm):
        return lambda *args, **kwargs: seen.append(args[1].dtype) or gemm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy(addmm))
    monkeypatch.setattr(torch.nn.functional, "linear", spy(linear))
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # the output's rounding
    for gemm in (torch.float32, dtype):
        monkeypatch.setattr(cpu, "gemm_dtype", lambda d, gemm=gemm: gemm if d == dtype else d)
        monkeypatch.setattr(cpu, "FUSED_MAX_ROWS", 4)
        monkeypatch.setattr(cpu, "AVX512_FUSED_MAX_ROWS", 4)
        monkeypatch.setattr(cpu, "AMX_MAX_ROWS", 4)  # bfloat16 rows go to the tile unit otherwise
        out = prepared.linear(x, bias)
        assert out.dtype == dtype and out.shape == (40, shape[0]) and out.is_contiguous()
        torch.testing.assert_close(out.double(), truth, rtol=tolerance, atol=tolerance)
        assert seen[-1] == gemm


def test_16_bit_gemms_are_used_where_onednn_has_them():
    for dtype, probe in ((torch.float16, "_is_mkldnn_fp16_supported"), (torch.bfloat16, "_is_mkldnn_bf16_supported")):
        has = getattr(torch.ops.mkldnn, probe, None)
        assert cpu.gemm_dtype(dtype) == (dtype if has is not None and has() else torch.float32)
    assert cpu.gemm_dtype(torch.float32) == torch.float32


def _product_and_path(monkeypatch, rows, dtype):
    """A 48x512 product of ``rows`` rows of ``dtype``: its output and the float64 product with the
    reference's weights, and whether it decoded chunks for a GEMM ([1]) or not ([])."""
    calls = []
    chunked = cpu.PreparedWeight._chunked
    monkeypatch.setattr(cpu.PreparedWeight, "_chunked", lambda self, *args: calls.append(1) or chunked(self, *args))
    shape = (48, 512)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=dtype, **arguments)
    x = torch.randn(rows, shape[1]).to(dtype)
    return prepared.linear(x).double(), x.double() @ weight.double().t(), calls


@pytest.mark.parametrize("rows", [13, 24, 25])
def test_rows_past_twelve_take_the_register_kernels_where_they_win(monkeypatch, variant, rows):
    """Whether a product of ``rows`` rows decodes chunks for the GEMM follows ``fused_max_rows``
    of the running variant, and both paths give the reference's product."""
    out, truth, calls = _product_and_path(monkeypatch, rows, torch.float32)
    torch.testing.assert_close(out, truth, rtol=1e-4, atol=4e-4)
    amx = native.isa() == native.AMX and rows >= 4 and torch.get_float32_matmul_precision() != "highest"
    expected = [] if amx or rows <= cpu.fused_max_rows(native.isa(), torch.float32) else [1]
    assert calls == expected


@pytest.mark.skipif(BEST < native.AVX2, reason="this CPU has no AVX2")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
@pytest.mark.parametrize("rows", [13, 16, 17])
def test_avx2_decodes_16_bit_rows_in_registers_up_to_its_limit(monkeypatch, dtype, rows):
    """On AVX2, bfloat16 and float16 products of 13-16 rows take the register kernel, more rows
    decode + GEMM; both give the reference's product within the output's rounding."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", "avx2")
    native.refresh_isa()
    try:
        out, truth, calls = _product_and_path(monkeypatch, rows, dtype)
        tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # the output's rounding
        torch.testing.assert_close(out, truth, rtol=tolerance, atol=tolerance)
        assert calls == ([] if rows <= cpu.AVX2_16_BIT_FUSED_MAX_ROWS else [1])
    finally:
        monkeypatch.undo()
        native.refresh_isa()


@pytest.mark.skipif(native.isa() != native.AMX, reason="this CPU has no AMX tiles (or Linux does not grant them)")
def test_float32_rows_in_bfloat16_parts_stay_on_the_tile_unit_at_any_row_count(monkeypatch):
    """At "high" precision 600 float32 rows of K=4096 run on the tile unit in calls of 64 rows
    (their two bfloat16 parts within 1 MiB), never decode + GEMM, at the split's accuracy."""
    chunked_calls, chunked = [], cpu.PreparedWeight._chunked
    monkeypatch.setattr(
        cpu.PreparedWeight, "_chunked", lambda self, *args: chunked_calls.append(1) or chunked(self, *args)
    )
    shape = (48, 4096)
    packed, arguments = sample_weight(shape, "nf4", 64, True)
    prepared = prepared_of(packed, 64, shape, arguments)
    calls, kernel = [], prepared._linear
    prepared._linear = lambda *args: calls.append(args[4]) or kernel(*args)
    x = torch.randn(600, shape[1])
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out = prepared.linear(x)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert chunked_calls == [] and calls == [64] * 9 + [24]
    weight = reference.dequantize_4bit(packed, blocksize=64, shape=shape, dtype=torch.float64, **arguments)
    truth = x.double() @ weight.t()
    # three bfloat16 products: about 5e-6 of the largest output (docs/kernels.md)
    assert (out.double() - truth).abs().max() <= 2e-5 * truth.abs().max()
