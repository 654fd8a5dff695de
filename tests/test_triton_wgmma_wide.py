"""Hopper's wide ``wgmma`` product kernel (33-256 rows): forced, against a float64 reference and
the decode + cuBLAS path (GPU of compute capability 9.0); its PTX text and launch checks (anywhere
Triton runs)."""

from __future__ import annotations

import inspect
import itertools
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from ptx_emulator import bits_float, cluster_address, float_bits, run_thread, split_at
from triton_cases import (
    DEVICE,
    NEEDS_TRITON,
    ON_GPU,
    assert_within_rounding,
    code_table,
    graded_weight,
    nested_statistics,
    one_step_rows,
    pairwise_cases,
)

from fourbit import layout
from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import launch, ptx, wgmma_ptx, wgmma_wide

pytestmark = NEEDS_TRITON

HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="wgmma needs a GPU of compute capability 9.0")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize(("config", "dtype", "nested"), pairwise_cases([("wgmma_wide",)]))
def test_wide_kernel_against_a_float64_reference(config, dtype, nested):
    """The wide kernel, forced, over 17 to 256 input rows (every row tile, partial ones) and past
    them (blocks of 256 rows, the last partial), weight rows that fill no program, blocksizes
    from 64 to 4096, K of one to 16 iterations, rows and tiles, strided inputs and a bias: as
    close to a float64 reference as the decode + cuBLAS path, which rounds the decoded weights
    alike."""
    shapes = [(300, 256, 64), (100, 4096, 128), (130, 4096, 4096), (208, 768, 64)]
    row_counts = [(17, 33, 65, 256, 600), (64, 128, 150, 300), (96, 200, 513), (256, 70)]  # each row tile, blocks
    for quant_type, (n, k, blocksize), rows_of_shape in zip(itertools.cycle(["nf4", "fp4"]), shapes, row_counts):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        tiled = layout.can_tile((n, k))
        weight = layout.tile(packed, (n, k)) if tiled else packed
        for rows in rows_of_shape:
            x = torch.randn(rows, 2 * k, device=DEVICE).to(dtype)[:, -k:]
            bias = torch.randn(n, device=DEVICE).to(dtype)
            arguments = (x, weight, absmax, code, blocksize, (n, k), bias)
            out = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=config)
            chunked = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config="chunked")
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and out.shape == (rows, n)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            chunked_error = ((chunked.double() - expected).norm() / expected.norm()).item()
            assert error < 1.3 * chunked_error + 1e-4, (quant_type, n, k, blocksize, rows, error, chunked_error)
            assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), "an element is off"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize(("config", "dtype", "nested"), pairwise_cases([("wgmma_wide", c) for c in (2, 3, 4)]))
def test_wide_kernel_in_clusters_against_a_float64_reference(config, dtype, nested):
    """The wide kernel with K split across the programs of a cluster: as close to a float64
    reference as the unsplit kernel, on weight rows that fill no program, parts of K inside one
    absmax block (blocksize 4096), of one iteration and of unequal lengths (17 iterations),
    partial row tiles (in clusters of three, output shares of unequal lengths), strided inputs
    and a bias; the same bits on every call (the parts are added in rank order)."""
    cluster = config[1]
    shapes = [(300, 256 * cluster, 64), (100, 4352, 128), (130, 4096, 4096)]
    row_counts = [(17, 33, 256), (65, 192), (150, 400)]
    for quant_type, (n, k, blocksize), rows_of_shape in zip(itertools.cycle(["nf4", "fp4"]), shapes, row_counts):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        weight = layout.tile(packed, (n, k)) if layout.can_tile((n, k)) else packed
        for rows in rows_of_shape:
            x = torch.randn(rows, 2 * k, device=DEVICE).to(dtype)[:, -k:]
            bias = torch.randn(n, device=DEVICE).to(dtype)
            arguments = (x, weight, absmax, code, blocksize, (n, k), bias)
            tiled = layout.can_tile((n, k))
            out = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=config)
            unsplit = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=("wgmma_wide", 1))
            expected = x.double() @ dense.t() + bias.double()
            error = ((out.double() - expected).norm() / expected.norm()).item()
            unsplit_error = ((unsplit.double() - expected).norm() / expected.norm()).item()
            assert out.dtype == dtype and out.shape == (rows, n)
            assert error < 1.3 * unsplit_error + 1e-4, (quant_type, n, k, blocksize, rows, error, unsplit_error)
            assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), "an element is off"
            assert torch.equal(out, kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=config))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize(("dtype", "nested"), [(torch.bfloat16, True), (torch.float16, False)])
