"""The Triton products against a float64 reference (the choice among them: ``test_triton_dispatch.py``).

The shared cases and the interpreter's limits: ``triton_cases.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DTYPES, describe_dtype

pytest.importorskip("triton")

from triton_cases import (
    DEVICE,
    NEEDS_TRITON,
    ON_GPU,
    code_table,
    nested_statistics,
)

from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import dispatch

pytestmark = NEEDS_TRITON


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
    code = code_table("nf4")
    for (n, k), blocksize in itertools.product(WEIGHTS, [64, 128] if ON_GPU else [32, 64]):
        weight = torch.randn(n, k, device=DEVICE)
        packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
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
    code = code_table("fp4")
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


@pytest.mark.parametrize("rows", [1, 300])
def test_a_weight_without_columns_gives_the_bias(rows):
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(24, 0, device=DEVICE), code, 64, torch.uint8)
    x = torch.randn(rows, 0, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(24, device=DEVICE).bfloat16()
    out = kernels.linear_4bit(x, packed, absmax, code, 64, (24, 0), bias)
    assert torch.equal(out, bias.expand(rows, 24))
    zeros = torch.zeros(rows, 24, dtype=x.dtype, device=DEVICE)
    assert torch.equal(kernels.linear_4bit(x, packed, absmax, code, 64, (24, 0)), zeros)


def test_every_kernel_launch_states_floating_point_contraction(monkeypatch):
    """Each kernel is compiled with ``enable_fp_fusion`` stated (``common.COMPILE_OPTIONS``, or
    False where a kernel needs unfused products): Triton 3.9 warns on every compile that leaves it
    unstated, and Triton 3.10 turns contraction off, which would change the products' bits."""
    from triton.runtime import interpreter, jit

    from fourbit.formats import create_dynamic_map

    launches = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            launches.append((getattr(self, "__name__", None) or self.fn.__name__, kwargs))
            return _original(self, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    code = code_table("nf4")
    weight = torch.randn(64, 256, device=DEVICE)
    packed, absmax = kernels.quantize_4bit(weight, code, 64, torch.uint8)
    kernels.quantize_4bit(torch.randn(100, device=DEVICE), code, 64, torch.uint8)  # a partial block
    kernels.quantize_blockwise(absmax, create_dynamic_map().to(DEVICE), 256, absmax.mean())
    kernels.dequantize_4bit(packed, absmax, code, 64, (64, 256), torch.float32)
    for rows in (1, 17):
        kernels.linear_4bit(torch.randn(rows, 256, device=DEVICE), packed, absmax, code, 64, (64, 256))
    assert len(launches) >= 5
    unstated = [name for name, options in launches if not isinstance(options.get("enable_fp_fusion"), bool)]
    assert not unstated, unstated


@pytest.mark.parametrize(
    "config",
    [
        (1, 32, 64, 1, 4, "gather"),
        (4, 16, 128, 3, 4, "gather"),
        (2, 64, 256, 0, 4, "gather"),
        (16, 16, 64, 1, 4, "half"),
        "chunked",
    ],
    ids=str,
)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_every_kernel_configuration_is_correct(config, nested, monkeypatch):
    """The multiply-accumulate kernels (word and any-K, with and without split-K, float32 and
    float16 tables) and the chunked decode + matmul path (chunks forced small) on the same inputs."""
    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 2048)
    code = code_table("nf4")
    rows = 3 if config == "chunked" else min(config[0], 3)
    for n, k, blocksize in [(40, 96, 32), (33, 100, 64), (64, 256, 64), (300, 64, 32)]:
        weight = torch.randn(n, k, device=DEVICE)
        packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        x = torch.randn(rows, k, device=DEVICE)
        bias = torch.randn(n, device=DEVICE)
        out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
        expected = reference.linear_4bit(x.double(), packed, absmax, code, blocksize, (n, k), bias.double(), **extra)
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < (2e-3 if "half" in config else 1e-5), (config, n, k, error)


def test_an_unknown_lookup_is_refused_by_name():
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(8, 64, device=DEVICE), code, 64, torch.uint8)
    with pytest.raises(ValueError, match="'select'"):
        kernels.linear_4bit(torch.randn(1, 64, device=DEVICE), packed, absmax, code, 64, (8, 64),
                            config=(1, 32, 64, 1, 4, "select"))  # fmt: skip


def test_kernel_choice_follows_rows_dtype_and_device():
    """16-bit inputs with K a multiple of the blocksize go to the fragment kernel on a GPU (up to
    16 rows, blocks of 64 columns and more), else the tensor-core kernel (up to the table's rows);
    float32, other K and the interpreter take the CUDA-core kernels."""
    choose = dispatch.choose_config
    bf16 = torch.zeros(8, 256, dtype=torch.bfloat16, device=DEVICE)
    if ON_GPU:
        assert choose(bf16, 512, 256, 64)[0] == "fragments"
        assert choose(bf16, 512, 256, 32)[0] == "fused"  # blocks shorter than the kernel's 64-column step
        assert choose(torch.zeros(17, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64)[0] == "fused"
        assert choose(torch.zeros(8, 320, dtype=torch.bfloat16, device=DEVICE), 512, 320, 64)[0] == "fragments"
        assert choose(torch.zeros(65, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64) == "chunked"
    else:
        assert not dispatch.fused_supported(bf16, 256, 64)  # PTX does not run in the interpreter
        assert choose(bf16, 512, 256, 64) == "chunked"
    assert choose(bf16[:1], 512, 100, 64)[-1] == "half"  # K not a multiple of the blocksize
    assert choose(bf16[:2].float(), 512, 256, 64)[0] == 2


def test_the_input_copy_in_fragment_order_puts_every_word_where_the_kernel_reads_it():
    """``InputPermute``: lane l's words of tile t at step s are row 8t + l // 4's words
    16s + 4 (l % 4) .. + 3, in two halves 64 words apart; rows past the input are zeros."""
    from fourbit.kernels.triton.fragment_inputs import InputPermute

    k = 256
    for rows, tiles in [(3, 1), (8, 1), (11, 2), (16, 2)]:
        x = torch.randn(rows, 2 * k, device=DEVICE).to(torch.bfloat16)[:, :k]  # rows 2k apart
        copy = InputPermute(tiles, k, torch.device(DEVICE))(x).cpu()
        words = x.contiguous().view(torch.int64).cpu()
        for step, tile, lane in itertools.product(range(k // 64), range(tiles), range(32)):
            row = 8 * tile + lane // 4
            columns = 16 * step + 4 * (lane % 4) + torch.arange(4)
            expected = words[row, columns] if row < rows else torch.zeros(4, dtype=torch.int64)
            start = ((step * tiles + tile) * 64 + lane) * 2
            assert torch.equal(copy[[start, start + 1, start + 64, start + 65]], expected), (rows, step, tile, lane)
