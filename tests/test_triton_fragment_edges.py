"""The fragment kernel at its edges (GPU): warps left without columns, launches as programmatic
dependents, which wait for the kernel before them, and K of part of an iteration.

The kernel's configurations against a float64 reference: ``test_triton_tensor_core.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from triton_cases import (
    DEVICE,
    NEEDS_TRITON,
    ON_GPU,
    assert_within_rounding,
    code_table,
    graded_weight,
    nested_statistics,
    one_step_rows,
)

from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import launch
from fourbit.kernels.triton.fragment_arguments import codes_a_load
from fourbit.kernels.triton.fragment_statistics import _nested_steps, _stored_row

pytestmark = NEEDS_TRITON


def _nested_weight(
    n: int, k: int, blocksize: int = 64, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """A nested NF4 weight: packed bytes, absmax codes, the nested keyword arguments, float64 dense."""
    code = code_table("nf4")
    weight = torch.randn(n, k, device=DEVICE) * scale
    packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, True)
    dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
    return packed, absmax, extra, dense


@pytest.mark.gpu
@pytest.mark.parametrize("config", [("fragments", 4, 1, 4), ("fragments", 8, 2, 8)])
def test_warps_left_without_columns_read_no_statistics_past_the_weight(config):
    """1536 columns over four warps' 512 (or, split in two, eight warps' 256) leave the last warps
    no columns. They read no nested statistics: the tensor is followed in memory by NaN, which
    would reach the products of the last weight rows (0 * NaN)."""
    assert ON_GPU
    n, k, blocksize = 64, 1536, 64
    packed, absmax, extra, dense = _nested_weight(n, k, blocksize)
    nested = extra["nested_absmax"]
    followed_by_nan = torch.full((nested.numel() + 64,), float("nan"), device=DEVICE)
    followed_by_nan[: nested.numel()] = nested
    extra = {**extra, "nested_absmax": followed_by_nan[: nested.numel()]}
    code = code_table("nf4")
    for rows in (1, 8):
        x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
        out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, config=config)
        expected = x.double() @ dense.t()
        assert not out.isnan().any(), (config, rows)
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, (config, rows, error)


@pytest.mark.parametrize(
    ("capability", "dependent"), [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)]
)
def test_only_gpus_that_have_programmatic_dependent_launch_launch_so(monkeypatch, capability, dependent):
    """Dependent launches need compute capability 9.0 (``griddepcontrol`` is sm_90 PTX) and a
    Triton that has ``gdc_wait``; never off CUDA or on ROCm."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    launch.dependent_launches.cache_clear()
    try:
        assert not launch.dependent_launches(torch.device("cpu"))
        assert launch.dependent_launches(torch.device("cuda", 0)) == dependent
        monkeypatch.setattr(torch.version, "hip", "6.2")
        launch.dependent_launches.cache_clear()
        assert not launch.dependent_launches(torch.device("cuda", 0))
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.delattr(triton.language.extra.cuda, "gdc_wait")
        launch.dependent_launches.cache_clear()
        assert not launch.dependent_launches(torch.device("cuda", 0))
    finally:
        launch.dependent_launches.cache_clear()