def test_programs_of_one_warpgroup_give_the_bits_of_programs_of_two(dtype, nested):
    """Programs of 64 weight rows (one warpgroup, twice the programs), unsplit and in clusters of
    two, three and four: the same bits as programs of 128 (which the float64 tests check), each
    warpgroup's products being the same; on weight rows that fill no program of either size,
    partial row tiles, a part of K inside one absmax block or of one iteration, both layouts,
    strided inputs and a bias."""
    cases = [
        ((300, 1024, 64), 65, 1),
        ((260, 1024, 64), 48, 1),
        ((208, 1024, 64), 256, 2),
        ((130, 4096, 4096), 150, 2),
        ((150, 4352, 128), 256, 3),
        ((200, 4352, 64), 33, 4),
        ((120, 1024, 64), 64, 4),
        ((100, 1024, 64), 17, 4),
    ]
    for quant_type, ((n, k, blocksize), rows, cluster) in zip(itertools.cycle(["nf4", "fp4"]), cases):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        tiled = layout.can_tile((n, k))
        weight = layout.tile(packed, (n, k)) if tiled else packed
        x = torch.randn(rows, 2 * k, device=DEVICE).to(dtype)[:, -k:]
        arguments = (x, weight, absmax, code, blocksize, (n, k), torch.randn(n, device=DEVICE).to(dtype))
        one = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=("wgmma_wide", cluster, 64))
        two = kernels.linear_4bit(*arguments, **extra, tiled=tiled, config=("wgmma_wide", cluster, 128))
        assert one.shape == (rows, n) and one.abs().sum() > 0
        assert torch.equal(one, two), (n, k, blocksize, rows, cluster)


@pytest.mark.gpu
@needs_hopper
def test_wide_kernel_products_do_not_depend_on_the_rows_beside_them():
    """Each input row's products are the same whichever row tile or block carries it: 65 rows
    (tile 96) against the same rows among 256 (tile 256), alone in pieces of 100 (tile 128) and
    among 700 (blocks of 256)."""
    n, k = 640, 1024
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, 64, torch.uint8)
    x = torch.randn(700, k, device=DEVICE).to(torch.bfloat16)
    arguments = (packed, absmax, code, 64, (n, k))
    whole = kernels.linear_4bit(x[:256], *arguments, config=("wgmma_wide",))
    first = kernels.linear_4bit(x[:65], *arguments, config=("wgmma_wide",))
    pieces = torch.cat([kernels.linear_4bit(x[i : min(i + 100, 256)], *arguments, config=("wgmma_wide",))
                        for i in range(0, 256, 100)])  # fmt: skip
    blocks = kernels.linear_4bit(x, *arguments, config=("wgmma_wide",))
    assert torch.equal(first, whole[:65])
    assert torch.equal(pieces, whole)
    alone = torch.cat([kernels.linear_4bit(x[i : i + 256], *arguments, config=("wgmma_wide",))
                       for i in range(0, 700, 256)])  # fmt: skip
    assert torch.equal(blocks, alone) and torch.equal(blocks[:256], whole)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize(("k", "blocksize"), [(192, 64), (1472, 64), (1408, 64), (1408, 128)])
def test_k_not_a_multiple_of_256_on_both_wgmma_kernels(k, blocksize, nested):
    """K of part of an iteration (Qwen2.5-72B's MLP: 115.5): the inputs are staged to whole
    iterations with zeros, the last one's steps past K multiply them by masked weights, and steps
    whose blocks cross into the next block of nested statistics take its absmax. Rows of one step
    each check every step's scale; the few-row kernel at both row tiles and split, the wide one
    unsplit and in clusters of two to four (the last part's last iteration short), in programs
    of 128 and 64 weight rows, over blocks of rows (each cluster size and program at one or two
    of the row tiles 64, 96 and 192, in turn: every launch is a compile of its own)."""
    assert ON_GPU
    torch.manual_seed(k)
    n = 272
    packed, absmax, extra, dense = graded_weight(n, k, blocksize, nested, True)
    code = code_table("nf4")
    configs = [(("wgmma", 1), (17, 64)), (("wgmma", 2), (64,)), (("wgmma_wide", 1, 128), (64, 300))]
    tiles = itertools.cycle([(96,), (300,), (64,)])
    configs += [(("wgmma_wide", c, p), next(tiles)) for c in (1, 2, 3, 4) for p in (128, 64)
                if (c, p) != (1, 128) and wgmma_wide.cluster_fits(k, c)]  # fmt: skip
    for config, row_counts in configs:
        for rows in row_counts:
            x = one_step_rows(k, rows, rows)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, tiled=True, config=config)
            assert_within_rounding(out, x, dense, (config, rows))
    x = one_step_rows(k, 0, 96).half()
    out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, tiled=True, config=("wgmma_wide",))
    assert_within_rounding(out, x, dense, "float16")


