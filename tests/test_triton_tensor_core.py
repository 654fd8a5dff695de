"""The tensor-core and register-fragment product kernels, forced, against a float64 reference (GPU).

The shared cases and the interpreter's limits: ``triton_cases.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import describe_dtype

pytest.importorskip("triton")

from triton_cases import (
    DEVICE,
    NEEDS_TRITON,
    case_turn,
    code_table,
    in_turn,
    nested_statistics,
    pairwise_cases,
)

from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import tuning

pytestmark = NEEDS_TRITON


TENSOR_CORE_CONFIGS = [
    ("fused", 128, 16, 64, 1, 4, 4, False),
    ("fused", 128, 16, 64, 4, 4, 3, False),
    ("fused", 64, 32, 128, 1, 4, 3, False),  # two absmax blocks per K tile
    ("fused", 128, 64, 64, 2, 4, 4, True),
    ("fused", 64, 16, 256, 3, 4, 3, True),
    tuning.HOPPER.wide,
    ("wide", 64, 64, 128, 4, 3),  # two absmax blocks per K tile, input rows beyond one tile
    ("wide", 128, 256, 64, 8, 3, 4),  # K split four ways
]


@pytest.mark.gpu
@pytest.mark.parametrize(("config", "dtype", "nested"), pairwise_cases(TENSOR_CORE_CONFIGS))
def test_tensor_core_kernel_configurations(config, dtype, nested):
    """The byte-permute + tensor-core kernel, forced, over partial tiles in every dimension, every
    K-tile/absmax-block relation, split K, both scaling modes and batch-wide tiles, against a
    float64 reference. Each weight takes half the row counts, the configuration's other case the
    other half."""
    weights = [(300, 256, 64), (100, 4096, 128), (4096, 64, 32), (17, 512, 256), (130, 4096, 4096)]
    turn = case_turn(TENSOR_CORE_CONFIGS, config, dtype)
    for quant_type, (index, (n, k, blocksize)) in itertools.product(["nf4", "fp4"], enumerate(weights)):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        # the table routes more rows to "wide"
        for rows in in_turn((70, 200) if config[0] == "wide" else (1, 17, 70), turn + index):
            x = torch.randn(rows, k, device=DEVICE).to(dtype)
            bias = torch.randn(n, device=DEVICE).to(dtype)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
            dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and not out.isnan().any()
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (quant_type, n, k, blocksize, rows, error)


FRAGMENT_CONFIGS = [
    ("fragments", 4, 1),
    ("fragments", 2, 3),
    ("fragments", 8, 0),
    ("fragments", 4, 2),
    ("fragments", 4, 1, 4),
    ("fragments", 8, 3, 2),
    ("fragments", 2, 0, 2),
    ("fragments", 4, 1, 1, 1),
    ("fragments", 8, 3, 2, 1),
    ("fragments", 4, 0, 0, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("config", "dtype", "nested"), pairwise_cases(FRAGMENT_CONFIGS))
def test_register_fragment_kernel_configurations(config, dtype, nested):
    """The register-fragment kernel, forced, over 1 to 16 input rows (one and two tiles, partial
    ones), weight rows that fill no warp, blocksizes from 64 to 4096, K splits that do and do not
    divide K, warps sharing K (some with no columns left), nested statistics whose blocks span
    rows, and strided inputs, against a float64 reference. Each weight takes half the row counts,
    the configuration's other case the other half."""
    weights = [(300, 256, 64), (100, 4096, 128), (17, 512, 256), (130, 4096, 4096), (33, 768, 64), (4096, 11008, 64)]
    turn = case_turn(FRAGMENT_CONFIGS, config, dtype)
    for quant_type, (index, (n, k, blocksize)) in itertools.product(["nf4", "fp4"], enumerate(weights)):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        # in turn: 1 row (Triton's M == 1 form), 9 and 16 (two tiles, partial and full); 3 and 8 (one)
        for rows in in_turn((1, 3, 9, 8, 16), turn + index):
            # rows 2k apart; for 3 rows 2k + 8, which the kernel cannot read in place (it copies)
            x = torch.randn(rows, 2 * k + (8 if rows == 3 else 0), device=DEVICE).to(dtype)[:, -k:]
            bias = torch.randn(n, device=DEVICE).to(dtype)
            out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), bias, **extra, config=config)
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and out.shape == (rows, n)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (quant_type, n, k, blocksize, rows, error)
            assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), "an element is off"