@pytest.mark.gpu
def test_a_chain_of_dependent_products_reads_each_input_after_it_is_written():
    """Each product's input is the product before it: a dependent launch that read its input
    before the kernel before it completed would read stale rows. Eager calls and CUDA graph
    replays (where the launches become programmatic edges) give the same bits, each step within
    rounding of float64, and the launches are dependent where the GPU has them."""
    assert ON_GPU
    torch.manual_seed(0)
    size, steps, blocksize = 2048, 6, 64
    code = code_table("nf4")
    # weights of norm 1 a row, so that products keep their inputs' size
    weights = [_nested_weight(size, size, blocksize, size**-0.5) for _ in range(steps)]
    prepared = [
        kernels.PreparedWeight(packed, absmax, code, blocksize, (size, size), _nested(extra))
        for packed, absmax, extra, _ in weights
    ]

    def chain(x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for weight in prepared:
            x = weight.linear(x)  # one product kernel after another, nothing between
            outputs.append(x)
        return outputs

    for rows in (1, 8):
        x = torch.randn(rows, size, device=DEVICE).to(torch.bfloat16)
        eager = chain(x)
        for step, (inputs, out, (_, _, _, dense)) in enumerate(zip([x, *eager[:-1]], eager, weights, strict=True)):
            expected = inputs.double() @ dense.t()  # each step against its own (rounded) input
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (rows, step, error)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = chain(x)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for out, again in zip(eager, replayed, strict=True):
                assert torch.equal(out, again), rows
        launches = [launch for weight in prepared for launch in weight._launches.values()]
        dependent = launch.dependent_launches(x.device)
        assert launches and all(launch.launch.options.get("launch_pdl", False) == dependent for launch in launches)


def _nested(extra: dict):
    from fourbit.formats import NestedStatistics

    return NestedStatistics(extra["nested_absmax"], extra["nested_code"], extra["nested_offset"], 256)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize(
    ("k", "blocksize"), [(64, 64), (192, 64), (1472, 64), (1408, 64), (896, 64), (384, 128), (1408, 128)]
)
def test_k_not_a_multiple_of_256_gives_every_step_its_own_scale(k, blocksize, nested):
    """K of whole 64-column steps but not whole 256-column iterations (Qwen2.5-72B's MLP, K
    29568): the last iteration stops early, and where a row's blocks cross into another block of
    nested statistics mid-iteration each step takes its own nested absmax. Rows of one step each
    check every step's scale (a neighbour's is 2x off or more), in bf16 and fp16; K 1408 and 896
    at blocksize 64 read their absmax codes two a load."""
    assert ON_GPU
    torch.manual_seed(k + blocksize)
    n = 272  # 17 row groups: rows cross blocks of nested statistics at many offsets
    packed, absmax, extra, dense = graded_weight(n, k, blocksize, nested, True)
    code = code_table("nf4")
    for dtype in (torch.bfloat16, torch.float16):
        for first in range(0, k // 64, 16):
            x = one_step_rows(k, first, 16).to(dtype)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, tiled=True,
                                      config=("fragments", 4, 1))  # fmt: skip
            assert_within_rounding(out, x, dense, (dtype, first))


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiled"])
def test_k_not_a_multiple_of_256_is_right_in_every_fragment_configuration(tiled):
    """The same K (1472, 5.75 iterations) in one row, two tiles, K split among warps (the last
    warp's part short, some empty), across programs, and from permuted inputs (tiled; in rows,
    which a GPU keeps only when asked, the plain configuration)."""
    assert ON_GPU
    torch.manual_seed(1)
    n, k, blocksize = 272, 1472, 64
    packed, absmax, extra, dense = graded_weight(n, k, blocksize, True, tiled)
    code = code_table("nf4")
    configs = [("fragments", 4, 1), ("fragments", 4, 0), ("fragments", 4, 1, 2), ("fragments", 8, 1, 8),
               ("fragments", 4, 3), ("fragments", 4, 1, 0, 1)]  # fmt: skip
    for config in configs if tiled else configs[:1]:
        for rows in (1, 5, 16):
            x = one_step_rows(k, rows, 16) if rows == 16 else torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, tiled=tiled, config=config)
            assert_within_rounding(out, x, dense, (config, rows))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1472, 1408])
@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiled"])
def test_k_not_a_multiple_of_256_is_right_at_every_row_count(tiled, k):
    """Such a weight is kept in tiles on a GPU (``dispatch.prefers_tiles``): each kernel the tables
    give it, from the fragment kernel's rows to the batch-wide tiles', matches float64 (K 1408:
    absmax codes two a load)."""
    assert ON_GPU
    torch.manual_seed(0)
    n, blocksize = 272, 64
    packed, absmax, extra, dense = graded_weight(n, k, blocksize, True, tiled)
    code = code_table("nf4")
    for rows in (1, 16, 17, 64, 100, 256, 300):
        x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
        out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, tiled=tiled)
        assert_within_rounding(out, x, dense, rows)


