"""The Triton products against a float64 reference and the choice of kernel.

The shared cases and the interpreter's limits: ``triton_cases.py``.
"""

from __future__ import annotations

import itertools
import math

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
from fourbit.kernels.triton import dispatch, tuning

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
    """16-bit inputs with K a multiple of the blocksize go to the tensor-core kernel on a GPU (up
    to the table's rows); float32, other K and the interpreter take the CUDA-core kernels."""
    choose = dispatch.choose_config
    bf16 = torch.zeros(8, 256, dtype=torch.bfloat16, device=DEVICE)
    if ON_GPU:
        assert choose(bf16, 512, 256, 64)[0] == "fragments"
        assert choose(bf16, 512, 256, 32)[0] == "fused"  # blocks shorter than the kernel's 64-column step
        assert choose(torch.zeros(17, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64)[0] == "fused"
        assert choose(torch.zeros(8, 320, dtype=torch.bfloat16, device=DEVICE), 512, 320, 64)[0] == "fused"  # K % 256
        assert choose(torch.zeros(65, 256, dtype=torch.bfloat16, device=DEVICE), 512, 256, 64) == "chunked"
    else:
        assert not dispatch.fused_supported(bf16, 256, 64)  # PTX does not run in the interpreter
        assert choose(bf16, 512, 256, 64) == "chunked"
    assert choose(bf16[:1], 512, 100, 64)[-1] == "half"  # K not a multiple of the blocksize
    assert choose(bf16[:2].float(), 512, 256, 64)[0] == 2


@pytest.mark.parametrize("processors", [66, 132])
def test_many_rows_take_wide_tiles_only_on_weights_that_fill_the_gpu(processors, monkeypatch):
    """Beyond the tensor-core table, up to ``wide_rows`` rows run the batch-wide tiles: split K as
    many times as one wave holds when that fills ``wide_split_fill`` of it with splits of
    ``wide_split_columns`` columns or more, else unsplit when the programs cover
    ``wide_min_coverage`` of the multiprocessors; otherwise decode + cuBLAS, as always for more
    rows. (The kernel's support is forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: processors)
    tables = tuning.for_device(torch.device(DEVICE))
    most_fused = tables.fused[-1].max_rows
    wide, columns = tables.wide, tables.wide_split_columns
    covering = math.ceil(tables.wide_min_coverage * processors)  # programs that fill it unsplit
    for rows in (most_fused + 1, tables.wide_rows):
        x = torch.zeros(rows, 4096, dtype=torch.bfloat16)

        def choose(programs: int, k: int, x: torch.Tensor = x) -> tuple | str:
            return dispatch.choose_config(x, programs * wide.block_n, k, 64)

        assert choose(covering, 4096) == wide
        assert choose(8 * covering, 64 * columns) == wide  # more than a wave: never split
        assert choose(covering - 1, 64 * columns) == "chunked"  # two splits would fill 80% of the wave
        assert choose(16, columns) == "chunked"  # its splits would be too narrow
        for programs in (4, 32):
            split = choose(programs, 64 * columns)
            assert split == wide._replace(split_k=processors // programs), (programs, split)
            assert tables.wide_split_fill * processors <= programs * split.split_k <= processors
    assert (
        dispatch.choose_config(torch.zeros(tables.wide_rows + 1, 4096), 8 * covering * wide.block_n, 4096, 64)
        == "chunked"
    )
    assert dispatch.choose_config(torch.zeros(most_fused, 4096), 8 * covering * wide.block_n, 4096, 64)[0] == "fused"


def test_large_weights_read_many_input_rows_in_fragment_order_under_capture(monkeypatch):
    """On an H200, products recorded into a CUDA graph copy their inputs into fragment order from
    the captured tables' row counts on, for weights of their sizes; small weights and few rows
    read the rows in place, and eager calls always do, as the copy's launch costs them more host
    time than it saves on the GPU (``tuning.PermuteRule``). (The kernel's support is forced, so
    this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: True)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.H200)

    def permuted(rows: int, n: int, k: int, captured: bool = True) -> int:
        x = torch.zeros(rows, k, dtype=torch.bfloat16)
        config = dispatch.choose_config(x, n, k, 64, captured=captured)
        assert config[:4] == ("fragments", 4, 0, 0)
        return config[4]

    assert [permuted(rows, 28672, 8192) for rows in (1, 4, 5, 8, 9, 16)] == [0, 0, 1, 1, 1, 1]
    assert [permuted(rows, 28672, 4096) for rows in (8, 9, 16)] == [0, 1, 1]
    assert [permuted(rows, 14336, 4096) for rows in (8, 12, 13, 16)] == [0, 0, 1, 1]
    assert [permuted(rows, 4096, 4096) for rows in (1, 8, 16)] == [0, 0, 0]
    assert [permuted(rows, 28672, 8192, captured=False) for rows in (1, 5, 9, 16)] == [0, 0, 0, 0]
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)  # not measured there
    assert permuted(16, 28672, 8192) == 0