#: The programs ``fragment_grid.fragment_plan`` gives weights of few row groups: 16 warps sharing
#: one row group's K or two row groups' (8 each), and 8 warps sharing one.
WIDE_FRAGMENT_CONFIGS = [("fragments", 16, 1, 16), ("fragments", 16, 1, 8), ("fragments", 8, 1, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", WIDE_FRAGMENT_CONFIGS, ids=lambda config: "x".join(map(str, config[1:])))
def test_the_fragment_kernels_wide_programs_match_float64(config):
    """Programs of 8 and 16 warps, forced, over one and two tiles (partial ones), row groups that
    leave a program's second group empty (272 rows: 17 groups) or are partial (40 rows), K that
    gives some warps a short or no part (K 4160: 16.25 iterations), blocksizes 64 and 4096, NF4 /
    FP4, bf16 / fp16 and plain / nested statistics, against a float64 reference; the same weights
    through the tables (40x8192 takes 16-warp programs there)."""
    for index, (quant_type, dtype, nested) in enumerate(
        [("nf4", torch.bfloat16, True), ("fp4", torch.float16, False), ("nf4", torch.float16, False)]
    ):
        for n, k, blocksize in [(272, 4160, 64), (40, 8192, 4096)]:
            code = code_table(quant_type)
            packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
            absmax, extra = nested_statistics(absmax, nested)
            dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
            for rows in in_turn((1, 5, 9, 16), index):
                x = torch.randn(rows, k, device=DEVICE).to(dtype)
                expected = x.double() @ dense.t()
                for chosen in (config, None):
                    out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, config=chosen)
                    error = ((out.double() - expected).norm() / expected.norm()).item()
                    assert error < 1e-2, (quant_type, n, k, rows, chosen, error)
                    assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), (rows, chosen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
def test_inputs_in_fragment_order_give_the_same_bits(dtype):
    """The fragment kernel reading its inputs from the copy in fragment order gives the products
    it gives reading the rows, bit for bit, for every row count it takes and strided inputs, in
    programs of 2-16 warps."""
    n, k, blocksize = 272, 1024, 64
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, True)
    for rows in range(1, 17):
        x = torch.randn(rows, 2 * k, device=DEVICE).to(dtype)[:, :k]
        narrow = [("fragments", 4, 1, 1), ("fragments", 4, 1, 2), ("fragments", 2, 1, 1)]
        for config in narrow + WIDE_FRAGMENT_CONFIGS[1:]:
            rows_read = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, config=config)
            copied = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, config=(*config, 1))
            assert torch.equal(rows_read, copied), (rows, config)


@pytest.mark.gpu
def test_the_fragment_kernel_compiles_once_for_every_row_count_of_a_tile_past_one():
    """Past one row the row count is not specialized: 3 and 8 rows (one tile) share a compile,
    9 and 16 (two tiles) another (Triton would compile 16, divisible by 16, apart)."""
    from fourbit.kernels.triton import fragments

    n, k, blocksize = 272, 1024, 64
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
    device = torch.cuda.current_device()
    # Triton's compiled kernels by specialization, of the one-row kernel and the other
    caches = [
        kernel.device_caches[device][0]
        for kernel in (fragments._fragment_mma_kernel, fragments._fragment_mma_kernel_rows)
    ]
    kept = [dict(cache) for cache in caches]
    for cache in caches:
        cache.clear()
    try:
        for rows, compiles in [(1, (1, 0)), (3, (1, 1)), (8, (1, 1)), (9, (1, 2)), (16, (1, 2))]:
            x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
            kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), config=("fragments", 4, 1))
            assert tuple(len(cache) for cache in caches) == compiles, rows
    finally:
        for cache, before in zip(caches, kept, strict=True):
            cache.update(before)