def test_wide_kernel_refuses_more_inputs_than_it_stages_and_k_of_part_of_a_block():
    """Clear errors for inputs the kernel cannot take, before anything launches."""
    weight = type("Weight", (), {"k": 1024, "n_out": 128, "blocksize": 64})()
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 words of input, not 4194304 rows of 1024"):
        wgmma_wide.wgmma_wide_launch(weight, torch.empty(2**22, 1024, dtype=torch.bfloat16, device="meta"), False, 132)
    weight.k = 1000
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        wgmma_wide.wgmma_wide_launch(weight, torch.empty(96, 1000, dtype=torch.bfloat16), False, 132)
    weight.k = 768  # three iterations: no part for a fourth program
    with pytest.raises(
        ValueError, match=r"clusters of \(1, 2, 3, 4\), in parts of one or more 256-column iterations, not 4"
    ):
        wgmma_wide.wgmma_wide_launch(weight, torch.empty(96, 768, dtype=torch.bfloat16), False, 132, cluster=4)
    with pytest.raises(ValueError, match="not 5"):
        wgmma_wide.wgmma_wide_launch(weight, torch.empty(96, 2048, dtype=torch.bfloat16), False, 132, cluster=5)
    assert wgmma_wide.cluster_fits(768, 3) and not wgmma_wide.cluster_fits(768, 4)
    assert wgmma_wide.cluster_fits(4352, 2)  # 17 iterations: 8 and 9
    assert wgmma_wide.cluster_fits(704, 3) and not wgmma_wide.cluster_fits(704, 4)  # 2.75 iterations: the last short
    assert not wgmma_wide.cluster_fits(4352 + 32, 2)  # part of a step
    with pytest.raises(ValueError, match=r"programs take \(128, 64\) weight rows, not 96"):
        wgmma_wide.wgmma_wide_launch(weight, torch.empty(96, 1536, dtype=torch.bfloat16), False, 132, program_rows=96)