def test_products_recorded_into_a_cuda_graph_take_the_captured_tables(monkeypatch):
    """Under capture a second kernel a call costs no host time at replay: the H200's captured
    tables copy 13-16 input rows of 14336x4096 into fragment order and send 17-32 rows of a weight
    with one wave of 64-row programs to ``wgmma`` (two waves when eager; from 33 rows such a
    weight runs the wide kernel in clusters); the Hopper tables have none. (Support and the
    multiprocessor count are forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: x.shape[0] <= 16)
    monkeypatch.setattr(dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None, max_rows=64: True)
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", True)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.H200)

    def chosen(rows: int, n: int, captured: bool) -> tuple:
        return dispatch.choose_config(torch.zeros(rows, 4096, dtype=torch.bfloat16), n, 4096, 64, captured=captured)

    assert [chosen(rows, 14336, True)[4] for rows in (8, 12, 13, 16)] == [0, 0, 1, 1]
    assert [chosen(rows, 14336, False)[4] for rows in (8, 12, 13, 16)] == [0, 0, 0, 0]
    assert chosen(16, 6144, True)[4] == 0
    one_wave = 64 * 132
    assert [chosen(rows, one_wave, True)[0] for rows in (17, 32)] == ["wgmma", "wgmma"]
    assert [chosen(rows, one_wave, False)[0] for rows in (17, 32)] == ["fused", "fused"]
    assert chosen(64, one_wave, True) == chosen(64, one_wave, False) == ("wgmma_wide", 2, 128)  # a wave in clusters
    assert chosen(32, one_wave - 64, True)[0] == "fused"
    assert chosen(32, 2 * one_wave, False)[0] == "wgmma"
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(16, 14336, True)[4] == 0 and chosen(32, 2 * one_wave, True)[0] == "fused"


def test_the_h200_tables_send_33_to_256_rows_of_weights_with_a_wave_of_programs_to_the_wide_wgmma(monkeypatch):
    """The H200's tables (eager and captured) run 33-256 rows on the wide ``wgmma`` kernel when
    its 128-row programs fill at least 0.6 of the multiprocessors, or in clusters of two when
    twice the programs fill 0.6-1.0 of them (K of two or more 256-column iterations), and from
    65 rows in clusters of two of 64-row programs where those fill it; up to 64 rows, first,
    64-row programs in clusters of two where they fill 0.68-1.0 of three waves, then in clusters
    of four where they fill up to 2.5 waves, from one wave when each part keeps 3-5 iterations
    rather than 1-2 (eager: only in place of the wide kernel's other configurations); other weights
    (at 33-64 rows: ``wgmma`` where its own rule holds), fewer or more rows, or the Hopper tables
    (not measured there) keep the earlier paths. (Support and the multiprocessor count are
    forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: x.shape[0] <= 16)
    monkeypatch.setattr(
        dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None, max_rows=64: x.shape[0] <= max_rows
    )
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.H200)
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", True)

    def chosen(rows: int, n: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, 4096, dtype=torch.bfloat16), n, 4096, 64, captured=captured)

    fills = 128 * 80  # 80 programs: 0.61 of 132
    for captured in (False, True):
        whole = ("wgmma_wide", 1, 128)
        assert [chosen(rows, 28672, captured) for rows in (33, 64, 65, 96, 128, 200, 256)] == [whole] * 7
        assert chosen(32, 28672, captured)[0] == "wgmma"
        assert chosen(257, 28672, captured) != whole
        assert chosen(128, fills, captured) == whole
        assert chosen(128, fills - 128, captured) != whole
    assert chosen(64, 64 * 134, captured=True)[0] == "wgmma"  # one wave of its 64-row programs
    # weights of 0.3-0.5 of a wave of programs: clusters of two split K (8192, 6144 and 5120 rows)
    for captured in (False, True):
        clustered = [chosen(rows, n, captured) for rows in (33, 128, 256) for n in (8192, 6144, 5120)]
        assert clustered == [("wgmma_wide", 2, 128)] * 2 + [("wgmma_wide", 4, 64)] + [("wgmma_wide", 2, 128)] * 6
        assert chosen(128, 128 * 67, captured)[0] != "wgmma_wide"  # 134: more than a wave, 0.51 unsplit
        assert chosen(128, 128 * 39, captured)[0] != "wgmma_wide"  # 78 of 132 (156 in 64-row programs)
        # too few 128-row programs: from 65 rows 64-row ones in clusters of two (4096, 3072, 2560 rows)
        narrow = [chosen(rows, n, captured) for rows in (65, 128, 256) for n in (4096, 3072, 2560)]
        assert narrow == [("wgmma_wide", 2, 64)] * 9
        assert chosen(64, 4096, captured) == (("wgmma_wide", 4, 64) if captured else chosen(64, 4096))  # below
        assert chosen(128, 64 * 39, captured)[0] != "wgmma_wide"  # 78 of 132: under 0.6
        assert chosen(128, 2048, captured)[0] != "wgmma_wide"
    # up to 64 rows, 64-row programs in clusters of two that fill 0.68-1.0 of three waves (396)
    for captured in (False, True):
        small = [chosen(rows, n, captured) for rows in (33, 48, 64) for n in (64 * 135, 11008, 64 * 198)]
        assert small == [("wgmma_wide", 2, 64)] * 9
        assert chosen(65, 11008, captured) == ("wgmma_wide", 1, 128)
        assert chosen(64, 64 * 199, captured) == ("wgmma_wide", 1, 128)  # 398 programs: past three waves
        assert chosen(64, 14336, captured) == ("wgmma_wide", 1, 128)
        assert chosen(64, 64 * 134, captured)[0] != "wgmma_wide"  # 268: under 0.68 of them
        assert chosen(64, 8192, captured) == ("wgmma_wide", 2, 128)
    # then 64-row programs in clusters of four that fill up to 2.5 waves (from 1.0 at 3-5 iterations a part):
    # under capture in place of any kernel, eager calls only in place of the wide kernel's others
    for rows in (33, 48, 64):
        for n in (64 * 47, 4096, 64 * 80):
            assert chosen(rows, n, captured=True) == ("wgmma_wide", 4, 64)
            assert chosen(rows, n)[0] != "wgmma_wide" or n == 64 * 80
        assert chosen(rows, 5120) == ("wgmma_wide", 4, 64)  # for clusters of two of 128-row programs
    assert chosen(65, 4096, captured=True) == ("wgmma_wide", 2, 64)
    assert chosen(64, 64 * 46, captured=True) == chosen(64, 64 * 33, captured=True) == ("wgmma_wide", 4, 64)
    assert chosen(64, 64 * 32, captured=True)[0] == "fused"  # 128 programs: under one wave of 132
    assert chosen(64, 64 * 83, captured=True) == ("wgmma_wide", 2, 128)  # 332: past 2.5
    assert chosen(64, 2048)[0] != "wgmma_wide"  # eager: the fused kernel's one launch

    def iterations(k: int, n: int = 4096) -> tuple | str:
        return dispatch.choose_config(torch.zeros(64, k, dtype=torch.bfloat16), n, k, 64, captured=True)

    assert iterations(5120) == iterations(4352) == iterations(5120, 5120) == ("wgmma_wide", 4, 64)
    assert iterations(1024) == iterations(2048, 2048) == iterations(3072, 3072) == ("wgmma_wide", 4, 64)
    assert iterations(2048, 256) == iterations(1024, 64) == ("wgmma_wide", 4, 64)  # 1-2 a part: from 4 programs
    assert iterations(3072, 2048)[0] == "fused"  # 3 a part: 128 programs, under one wave
    assert iterations(768)[0] != "wgmma_wide"  # 3 iterations: under one a part
    assert iterations(2048, 6144) == ("wgmma_wide", 2, 128)  # 384 programs: past 2.5 of 132
    assert iterations(6144)[0] != "wgmma_wide" and iterations(14336)[0] != "wgmma_wide"  # 6 and 14 a part
    assert iterations(6144, 5120) == ("wgmma_wide", 2, 128)
    one_iteration_few_rows = torch.zeros(64, 256, dtype=torch.bfloat16)
    assert dispatch.choose_config(one_iteration_few_rows, 11008, 256, 64) == ("wgmma_wide", 1, 128)
    odd_k = torch.zeros(128, 4352, dtype=torch.bfloat16)  # 17 iterations: parts of 8 and 9
    assert dispatch.choose_config(odd_k, 8192, 4352, 64) == ("wgmma_wide", 2, 128)
    assert dispatch.choose_config(odd_k, 4096, 4352, 64) == ("wgmma_wide", 2, 64)
    one_iteration = torch.zeros(128, 256, dtype=torch.bfloat16)  # nothing to split
    assert dispatch.choose_config(one_iteration, 8192, 256, 64)[0] != "wgmma_wide"
    even_k = torch.zeros(128, 4608, dtype=torch.bfloat16)
    assert dispatch.choose_config(even_k, 8192, 4608, 64) == ("wgmma_wide", 2, 128)
    # clusters of three where two fill too little and each part keeps 8 iterations (from 65 rows)
    for rows in (65, 128, 256):
        x = torch.zeros(rows, 14336, dtype=torch.bfloat16)
        assert dispatch.choose_config(x, 4096, 14336, 64) == ("wgmma_wide", 3, 128)  # 96 of 132
        assert dispatch.choose_config(x[:, :8192], 2048, 8192, 64) == ("wgmma_wide", 3, 64)
        assert dispatch.choose_config(x[:, :6144], 4096, 6144, 64) == ("wgmma_wide", 3, 128)  # 8 iterations a part
        assert dispatch.choose_config(x[:, :5888], 4096, 5888, 64) == ("wgmma_wide", 2, 64)  # 7.7
        assert dispatch.choose_config(x[:, :14336], 6144, 14336, 64) == ("wgmma_wide", 2, 128)  # two fill 96
    assert dispatch.choose_config(torch.zeros(64, 8192, dtype=torch.bfloat16), 2048, 8192, 64)[0] != "wgmma_wide"
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", False)  # a Triton whose cluster launch is not checked
    assert chosen(128, 8192)[0] != "wgmma_wide" and chosen(128, 28672) == ("wgmma_wide", 1, 128)
    assert chosen(128, 4096)[0] != "wgmma_wide" and chosen(64, 11008) == ("wgmma_wide", 1, 128)
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", True)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(128, 28672) != ("wgmma_wide", 1, 128)
    assert chosen(128, 8192)[0] != "wgmma_wide" and chosen(128, 4096)[0] != "wgmma_wide"  # tables without clusters
    assert chosen(64, 11008)[0] != "wgmma_wide"


