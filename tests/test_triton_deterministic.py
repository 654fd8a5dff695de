"""Deterministic products on CUDA: under ``torch.use_deterministic_algorithms`` no Triton product
adds partial sums across programs (whose atomics arrive in any order), so a call repeats its bits.

The launch plans are built without a GPU (nothing is launched); the products run on one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, NEEDS_TRITON, ON_GPU, code_table

from fourbit.kernels import reference
from fourbit.kernels.triton import dispatch, fragment_grid, fragments, tuning
from fourbit.kernels.triton.linear import PreparedWeight

pytestmark = NEEDS_TRITON


def _weight(n: int, k: int, device: str = "cpu") -> PreparedWeight:
    """A prepared NF4 weight of zeros (the plans read only shapes and pointers)."""
    return PreparedWeight(
        torch.zeros(n * k // 2, dtype=torch.uint8, device=device),
        torch.ones(n * k // 64, device=device),
        code_table("nf4").to(device),
        64,
        (n, k),
    )


def test_deterministic_plans_split_k_only_within_a_program(monkeypatch):
    """The automatic K splits that cross programs (fragment, tensor-core and CUDA-core kernels,
    batch-wide tiles) become one split when deterministic; K warps inside a program stay. The
    fragment kernel's few row groups with a long K now take programs of 16 warps sharing it
    (``fragment_plan``) in both modes, where 4-warp programs would split it across programs."""
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    x = torch.zeros(16, 14336, dtype=torch.bfloat16)
    weight = _weight(1024, 14336)
    for deterministic in (False, True):
        launch = fragments.fragment_launch(weight, x, False, (4, 0), 132, deterministic)
        assert launch.launch.grid == (64, 1, 1) and launch.launch.options["num_warps"] == 16 and not launch.tiles
    assert fragment_grid.fragment_parts(64, 14336, 4, 132) == (1, 17)
    assert fragment_grid.fragment_parts(64, 14336, 4, 132, across_programs=False) == (4, 1)

    fused = ("fused", *tuning.HOPPER.fused[0][1:])  # split K 4 at least, covering splits beyond
    gemv = tuning.HOPPER.gemv[0][1:]  # automatic split
    for config, axis in ((fused, 2), (gemv, 1)):  # the grid axis of K splits
        split = weight._prepare(x[:1], None, config)
        once = weight._prepare(x[:1], None, config, deterministic=True)
        assert split.tiles and split.launch.grid[axis] > 1, config
        assert not once.tiles and once.launch.grid[axis] == 1, config


def test_deterministic_dispatch_never_splits_the_batch_wide_tiles(monkeypatch):
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    tables = tuning.for_device(torch.device(DEVICE))
    x = torch.zeros(128, 14336, dtype=torch.bfloat16)
    assert dispatch.choose_config(x, 4096, 14336, 64).split_k == 4
    assert dispatch.choose_config(x, 4096, 14336, 64, deterministic=True) == "chunked"
    assert dispatch.choose_config(x, 8192, 14336, 64).split_k == 2
    assert dispatch.choose_config(x, 8192, 14336, 64, deterministic=True) == tables.wide  # covers 40% unsplit


@pytest.mark.gpu
def test_deterministic_products_repeat_their_bits():
    """Products that split K across programs by default (few rows, long K; batch-wide tiles of a
    short weight) run unsplit in deterministic mode: the same bits every call, none from a
    launch with partial sums, and as close to a float64 reference as the split products."""
    assert ON_GPU
    torch.manual_seed(0)
    code = code_table("nf4").to(DEVICE)
    for n, k, rows in [(1024, 14336, 1), (1024, 14336, 16), (4096, 4096, 40), (8192, 14336, 128)]:
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, 64, torch.uint8)
        dense = reference.dequantize_4bit(packed, absmax, code, 64, (n, k), torch.float64)
        x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
        expected = x.double() @ dense.t()
        weight = PreparedWeight(packed, absmax, code, 64, (n, k))
        split = weight.linear(x)
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)  # (cuBLAS, where a GPU's tables pick it, warns)
        try:
            first = weight.linear(x)
            # a launch key ends (..., deterministic, captured): PreparedWeight.linear
            deterministic = [launch for key, launch in weight._launches.items() if key[-2] and not key[-1]]
            assert deterministic and not any(launch.tiles for launch in deterministic)
            for _ in range(3):
                assert torch.equal(weight.linear(x), first), (n, k, rows)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        for out in (split, first):
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (n, k, rows, error)
