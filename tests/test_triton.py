"""The Triton products against a float64 reference, the choice of kernel, and derived tables.

The shared cases and the interpreter's limits: ``triton_cases.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import threading

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
    tables copy 13-16 input rows of 14336x4096 into fragment order and send 17-64 rows of a weight
    with one wave of 64-row programs to ``wgmma`` (two waves when eager); the Hopper tables have
    none. (Support and the multiprocessor count are forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: x.shape[0] <= 16)
    monkeypatch.setattr(dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None: True)
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.H200)

    def chosen(rows: int, n: int, captured: bool) -> tuple:
        return dispatch.choose_config(torch.zeros(rows, 4096, dtype=torch.bfloat16), n, 4096, 64, captured=captured)

    assert [chosen(rows, 14336, True)[4] for rows in (8, 12, 13, 16)] == [0, 0, 1, 1]
    assert [chosen(rows, 14336, False)[4] for rows in (8, 12, 13, 16)] == [0, 0, 0, 0]
    assert chosen(16, 6144, True)[4] == 0
    one_wave = 64 * 132
    assert [chosen(rows, one_wave, True)[0] for rows in (17, 64)] == ["wgmma", "wgmma"]
    assert [chosen(rows, one_wave, False)[0] for rows in (17, 64)] == ["fused", "fused"]
    assert chosen(32, one_wave - 64, True)[0] == "fused"
    assert chosen(32, 2 * one_wave, False)[0] == "wgmma"
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(16, 14336, True)[4] == 0 and chosen(32, 2 * one_wave, True)[0] == "fused"


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


def test_derived_tables_follow_the_code_tensor():
    """A table derived from a code tensor is reused for that tensor, rebuilt after an in-place
    change, and never handed to another tensor (not even one at a freed table's address)."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    nf4 = code_table("nf4")
    first = derived(nf4, "test-double", build)
    assert derived(nf4, "test-double", build) is first and len(builds) == 1
    nf4.mul_(1.0)  # bumps the version
    derived(nf4, "test-double", build)
    assert len(builds) == 2
    del nf4, first
    fp4 = code_table("fp4")  # may reuse the freed address and id
    assert torch.equal(derived(fp4, "test-double", build), fp4 * 2)


def test_derived_tables_are_shared_by_views_of_one_code_and_dropped_with_its_memory():
    """Another view of the same code memory (as a compiled backward receives a saved code table)
    finds its table; a view of other memory, or the memory once its owner's data is replaced,
    does not."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    buffer = torch.cat([code_table("nf4"), code_table("fp4")])
    first = derived(buffer[:16], "test-views", build)
    assert derived(buffer[:16], "test-views", build) is first and len(builds) == 1
    assert torch.equal(derived(buffer[16:], "test-views", build), code_table("fp4") * 2) and len(builds) == 2
    buffer[:16].mul_(-1.0)  # through a view: the shared version counter moves
    assert torch.equal(derived(buffer[:16], "test-views", build), -code_table("nf4") * 2) and len(builds) == 3
    view = buffer[:16]
    table = derived(view, "test-views", build)
    assert torch.equal(table, -code_table("nf4") * 2) and len(builds) == 3
    buffer.data = torch.cat([code_table("fp4"), code_table("nf4")])  # the owner's memory replaced
    assert torch.equal(derived(buffer[:16], "test-views", build), code_table("fp4") * 2) and len(builds) == 4


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over ``tensor``'s memory with no base and a version counter of its own, as
    inductor passes a graph input's view in every call."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride()
    )


def test_derived_tables_are_found_through_fresh_aliases_and_follow_the_owner():
    """A compiled graph passes the code as a new alias in every call: each finds the table (not
    built again on every call), and an in-place change made through the first owner still
    rebuilds it, also when the entry was first built from an alias."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    buffer = torch.cat([code_table("nf4"), code_table("fp4")])
    code = buffer[16:]
    first = derived(code, "test-alias", build)
    assert _alias(code)._base is None
    assert all(derived(_alias(code), "test-alias", build) is first for _ in range(3)) and len(builds) == 1
    fresh = _alias(code)._version
    buffer.mul_(-1.0)  # through the owner, invisible to a new alias's own version counter
    assert _alias(code)._version == fresh
    assert torch.equal(derived(_alias(code), "test-alias", build), -code_table("fp4") * 2) and len(builds) == 2
    assert derived(_alias(code), "test-alias", build) is derived(code, "test-alias", build) and len(builds) == 2

    other = code_table("nf4")
    table = derived(_alias(other), "test-alias", build)  # the alias that built it is gone now
    assert derived(_alias(other), "test-alias", build) is table and derived(other, "test-alias", build) is table
    assert len(builds) == 3


def test_derived_tables_of_many_live_codes_are_all_kept_and_freed_ones_dropped():
    """A model has one code table per layer: past the first limit every live one keeps its
    tables, while those of freed code tables are dropped when the cache fills."""
    from fourbit.kernels import derived as cache

    def never(code):
        raise AssertionError("built again")

    codes = [code_table("nf4") for _ in range(600)]
    tables = [cache.derived(code, "test-many", lambda table: table * 2) for code in codes]
    assert all(cache.derived(code, "test-many", never) is table for code, table in zip(codes, tables, strict=True))
    del codes, tables
    kept = [code_table("fp4") for _ in range(cache._limit)]  # enough new entries to reach the limit
    for code in kept:
        cache.derived(code, "test-fill", lambda table: table * 2)
    assert not any("test-many" in key for key in cache._entries)
    assert all(torch.equal(cache.derived(code, "test-fill", never), code * 2) for code in kept)


@pytest.mark.gpu
def test_derived_tables_are_not_kept_from_a_graph_capture():
    from fourbit.kernels.derived import _entries, derived

    code = code_table("nf4")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        derived(code, "test-capture", lambda table: table * 2)
    assert not any("test-capture" in key for key in _entries)


@pytest.mark.gpu
def test_cuda_tables_are_built_on_a_helper_thread_on_the_callers_stream():
    """Outside a capture a CUDA table is built off the calling thread (whose allocations a
    CUDA-graph warmup sends to the graph's pool), on the caller's stream; a table that needs
    another builds it in place, and a build's error reaches the caller."""
    from fourbit.kernels.derived import derived

    code = code_table("nf4")
    seen = {}

    def build(table):
        seen["thread"], seen["stream"] = threading.current_thread(), torch.cuda.current_stream()
        return derived(table, "test-inner", lambda inner: inner * 3) * 2

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        table = derived(code, "test-helper", build)
    assert seen["thread"] is not threading.current_thread() and seen["stream"] == stream
    assert torch.equal(table, code * 6)

    def refuse(table):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        derived(code, "test-error", refuse)


def test_kept_memory_is_made_in_place_on_the_cpu_and_on_the_helper_thread():
    """Only CUDA allocations move to the helper thread; elsewhere ``make`` runs where it is called
    (and the helper's own nested requests run in place instead of waiting on themselves)."""
    from fourbit.kernels import kept_memory

    assert kept_memory.kept_on_device(torch.device("cpu"), threading.current_thread) is threading.current_thread()
    nested = kept_memory._helper().submit(
        lambda: kept_memory.kept_on_device(torch.device("cuda", 0), threading.current_thread)
    )
    helper = nested.result(timeout=30)
    assert helper is not threading.current_thread() and helper.name.startswith(kept_memory._HELPER_NAME)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_a_table_helper_of_its_own():
    """The helper thread that builds CUDA tables does not survive a fork: a child that used the
    parent's executor would wait forever on a thread it does not have."""
    from fourbit.kernels import kept_memory

    parent = kept_memory._helper()
    assert parent.submit(lambda: 7).result() == 7
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's teardown
        try:
            helper = kept_memory._helper()
            ok = helper is not parent and helper.submit(lambda: 7).result(timeout=30) == 7
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)


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