@triton.jit
def _iteration_statistics_kernel(
    values_ptr, blocks_ptr, starts_ptr, stops_ptr, out_ptr, COUNT: tl.constexpr, BLOCKSIZE: tl.constexpr,
    CODES: tl.constexpr,
):  # fmt: skip
    """Four values, one a step, for ``COUNT`` (block, iteration start, stop) cases: with CODES the
    stored absmax codes through ``_stored_row`` (the block: the iteration's first), else the
    nested absmax through ``_nested_steps`` (the block: the row's first)."""
    case = tl.arange(0, COUNT)
    block = tl.load(blocks_ptr + case)
    k = tl.load(starts_ptr + case)
    k_stop = tl.load(stops_ptr + case)
    if CODES:
        v0, v1, v2, v3 = _stored_row(values_ptr, block, case < COUNT, k, k_stop, BLOCKSIZE, CODES)
    else:
        v0, v1, v2, v3 = _nested_steps(values_ptr, block, case < COUNT, k, k_stop, BLOCKSIZE, 256)
    tl.store(out_ptr + 4 * case, v0.to(tl.float32))
    tl.store(out_ptr + 4 * case + 1, v1.to(tl.float32))
    tl.store(out_ptr + 4 * case + 2, v2.to(tl.float32))
    tl.store(out_ptr + 4 * case + 3, v3.to(tl.float32))


def _iteration_statistics(values: torch.Tensor, k: int, blocksize: int, codes: int = 0) -> list:
    """``_iteration_statistics_kernel`` over every iteration of 64 rows of K ``k``, to the row's
    end and to a part ending at 512 columns (as a warp's part of K may): (row, start, stop, the
    four values) for each."""
    blocks_a_row = k // blocksize
    cases = [(row, start, stop) for row in range(64) for stop in (k, min(k, 512))
             for start in range(0, stop, 256)]  # fmt: skip
    padded = cases + [cases[-1]] * (triton.next_power_of_2(len(cases)) - len(cases))
    rows, starts, stops = (
        torch.tensor(column, dtype=torch.int32, device=DEVICE) for column in zip(*padded, strict=True)
    )
    blocks = rows * blocks_a_row + (starts // blocksize if codes else 0)
    out = torch.zeros(len(padded), 4, device=DEVICE)
    _iteration_statistics_kernel[(1,)](values, blocks, starts, stops, out, len(padded), blocksize, codes)
    return [(*case, got) for case, got in zip(cases, out.cpu().tolist(), strict=False)]  # past the padding


@pytest.mark.parametrize(("k", "blocksize"), [(1472, 64), (192, 64), (1408, 128), (29568, 64)])
def test_each_step_of_an_iteration_takes_the_nested_absmax_of_its_own_block(k, blocksize):
    """``_nested_steps`` (the kernels' statistics where K is not a multiple of 256): every live
    step of every iteration of every row, to the row's end and to a warp's part ending mid-row,
    takes the nested absmax of the block of nested statistics its absmax block lies in, also
    where the iteration's blocks span two of them."""
    blocks_a_row = k // blocksize
    nested = torch.arange(64 * blocks_a_row // 256 + 1, dtype=torch.float32, device=DEVICE) + 1
    straddling = 0
    for row, start, stop, got in _iteration_statistics(nested, k, blocksize):
        blocks = [row * blocks_a_row + (start + 64 * step) // blocksize for step in range(4)]
        live = [start + 64 * step < stop for step in range(4)]
        expected = [nested[block // 256].item() for block in blocks]
        assert [g for g, alive in zip(got, live, strict=True) if alive] == [
            e for e, alive in zip(expected, live, strict=True) if alive
        ], (row, start, stop)
        straddling += len({block // 256 for block, alive in zip(blocks, live, strict=True) if alive}) > 1
    assert straddling or k == 192, "no case crossed a block of nested statistics"


@pytest.mark.parametrize(("k", "codes"), [(1408, 2), (896, 2), (1472, 1), (1024, 4), (1024, 2)])
def test_absmax_codes_read_several_a_load_are_each_steps_own(k, codes):
    """``_stored_row`` reading ``codes`` 8-bit absmax codes a load (``codes_a_load``: four where a
    row's blocks are a multiple of 4, two where they are even, as for K 1408 and 29568) gives each
    live step of every iteration its own block's code, to the row's end and to a part ending
    mid-row."""
    blocks_a_row = k // 64
    weight = type("Weight", (), {"nested": True, "blocksize": 64, "k": k, "absmax": torch.empty(4, dtype=torch.uint8)})
    assert codes_a_load(weight) == (4 if blocks_a_row % 4 == 0 else 2 if blocks_a_row % 2 == 0 else 1) >= codes
    absmax = torch.randint(0, 256, (64 * blocks_a_row,), dtype=torch.uint8, device=DEVICE)
    for row, start, stop, got in _iteration_statistics(absmax, k, 64, codes):
        for step in range(4):
            if start + 64 * step < stop:
                assert got[step] == absmax[row * blocks_a_row + start // 64 + step].item(), (row, start, stop, step)
