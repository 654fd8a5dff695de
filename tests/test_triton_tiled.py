"""Every Triton product kernel on weights in ``fourbit.layout``'s tiles, against the same kernel on
the weight in rows and against a float64 reference.

Without a GPU the interpreter runs the kernels it can (the CUDA-core product and the decode +
matmul path); on a GPU every kernel is forced in turn. The shared cases: ``triton_cases.py``.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from helpers import describe_dtype

pytest.importorskip("triton")

from triton_cases import (
    DEVICE,
    INTERPRETED,
    NEEDS_TRITON,
    ON_GPU,
    case_turn,
    code_table,
    in_turn,
    nested_statistics,
    pairwise_cases,
)

from fourbit import layout
from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import tuning

pytestmark = NEEDS_TRITON

#: (N, K, blocksize): rows that fill no program, one row group, K of one and of many splits,
#: blocks of one step up to whole rows.
if ON_GPU:
    WEIGHTS = [(48, 256, 64), (112, 4096, 128), (144, 4096, 4096), (1040, 2816, 64)]
else:
    WEIGHTS = [(48, 256, 64), (16, 512, 256), (32, 256, 256)]

#: Forced configurations on a GPU: the fragment kernel with and without K splits, the tensor-core
#: kernel with both scalings and split K, batch-wide tiles, the CUDA-core kernel, decode + cuBLAS.
GPU_CONFIGS = [
    ("fragments", 4, 1),
    ("fragments", 2, 3),
    ("fragments", 4, 1, 4),
    ("fragments", 4, 1, 2, 1),
    ("fused", 128, 16, 64, 1, 4, 4, False),
    ("fused", 128, 64, 64, 2, 4, 4, True),
    ("fused", 64, 64, 64, 1, 4, 4, False),  # the H200's programs for weights of few rows
    tuning.HOPPER.wide,
    tuning.HOPPER.wide._replace(split_k=4),  # batch-wide tiles with K split (long K, few weight rows)
    (4, 16, 512, 0, 4, "half"),
    "chunked",
]
#: The forced configurations that sum nothing across programs, so tiles give the same bits as rows.
UNSPLIT_CONFIGS = (("fragments", 4, 1), ("fragments", 4, 1, 4), ("fragments", 4, 1, 2, 1))


@functools.cache
def _weights(quant_type: str, n: int, k: int, blocksize: int, nested: bool):
    code = code_table(quant_type)
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, nested)
    dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
    return code, packed, absmax, extra, dense


def _rows_for(config) -> tuple[int, ...]:
    if not isinstance(config, tuple):
        return (1, 17, 70)
    if config[0] == "fragments":
        return (1, 3, 16)
    if config[0] == "wide":
        return (70, 200)
    if config[0] == "fused":
        return (1, 17, 64)
    return (1, 4)


#: Forced configurations on a GPU (pairwise: triton_cases.pairwise_cases); the interpreter runs
#: the library's own choice with every dtype and statistics.
TILE_CASES = (
    pairwise_cases(GPU_CONFIGS)
    if ON_GPU
    else [(None, dtype, nested) for dtype in (torch.bfloat16, torch.float16) for nested in (False, True)]
)


@pytest.mark.parametrize(("config", "dtype", "nested"), TILE_CASES)
def test_every_kernel_reads_tiles_as_it_reads_rows(config, dtype, nested):
    """The same products from the tiled bytes as from rows (bit for bit where nothing is summed
    across programs), and both close to a float64 reference. On a GPU each weight takes half the
    row counts, the configuration's other case the other half."""
    turn = case_turn(GPU_CONFIGS, config, dtype) if ON_GPU else None
    for quant_type, (index, (n, k, blocksize)) in itertools.product(["nf4", "fp4"], enumerate(WEIGHTS)):
        code, packed, absmax, extra, dense = _weights(quant_type, n, k, blocksize, nested)
        tiled = layout.tile(packed, (n, k))
        for rows in _rows_for(config) if turn is None else in_turn(_rows_for(config), turn + index):
            input_dtype = torch.float32 if isinstance(config, tuple) and config[-1] == "half" else dtype
            x = torch.randn(rows, k, device=DEVICE).to(input_dtype)
            bias = torch.randn(n, device=DEVICE).to(input_dtype)
            arguments = (absmax, code, blocksize, (n, k), bias)
            out = kernels.linear_4bit(x, tiled, *arguments, **extra, tiled=True, config=config)
            expected = kernels.linear_4bit(x, packed, *arguments, **extra, config=config)
            if config in UNSPLIT_CONFIGS or INTERPRETED:  # nothing summed across programs
                assert torch.equal(out, expected), (quant_type, n, k, blocksize, rows)
            else:  # K splits add in any order; decode + cuBLAS chunks the rows differently
                torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
            reference_out = x.double() @ dense.t() + bias.double()
            error = ((out.double() - reference_out).norm() / reference_out.norm()).item()
            assert error < 1e-2, (config, quant_type, n, k, blocksize, rows, error)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_the_chunked_decode_of_tiles_writes_every_row_where_it_belongs(nested, monkeypatch):
    """Decode + matmul over chunks of whole row groups of tiles (small chunks forced): the decode
    kernel reads tiles in memory order and writes each value at its row and column."""
    n, k, blocksize = (1040, 4096, 64) if ON_GPU else (80, 256, 64)
    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 24 * k * 4)  # chunks of a few row groups
    code, packed, absmax, extra, _ = _weights("nf4", n, k, blocksize, nested)
    x = torch.eye(k, device=DEVICE)[:40].to(torch.bfloat16 if ON_GPU else torch.float32)
    arguments = (absmax, code, blocksize, (n, k))
    out = kernels.linear_4bit(x, layout.tile(packed, (n, k)), *arguments, **extra, tiled=True, config="chunked")
    assert torch.equal(out, kernels.linear_4bit(x, packed, *arguments, **extra, config="chunked"))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=describe_dtype)
def test_dequantize_reads_tiles_bit_for_bit(nested, dtype):
    """The dequantize op's kernel decodes a tiled weight to exactly the values of the same weight
    in rows, also from tiles that do not start on a 4-byte boundary (converted first)."""
    for n, k, blocksize in WEIGHTS[:3]:
        code, packed, absmax, extra, _ = _weights("nf4", n, k, blocksize, nested)
        arguments = (absmax, code, blocksize, (n, k), dtype)
        expected = kernels.dequantize_4bit(packed, *arguments, **extra)
        tiled = layout.tile(packed, (n, k))
        assert torch.equal(kernels.dequantize_4bit(tiled, *arguments, **extra, tiled=True), expected)
        shifted = torch.empty(tiled.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:]
        shifted.copy_(tiled.reshape(-1))
        assert torch.equal(kernels.dequantize_4bit(shifted, *arguments, **extra, tiled=True), expected)