def test_rows_past_the_largest_tile_split_into_equal_blocks_of_the_smallest_tile_that_holds_them():
    """Up to the largest row tile one block of the smallest tile that holds the rows; past it, as
    few blocks as the largest tile allows, each of the smallest tile that holds an equal share."""
    largest = wgmma_wide.ROW_TILES[-1]
    for rows in range(1, 4 * largest + 2):
        tile, count = wgmma_wide.row_tile(rows), wgmma_wide.blocks(rows)
        assert count == -(-rows // largest) and tile * count >= rows, rows
        smaller = [t for t in wgmma_wide.ROW_TILES if t < tile]
        assert not smaller or smaller[-1] * count < rows, rows
    assert [(wgmma_wide.row_tile(rows), wgmma_wide.blocks(rows)) for rows in (256, 257, 384, 385, 513)] == [
        (256, 1), (192, 2), (192, 2), (256, 2), (192, 3)
    ]  # fmt: skip


@pytest.mark.parametrize("rows", wgmma_wide.ROW_TILES)
@pytest.mark.parametrize("element", ["bf16", "f16"])
def test_wide_step_ptx_names_every_operand_its_constraints_declare(rows, element):
    """The step's PTX refers to exactly the operands its constraints declare (the tied inputs by
    their outputs' names), scales every looked-up pair before multiplying with four instructions
    of ``rows`` columns (bf16: by the scale's two bf16 parts, summed by one ``fma``), and waits
    only for the step before."""
    text = wgmma_wide.tile_assembly(rows, element == "f16")[2]
    constraints = wgmma_ptx.wide_constraints(rows).split(",")
    count = rows // 2
    assert constraints[count : 2 * count] == [str(i) for i in range(count)]  # tied accumulators
    used = {int(number) for number in re.findall(r"\$(\d+)", text)}
    assert used == set(range(count)) | set(range(2 * count, len(constraints)))
    instructions = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{rows}k16\.f32\.{element}\.{element} ", text)
    assert len(instructions) == 4
    if element == "bf16":  # each pair: code x scale's high part plus code x its low part, one rounding
        assert len(re.findall(r"mul\.rn\.bf16x2 t, ([gh]\d), s[gh]1;\nfma\.rn\.bf16x2 \1, \1, s[gh]0, t;", text)) == 16
        assert len(re.findall(r"cvt\.rn\.bf16x2\.f32 s[gh][01]", text)) == 4  # the two scales, split
        last = text.rindex("fma.rn.bf16x2")
    else:
        assert len(re.findall(r"cvt\.rn\.f16x2\.f32", text)) == 16
        last = text.rindex("cvt.rn.f16x2.f32")
    assert last < text.index("wgmma.fence")
    assert text.index("wgmma.commit_group") < text.index("wgmma.wait_group.sync.aligned 1;")
    assert "wait_group.sync.aligned 0" not in text
    lookups = len(re.findall(r"ld\.shared\.b32 [gh]\d, \[\w\];", text))
    spread = len(re.findall(r"prmt\.b32 t, w\d, \$\d+, 0x76[0-3]4;\nadd\.u32 t, t, a;\nld\.shared", text))
    assert lookups == 16 and spread == (16 if wgmma_wide.table_row_bytes(rows) == ptx.SPREAD_ROW_BYTES else 0)


def test_only_96_row_tiles_of_more_programs_than_multiprocessors_are_capped_to_128_registers(monkeypatch):
    """Two programs a multiprocessor (the cap) where a 96-row tile's programs outnumber the
    multiprocessors; fewer programs, and the larger tiles (which spill at the cap), keep ptxas's
    own register count. (The launch compiles nothing until called, so this runs anywhere, direct
    launches allowed.)"""
    monkeypatch.setattr(launch, "DIRECT", True)

    def options(rows: int, programs: int, program_rows: int = 128) -> dict:
        weight = SimpleNamespace(
            k=1024, n_out=program_rows * programs, blocksize=64, nested=False, nested_blocksize=256,
            tiled=True, absmax=torch.zeros(4), bytes=torch.zeros(8, dtype=torch.uint8), code=torch.zeros(16),
            statistics=(),
        )  # fmt: skip
        x = torch.empty(rows, 1024, dtype=torch.bfloat16)
        product = wgmma_wide.wgmma_wide_launch(weight, x, False, 132, program_rows=program_rows)
        assert product.launch.grid[0] == programs
        assert product.launch.options["num_warps"] == program_rows // 16  # a warpgroup a 64 weight rows
        assert product.after[-2:] == (program_rows, False)  # K of whole iterations: not SHORT
        return product.launch.options

    assert options(96, 224)["maxnreg"] == 128  # 28672 weight rows
    assert options(65, 133)["maxnreg"] == 128
    assert "maxnreg" not in options(96, 132)
    assert "maxnreg" not in options(80, 112)  # 14336 weight rows: one wave either way
    assert "maxnreg" not in options(128, 224) and "maxnreg" not in options(256, 224)
    assert "maxnreg" not in options(64, 224)  # no spills, two programs a multiprocessor as it is
    assert "maxnreg" not in options(96, 224, program_rows=64)  # one warpgroup: not the tile measured


def test_the_ring_releases_each_slot_once_every_thread_is_done_with_it():
    """Each slot has a "full" barrier (one arrival: the copy) and an "empty" one that every thread
    of a program arrives on; the refill waits on the empty barrier before it copies, and the
    wait for a step's inputs holds no barrier of the whole program."""
    slots, empty = wgmma_wide.SLOTS, 8 * wgmma_wide.SLOTS
    for program_rows, threads in ((128, 256), (64, 128)):
        ring = wgmma_wide.tile_assembly(128, float16=False, program_rows=program_rows)[5]
        counts = re.findall(r"mbarrier\.init\.shared::cta\.b64 \[b\+(\d+)\], (\d+);", ring)
        assert counts == [(str(8 * i), "1") for i in range(slots)] + [
            (str(8 * i), str(threads)) for i in range(slots, 2 * slots)
        ]
    assert f"sub.u32 b, b, {16 * slots};" in ring
    issue = wgmma_ptx.wgmma_issue_ptx(128 * 128, empty)
    assert f"add.u32 e, $4, {empty};" in issue
    assert issue.index("mbarrier.try_wait.parity") < issue.index("cp.async.bulk")
    assert "bar.sync" not in wgmma_ptx.wgmma_wait_ptx(sync=False) and "bar.sync 0;" in wgmma_ptx.wgmma_wait_ptx()
    release = wgmma_ptx.wide_release_ptx(empty)
    assert f"add.u32 e, $1, {empty};" in release and "@p mbarrier.arrive.shared::cta.b64 _, [e];" in release
    assembly = wgmma_wide.tile_assembly(96, float16=False)
    assert assembly == (
        ptx.table_ptx(), ptx.nested_code_ptx(), wgmma_ptx.wide_step_ptx(96, "bf16"), wgmma_ptx.wide_constraints(96),
        wgmma_ptx.wide_drain_constraints(96),
        wgmma_ptx.wgmma_ring_ptx(wgmma_wide.ring_bytes(96), slots, 256, sync=False),
        wgmma_ptx.wgmma_issue_ptx(96 * 128, empty), 1, "", "",
    )  # fmt: skip
    assert wgmma_wide.tile_assembly(96, float16=False, cluster=2)[7:] == (
        2,
        wgmma_ptx.cluster_sum_ptx(48, 2),
        wgmma_ptx.cluster_sum_constraints(48, 2),
    )


def test_the_first_copies_leave_before_the_table_is_filled_and_its_barrier_publishes_the_ring():
    """The wide kernel's thread 0 sets up the ring's barriers and copies the first two steps
    before the shared table is filled; the ring's set-up then holds no barrier of the whole
    program, and the fill's closing ``bar.sync`` comes before any thread waits on the ring."""
    ring = wgmma_wide.tile_assembly(128, float16=False)[5]
    assert "fence.mbarrier_init" in ring and "bar.sync" not in ring
    assert "bar.sync" in wgmma_ptx.wgmma_ring_ptx(128, 2)  # the few-row kernel keeps its own
    for rows in wgmma_wide.ROW_TILES:
        assert wgmma_wide.tile_assembly(rows, float16=False)[0].rstrip("}\n").rstrip().endswith("bar.sync 0;")
    source = inspect.getsource(wgmma_wide._wide_kernel.fn)
    ring, first_copy, fill, loop = (
        source.index("_ring(thread"), source.index("_issue(x_address, first_step,"),
        source.index("_fill_table("), source.index("for k in range("),
    )  # fmt: skip
    assert ring < first_copy < fill < loop


def test_the_wide_kernel_reads_each_iterations_nested_absmax_one_iteration_ahead():
    """The loop scales an iteration's steps with statistics read before it (stored codes and
    nested absmax alike) and reads the next iteration's, so no scale waits for a load of its own."""
    source = inspect.getsource(wgmma_wide._wide_kernel.fn)
    loop = source.index("for k in range(")
    assert source.index("_nested_of(nested_absmax_ptr, rows, k_start,") < loop
    body = source[loop:]
    scales, stored, nested = (
        body.index("_scales_from(stored, nested,"), body.index("_stored_group(absmax_ptr, rows, k + 256,"),
        body.index("_nested_of(nested_absmax_ptr, rows, k + 256,"),
    )  # fmt: skip
    assert scales < stored < nested < body.index("for step in")


def test_the_ring_and_table_of_each_row_tile_fit_a_hopper_program():
    """The ring, the shared table and Triton's own scratch (at most ``SPREAD_TABLE_OFFSET``) fit
    the 227 KiB a Hopper program may use, for every row tile; two programs of the tiles that run
    two a multiprocessor (64 rows; 96, capped) fit its 228 KiB, each with the 1 KiB the hardware
    keeps a program; the spread table lies between Triton's scratch and the ring."""

    def program_bytes(rows: int) -> int:
        dynamic = wgmma_wide.dynamic_bytes(rows)
        if wgmma_wide.table_row_bytes(rows) == ptx.COMPACT_ROW_BYTES:  # a static table, Triton's scratch
            return ptx.table_bytes(ptx.COMPACT_ROW_BYTES) + ptx.SPREAD_TABLE_OFFSET + dynamic
        table_end = ptx.SPREAD_TABLE_OFFSET + ptx.table_bytes(ptx.SPREAD_ROW_BYTES)
        assert table_end <= dynamic - wgmma_wide.ring_bytes(rows)
        return ptx.SPREAD_TABLE_OFFSET + dynamic  # Triton's scratch (counted twice: the launch adds it)

    for rows in wgmma_wide.ROW_TILES:
        assert program_bytes(rows) <= 227 * 1024
    for rows in (64, *wgmma_wide.TWO_PROGRAM_REGISTERS):
        assert 2 * (program_bytes(rows) + 1024) <= 228 * 1024, rows
    assert wgmma_wide.table_row_bytes(256) == ptx.SPREAD_ROW_BYTES
    assert wgmma_wide.table_row_bytes(96) == ptx.COMPACT_ROW_BYTES  # a spread one would not fit two
    assert 2 * (wgmma_wide.ring_bytes(96) + ptx.table_bytes(ptx.SPREAD_ROW_BYTES) + 2048) > 228 * 1024


@pytest.mark.parametrize("rows", wgmma_wide.ROW_TILES)
def test_the_partial_sums_of_a_cluster_fit_the_ring_they_replace(rows):
    """In clusters, a program's partial sums (``rows / 2`` float32 a thread) take the ring's
    slots, which no copy or ``wgmma`` reads any more, and stop short of the slots' barriers."""
    partials = rows // 2 * wgmma_ptx.PARTIAL_STRIDE
    assert partials <= wgmma_wide.SLOTS * rows * 128 < wgmma_wide.ring_bytes(rows)
    for cluster in wgmma_wide.CLUSTERS[1:]:
        text = wgmma_ptx.cluster_sum_ptx(rows // 2, cluster)
        offsets = [int(offset) for offset in re.findall(r"st\.shared\.f32 \[base\+(\d+)\]", text)]
        assert offsets == [i * wgmma_ptx.PARTIAL_STRIDE for i in range(rows // 2)]


@pytest.mark.parametrize(("rows", "cluster"), [(64, 2), (96, 2), (64, 3), (256, 3), (64, 4), (256, 4)])
def test_each_program_of_a_cluster_adds_its_share_of_every_programs_sums_in_rank_order(rows, cluster):
    """``cluster_sum_ptx``, emulated for a few threads of every program of a cluster (the text
    up to the first cluster barrier for all of them, then the rest): program r returns, for each
    of its threads, accumulators ``r * share ..`` of that thread summed over the cluster's
    programs in rank order with float32 rounding, and zeros past the accumulators where the last
    program's share is short; each program writes only its own slots."""
    count, threads, ring = rows // 2, 3, 4096
    share = wgmma_ptx.cluster_share(count, cluster)
    assert share % 4 == 0 and (cluster - 1) * share < count <= cluster * share
    generator = torch.Generator().manual_seed(rows + cluster)
    values = torch.randn(cluster, threads, count, generator=generator).mul(1e3).tolist()  # rounding shows
    stores, sums = split_at(wgmma_ptx.cluster_sum_ptx(count, cluster), "barrier.cluster.wait")[:2]
    shared: dict[int, int] = {}
    stored = {}
    for rank in range(cluster):
        for tid in range(threads):
            inputs = {f"${share + i}": float_bits(values[rank][tid][i]) for i in range(count)}
            inputs |= {f"${share + count}": cluster_address(ring, rank), f"${share + count + 1}": rank}
            stored[rank, tid] = run_thread(stores, inputs, {"%tid.x": tid}, shared)
    assert sorted(shared) == sorted(
        cluster_address(ring + i * wgmma_ptx.PARTIAL_STRIDE + 4 * tid, rank)
        for rank in range(cluster) for tid in range(threads) for i in range(count)
    )  # fmt: skip
    for rank in range(cluster):
        for tid in range(threads):
            regs = run_thread(sums, stored[rank, tid], {"%tid.x": tid}, shared)
            for j in range(share):
                if rank * share + j >= count:
                    assert regs[f"${j}"] == 0, (rank, tid, j)
                    continue
                expected = bits_float(float_bits(values[0][tid][rank * share + j]))
                for other in range(1, cluster):
                    expected = bits_float(
                        float_bits(expected + bits_float(float_bits(values[other][tid][rank * share + j])))
                    )
                assert regs[f"${j}"] == float_bits(expected), (rank, tid, j)