def test_register_fragment_kernel_refuses_unaligned_k():
    """Forced onto a K it cannot take (blocks shorter than a 64-column step, or a K of part of a
    block), the register-fragment kernel says so instead of reading the wrong absmax."""
    from fourbit.kernels.triton import fragments

    x = torch.zeros(1, 320, dtype=torch.bfloat16)
    for k, blocksize in [(256, 32), (320, 128)]:
        with pytest.raises(ValueError, match="multiple of the blocksize"):
            weight = kernels.linear.PreparedWeight(
                torch.zeros(k // 2, dtype=torch.uint8),
                torch.zeros(k // blocksize),
                code_table("nf4"),
                blocksize,
                (1, k),
            )
            fragments.fragment_launch(weight, x[:, :k], False, (4, 0), 1)


def test_register_fragment_kernel_refuses_k_warps_that_do_not_divide_its_warps():
    """K warps must divide a program's warps: each row group is taken by the same number."""
    from fourbit.kernels.triton import fragments

    weight = kernels.linear.PreparedWeight(
        torch.zeros(256 * 64 // 2, dtype=torch.uint8), torch.ones(256), code_table("nf4"), 64, (64, 256)
    )
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    for config in [(4, 1, 3), (2, 0, 4), (4, 1, -1)]:
        with pytest.raises(ValueError, match="K warps"):
            fragments.fragment_launch(weight, x, False, config, 1)


@pytest.mark.gpu
def test_the_fragment_kernel_gets_its_register_budget_whatever_ptxas_prefers():
    """The fragment kernel runs with at least 7/8 of its 128 registers a thread: ptxas from CUDA 13
    gives it 80 unless told, and it then runs up to twice as slow (``launch.needs_register_budget``)."""
    from fourbit.formats import NestedStatistics
    from fourbit.kernels.triton import dispatch, fragment_grid, fragments, launch

    n, k, blocksize = 4096, 4096, 64
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, True)
    statistics = NestedStatistics.of(
        extra["nested_absmax"], extra["nested_code"], extra["nested_offset"], extra["nested_blocksize"]
    )
    weight = kernels.linear.PreparedWeight(packed, absmax, code, blocksize, (n, k), statistics)
    for rows in (1, 16):
        x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
        product = fragments.fragment_launch(weight, x, False, (4, 0), dispatch.processors(x.device))
        first = product(x, None)
        assert product.launch.compiled_registers >= launch.REGISTER_SHORTFALL * fragment_grid.REGISTERS, rows
        assert torch.equal(product(x, None), first), rows


class _Compiled:
    """What the JIT gives back for a kernel: its registers a thread and the launcher's parts."""

    def __init__(self, registers: int) -> None:
        self.n_regs, self.run, self.function, self.packed_metadata = registers, None, registers, (4, 1, 0)


class _Kernel:
    """A stand-in for a JIT function whose compiler gives ``registers`` unless a budget says more."""

    def __init__(self, registers: int) -> None:
        self.registers, self.launches, self.warmups = registers, [], []

    def __getitem__(self, grid):
        def launch(*arguments, **options):
            self.launches.append(options)
            return _Compiled(options.get("maxnreg", self.registers))

        return launch

    def warmup(self, *arguments, grid, **options):
        self.warmups.append(options)
        return _Compiled(options.get("maxnreg", self.registers))


@pytest.mark.parametrize(
    ("given", "budget", "recompiled"), [(80, 128, True), (111, 128, True), (112, 128, False), (128, 128, False),
                                        (40, 0, False)]
)  # fmt: skip
def test_a_kernel_given_too_few_registers_is_compiled_again_with_its_budget(given, budget, recompiled):
    """A launch whose first compile got under 7/8 of its register budget compiles the kernel again
    with ``maxnreg`` in that same call (never later, perhaps inside a graph capture) and keeps that
    one; one that got enough, or has no budget, keeps what it got."""
    from fourbit.kernels.triton import launch

    kernel = _Kernel(given)
    launcher = launch.KernelLaunch(kernel, (1,), {"num_warps": 4}, torch.device("cpu"), registers=budget)
    launcher(1, 2)
    stated = launch.COMPILE_OPTIONS
    assert kernel.launches == [{**stated, "num_warps": 4}], "the first call launches once, as compiled by default"
    assert kernel.warmups == ([{**stated, "num_warps": 4, "maxnreg": budget}] if recompiled else [])
    assert launcher.compiled_registers == (budget if recompiled else given)
    assert launcher.options.get("maxnreg") == (budget if recompiled else None)
    if launch.DIRECT:
        assert launcher.compiled[1] == launcher.compiled_registers  # the compile kept is the one launched next


@pytest.mark.parametrize(
    "row_groups, k, parts",
    [(64, 4096, (4, 1)), (256, 4096, (4, 1)), (384, 4096, (4, 1)), (896, 4096, (2, 1)), (1792, 8192, (2, 1)),
     (256, 14336, (4, 1)), (16, 256, (1, 1)), (16, 512, (2, 1)), (16, 1024, (4, 1)), (6000, 4096, (2, 1)),
     (64, 14336, (1, 17)), (16, 14336, (1, 66))],
)  # fmt: skip
def test_the_fragment_kernel_shares_k_among_a_programs_warps_unless_few_rows_have_a_long_k(row_groups, k, parts):
    """Four warps share each row group where the row programs alone would leave multiprocessors
    idle, two where they cover them, never more than K's iterations, and K is not split across
    programs; few row groups with a long K are split across programs instead (the split count is
    capped by K at launch). A given number of K warps is kept."""
    from fourbit.kernels.triton import fragment_grid

    assert fragment_grid.fragment_parts(row_groups, k, 4, 132) == parts
    assert fragment_grid.fragment_parts(row_groups, k, 4, 132, k_warps=1) == (1, 1)


@pytest.mark.parametrize(
    "row_groups, k, tiles, plan",
    [(128, 8192, 1, (16, 16, 1)), (128, 8192, 2, (16, 16, 1)), (64, 14336, 1, (16, 16, 1)),
     (256, 14336, 1, (16, 8, 1)), (256, 14336, 2, (8, 8, 1)), (256, 4096, 1, (4, 4, 1)), (256, 4096, 2, (8, 8, 1)),
     (256, 2048, 2, (4, 4, 1)), (128, 2048, 2, (4, 4, 1)), (128, 4096, 1, (4, 4, 1)), (128, 4096, 2, (8, 8, 1)),
     (320, 5120, 2, (4, 4, 1)), (384, 8192, 1, (4, 4, 1)), (896, 4096, 2, (4, 2, 1)), (1792, 8192, 1, (4, 2, 1))],
)  # fmt: skip
def test_few_row_groups_take_programs_of_more_warps_where_they_fill_the_warp_slots(row_groups, k, tiles, plan):
    """Weights of few row groups (on 132 multiprocessors: 4096 rows and fewer) take programs of
    8 or 16 warps sharing each row group's K where all of them fit at once and each warp keeps
    two iterations: at two tiles always, at one where the table's programs would split K across
    programs or each warp keeps four. Other weights keep ``fragment_parts``; deterministic plans
    take the same programs (they split K only inside them); given K warps are kept."""
    from fourbit.kernels.triton import fragment_grid

    assert fragment_grid.fragment_plan(row_groups, k, tiles, 4, 132) == plan
    assert fragment_grid.fragment_plan(row_groups, k, tiles, 4, 132, across_programs=False)[2] == 1
    if plan[0] > 4:
        assert fragment_grid.fragment_plan(row_groups, k, tiles, 4, 132, across_programs=False) == plan
    assert fragment_grid.fragment_plan(row_groups, k, tiles, 4, 132, k_warps=2) == (4, 2, 1)


@pytest.mark.parametrize(
    "programs, processors, splits",
    [(224, 132, 1), (132, 132, 1), (395, 132, 1), (396, 132, 2), (448, 132, 2), (528, 132, 2), (529, 132, 1),
     (896, 132, 1), (64, 132, 5), (16, 132, 17)],
)  # fmt: skip
def test_the_fragment_kernel_splits_k_where_its_programs_leave_multiprocessors_idle_or_unevenly_loaded(
    programs, processors, splits
):
    """A grid that covers the multiprocessors once or twice, or more than they hold at once, runs
    unsplit; one that covers them three times or more and fits at once is split in two; a smaller
    one is split for two programs per multiprocessor (before the weight's K caps it)."""
    from fourbit.kernels.triton import fragment_grid

    assert fragment_grid.fragment_splits(programs, processors) == splits