def test_the_h200_tables_give_the_fused_kernel_64_row_programs_where_128_row_ones_are_too_few(monkeypatch):
    """The H200's tables (eager and captured) run the tensor-core kernel in programs of 64 weight
    rows where its 128-row programs, K split as far as allowed (8 tiles of 64 a split), fill
    under 1.25 waves (165 of 132 multiprocessors); the Hopper tables (not measured) keep 128.
    (Support and the multiprocessor count are forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: x.shape[0] <= 16)
    monkeypatch.setattr(dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None, max_rows=64: False)
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)

    def block_n(rows: int, n: int, k: int, tables: tuning.KernelTables = tuning.H200, captured: bool = False) -> int:
        monkeypatch.setattr(tuning, "for_device", lambda device: tables)
        x = torch.zeros(rows, k, dtype=torch.bfloat16)
        config = dispatch.choose_config(x, n, k, 64, captured=captured)
        assert config[0] == "fused"
        return config[1]

    for rows, captured in itertools.product((17, 32, 33, 64), (False, True)):
        assert block_n(rows, 2560, 4096, captured=captured) == 64  # 20 programs x 8 splits
        assert block_n(rows, 2688, 4096, captured=captured) == 128  # 21 x 8: 168
        assert block_n(rows, 2048, 5120, captured=captured) == 64  # 16 x 10
        assert block_n(rows, 2048, 8192, captured=captured) == 128  # 16 x 16
        assert block_n(rows, 512, 2048, captured=captured) == 64
        assert block_n(rows, 4096, 14336, captured=captured) == 128
        assert block_n(rows, 512, 2048, tuning.HOPPER, captured) == 128
    assert block_n(17, 4096, 2048) == 64  # 32 x 4
    assert block_n(17, 4096, 4096) == 128  # 32 x 8


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


def test_covering_splits_are_powers_of_two_that_cover_the_gpu_at_most_twice(monkeypatch):
    """Automatic K splits: the power of two at or below what gives every multiprocessor two programs."""
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    splits = {programs: dispatch.covering_splits(programs, torch.device("cpu")) for programs in range(1, 600)}
    for programs, split in splits.items():
        assert split & (split - 1) == 0, (programs, split)
        assert split <= max(1, -(-264 // programs)) < 2 * split, (programs, split)
    assert (splits[32], splits[112], splits[224], splits[448]) == (8, 2, 2, 1)


def test_the_tensor_core_kernels_grid_covers_the_gpu_but_keeps_8_k_tiles_a_split(monkeypatch):
    """``fused_grid``: (weight-row programs, input-row programs, K splits) and the input rows a
    program (16 to the configured rows, a power of two covering the input); covering splits are
    added to the configured ones unless ``cover`` is off, and no split keeps under 8 K tiles."""
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    cpu = torch.device("cpu")
    assert dispatch.fused_grid(64, 2048, 4096, (128, 64, 64, 1), cpu) == ((16, 1, 8), 64)  # 16 covering, 8 allowed
    assert dispatch.fused_grid(64, 2048, 2048, (128, 64, 64, 1), cpu) == ((16, 1, 4), 64)
    assert dispatch.fused_grid(17, 28672, 8192, (128, 32, 64, 4), cpu) == ((224, 1, 4), 32)  # 4 configured
    assert dispatch.fused_grid(3, 8192, 8192, (128, 16, 64, 1), cpu) == ((64, 1, 4), 16)
    assert dispatch.fused_grid(100, 4096, 512, (128, 64, 64, 4), cpu) == ((32, 2, 1), 64)  # 8 tiles: one split
    assert dispatch.fused_grid(64, 2048, 4096, (128, 64, 64, 2), cpu, cover=False) == ((16, 1, 2), 64)


@pytest.mark.parametrize(
    "name, capability, expected",
    [
        ("NVIDIA H200", (9, 0), "H200"),
        ("NVIDIA H200 NVL", (9, 0), "H200"),
        ("NVIDIA H100 80GB HBM3", (9, 0), "HOPPER"),
        ("NVIDIA H100 PCIe", (9, 0), "HOPPER"),
        ("NVIDIA GH200 480GB", (9, 0), "HOPPER"),  # a Hopper without tables of its own
        ("NVIDIA A100-SXM4-80GB", (8, 0), "GENERIC"),
        ("NVIDIA GeForce RTX 4090", (8, 9), "GENERIC"),
        ("NVIDIA B200", (10, 0), "GENERIC"),
    ],
)
def test_each_gpu_gets_its_own_tables_or_the_nearest_safe_ones(name, capability, expected):
    tables = tuning.tables_for(name, capability)
    assert tables is getattr(tuning, expected)
    assert tables.tuned_on


def test_the_generic_tables_keep_the_batch_wide_tiles_small():
    """The one difference from the Hopper tables: batch-wide tiles that fit any GPU's shared memory."""
    generic, hopper = tuning.GENERIC, tuning.HOPPER
    assert generic._replace(wide=hopper.wide, tuned_on=hopper.tuned_on) == hopper
    assert generic.wide.block_m * generic.wide.num_stages < hopper.wide.block_m * hopper.wide.num_stages


def test_a_cpu_device_reads_the_hopper_tables():
    assert tuning.for_device(torch.device("cpu")) is tuning.HOPPER
