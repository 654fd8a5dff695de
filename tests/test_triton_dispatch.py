"""The choice of kernel, tile and grid from each GPU's tables (``dispatch``, ``tuning``). The
kernels' support and the multiprocessor count are forced, so these run without a GPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, NEEDS_TRITON

from fourbit.kernels.triton import dispatch, fragment_grid, tuning

pytestmark = NEEDS_TRITON


def test_the_fragment_and_wgmma_kernels_and_tiles_take_k_of_part_of_an_iteration(monkeypatch):
    """Qwen2.5-72B's down_proj (K 29568: 115.5 iterations of 256 columns) is the fragment and
    ``wgmma`` kernels' (``fragments_take``) and kept in tiles on a GPU. K of part of a block, or
    blocks shorter than a step, stay with the other kernels."""
    assert fragment_grid.fragments_take(29568, 64) and fragment_grid.fragments_take(29568, 128)
    assert not fragment_grid.aligned(29568, 64) and fragment_grid.aligned(28672, 64)
    assert not fragment_grid.fragments_take(29568, 256) and not fragment_grid.fragments_take(256, 32)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    assert dispatch.prefers_tiles(cuda, (8192, 29568), 64) and dispatch.prefers_tiles(cuda, (896, 896), 64)
    assert not dispatch.prefers_tiles(cuda, (8192, 29568), 256) and not dispatch.prefers_tiles(cuda, (64, 256), 32)


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


def test_products_recorded_into_a_cuda_graph_take_the_captured_tables(monkeypatch, h200_without_a_gpu):
    """Under capture a second kernel a call costs no host time at replay: the H200's captured
    tables copy 13-16 input rows of 14336x4096 into fragment order and send 17-32 rows of a weight
    with one wave of 64-row programs to ``wgmma`` (two waves when eager; from 33 rows such a
    weight runs the wide kernel in clusters, eagerly only from 65 rows at this K); the Hopper
    tables have none."""

    def chosen(rows: int, n: int, captured: bool) -> tuple:
        return dispatch.choose_config(torch.zeros(rows, 4096, dtype=torch.bfloat16), n, 4096, 64, captured=captured)

    assert [chosen(rows, 14336, True)[4] for rows in (8, 12, 13, 16)] == [0, 0, 1, 1]
    assert [chosen(rows, 14336, False)[4] for rows in (8, 12, 13, 16)] == [0, 0, 0, 0]
    assert chosen(16, 6144, True)[4] == 0
    one_wave = 64 * 132
    assert [chosen(rows, one_wave, True)[0] for rows in (17, 32)] == ["wgmma", "wgmma"]
    assert [chosen(rows, one_wave, False)[0] for rows in (17, 32)] == ["fused", "fused"]
    assert chosen(64, one_wave, True) == chosen(65, one_wave, False) == ("wgmma_wide", 2, 128)  # a wave in clusters
    assert chosen(64, one_wave, False)[0] == "fused"  # eager: one launch
    assert chosen(32, one_wave - 64, True)[0] == "fused"
    assert chosen(32, 2 * one_wave, False)[0] == "wgmma"
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(16, 14336, True)[4] == 0 and chosen(32, 2 * one_wave, True)[0] == "fused"


def test_the_h200_tables_give_the_fused_kernel_64_row_programs_where_128_row_ones_are_too_few(
    monkeypatch, h200_without_a_gpu
):
    """The H200's tables (eager and captured) run the tensor-core kernel in programs of 64 weight
    rows where its 128-row programs, K split as far as allowed (8 tiles of 64 a split), fill
    under 1.25 waves (165 of 132 multiprocessors); the Hopper tables (not measured) keep 128.
    (Support and the multiprocessor count are forced, so this runs without a GPU.)"""
    monkeypatch.setattr(dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None, max_rows=64: False)

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
